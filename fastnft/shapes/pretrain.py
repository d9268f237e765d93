"""Pretraining of the `shapes` base model: flow matching on rendered images of the TRAINING prompts,
with caption dropout so that classifier-free guidance works.

    fastnft pretrain shapes [--out DIR] [--steps N] [--batch-size B] [--lr LR] [--seed S]
                            [--caption-dropout P]

Writes DIR/transformer/, DIR/text_encoder/, DIR/tokenizer/ (the EMA weights, stored in bf16) and
DIR/recipe.json (the arguments, the measured accuracies, and a SHA-256 of every weight file).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastnft.models.sd3_pixel import SD3PixelAdapter
from fastnft.shapes.base_model import MAX_LENGTH, base_model_components
from fastnft.shapes.render import render
from fastnft.shapes.task import RESOLUTION, split_prompts
from fastnft_kernels.benchmarking import environment

WEIGHT_FILES = ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checksums(directory: Path) -> dict[str, str]:
    return {name: sha256(Path(directory) / name) for name in WEIGHT_FILES}


def rendered_batch(entries: list[dict], size: int, generator: torch.Generator, dropout: float):
    """(images [B, 3, H, W] in [0, 1], captions) for `size` random training prompts."""
    chosen = torch.randint(len(entries), (size,), generator=generator).tolist()
    images = torch.stack([render(entries[i]["metadata"], generator) for i in chosen])
    drop = torch.rand(size, generator=generator) < dropout
    captions = ["" if d else entries[i]["prompt"] for i, d in zip(chosen, drop.tolist(), strict=True)]
    return images, captions


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_base_model(model: SD3PixelAdapter, ema: list[torch.Tensor], out: Path, recipe: dict) -> dict:
    """Writes the EMA weights (bf16) with the tokenizer and recipe.json (with checksums)."""
    out = Path(out)
    modules = {"transformer": copy.deepcopy(model.transformer), "text_encoder": copy.deepcopy(model.text_encoder)}
    parameters = [*modules["transformer"].parameters(), *modules["text_encoder"].parameters()]
    with torch.no_grad():
        for parameter, average in zip(parameters, ema, strict=True):
            parameter.copy_(average)
    for name, module in modules.items():
        module.to(torch.bfloat16).save_pretrained(out / name)
    model.tokenizer.save_pretrained(out / "tokenizer")
    recipe = {**recipe, "sha256": checksums(out)}
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def pretrain(
    out: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    dropout: float = 0.1,
    ema_decay: float = 0.999,
    warmup: int = 200,
    save_every: int = 1000,
    progress: bool = True,
) -> dict:
    """Trains, saving the EMA model to `out` every `save_every` steps and at the end."""
    components = base_model_components(seed)
    model = SD3PixelAdapter(**components, resolution=RESOLUTION, max_length=MAX_LENGTH, device=torch.device("cpu"))
    trained = [*model.transformer.parameters(), *model.text_encoder.parameters()]
    ema = [p.detach().clone() for p in trained]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    train_entries, _ = split_prompts()
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    losses = []
    recipe = {
        "command": "fastnft pretrain shapes",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "caption_dropout": dropout,
        "ema_decay": ema_decay,
        "warmup": warmup,
        "timesteps": "logit-normal(0, 1)",
        "data": "renders of the training prompts only",
        **{key: value for key, value in environment("cpu").items() if key in ("torch", "commit")},
    }
    with tqdm(range(steps), desc="pretrain shapes", disable=not progress, dynamic_ncols=True) as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, lr, warmup)
            images, captions = rendered_batch(train_entries, batch_size, generator, dropout)
            x0 = model.encode_images(images)
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.sigmoid(torch.randn(batch_size, generator=generator))  # logit-normal times
            x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
            text = model.encode_tokens(model.tokenize(captions))
            velocity = model.velocity(model.transformer, x_t, t, text)
            loss = (velocity - (noise - x0)).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: forget the random init quickly
            with torch.no_grad():
                for average, parameter in zip(ema, trained, strict=True):
                    average.lerp_(parameter, 1 - decay)
            losses.append(float(loss.detach()))
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            done = step + 1
            if done % save_every == 0 or done == steps:
                recipe.update(
                    steps_done=done,
                    final_loss=sum(losses[-200:]) / len(losses[-200:]),
                    minutes=(time.perf_counter() - started) / 60,
                )
                recipe = save_base_model(model, ema, out, recipe)
    return recipe


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastnft pretrain shapes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/shapes-base"))
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share of captions replaced by ''")
    parser.add_argument("--save-every", type=int, default=1000, help="steps between saves of the EMA model")
    args = parser.parse_args(argv)
    recipe = pretrain(
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        dropout=args.caption_dropout,
        save_every=args.save_every,
    )
    print(json.dumps(recipe, indent=2))
    return 0
