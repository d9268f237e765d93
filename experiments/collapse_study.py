"""Where a long run's collapse comes from (docs/shapes-experiments.md, "The long-run collapse").

For each checkpoint of a run (written with checkpoint.every and a large checkpoint.keep_last), this
replays that iteration's rollout exactly (keyed randomness) with the checkpoint's policies and
measures, on the iteration's own samples:

- per grid time t: the KL term to the base `mean (v_theta - v_ref)^2`, the old policy's lag
  `mean (v_theta - v_old)^2`, and the gradient norms of the positive branch (weighted by r), of
  the negative branch (weighted by 1 - r) and of their sum (the update), with the cosine between
  the branches. The branch gradients come from the kernel package's loss itself: its gradient
  with respect to v_theta with r = 1 (the positive term alone) or r = 0 (the negative term
  alone), weighted per row by r or 1 - r and pulled back through the transformer;
- per prompt category: mean reward and sample norm `mean x0^2`;
- the within-group correlation of reward with sample norm (does the reward prefer saturated
  samples?), and the sample norm of the positives (r > 0.5) and negatives.

    python experiments/collapse_study.py RUN_DIR [--every 20] [--out RUN_DIR/collapse_study.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from fastnft.checkpoint import list_checkpoints, load_checkpoint
from fastnft.config import load_config
from fastnft.rng import keyed_randn
from fastnft.trainer import Trainer
from fastnft_kernels import nft_loss_torch


def branch_gradients(trainer: Trainer, x0: Tensor, text, r: Tensor, index: int) -> dict[str, float]:
    """KL, lag and the two branches' parameter gradients at grid time `index`, over every sample."""
    update, policies, nft = trainer.update, trainer.policies, trainer.config.nft
    parameters = list(policies.trained_parameters().values())
    totals = {branch: [torch.zeros_like(p) for p in parameters] for branch in ("positive", "negative")}
    kl = lag = 0.0
    size = nft.micro_batch_size
    for start in range(0, len(x0), size):
        rows = torch.arange(start, min(start + size, len(x0)))
        clean, cond, weight = x0[rows], text.index(rows), r[rows]
        t = update.grid[index].expand(len(rows)).to(clean.device)
        noise = keyed_randn(
            update.sample_shape, 0, index, rows.tolist(), "training_noise", "study", device=clean.device
        )
        t_b = t.view(-1, *[1] * (clean.ndim - 1))
        x_t = (1 - t_b) * clean + t_b * noise
        with torch.no_grad():
            with policies.role("old") as old:
                v_old = update.velocity(old, x_t, t, cond)
            with policies.role("ref") as ref:
                v_ref = update.velocity(ref, x_t, t, cond)
        with policies.role("trained"):
            v_theta = update.velocity(policies.grad_module, x_t, t, cond)
        kl += float((v_theta.detach() - v_ref).square().flatten(1).mean(1).sum())
        lag += float((v_theta.detach() - v_old).square().flatten(1).mean(1).sum())
        for branch, r_branch, row_weight in (("positive", 1.0, weight), ("negative", 0.0, 1 - weight)):
            r_all = torch.full_like(weight, r_branch)
            options = {"beta": nft.beta, "adv_clip_max": nft.adv_clip_max, "loss_space": nft.loss_space, "eps": nft.eps}
            loss = nft_loss_torch(v_theta, v_old, clean, noise, t, r_all, **options).loss
            (d_v,) = torch.autograd.grad(loss * len(rows) / len(x0), v_theta, retain_graph=True)
            d_v = d_v * row_weight.view(-1, *[1] * (d_v.ndim - 1)).to(d_v.dtype)
            grads = torch.autograd.grad(v_theta, parameters, grad_outputs=d_v, retain_graph=True, allow_unused=True)
            for total, grad in zip(totals[branch], grads, strict=True):
                if grad is not None:
                    total += grad
    flat = {branch: torch.cat([g.flatten().double() for g in grads]) for branch, grads in totals.items()}
    positive, negative = flat["positive"], flat["negative"]
    return {
        "t": float(update.grid[index]),
        "kl": kl / len(x0),
        "lag": lag / len(x0),
        "grad_positive": float(positive.norm()),
        "grad_negative": float(negative.norm()),
        "grad_net": float((positive + negative).norm()),  # the update's direction is this small difference
        "cosine": float(positive @ negative / (positive.norm() * negative.norm()).clamp_min(1e-30)),
    }


def within_group_correlation(values: Tensor, scores: Tensor, groups: Tensor) -> float:
    """Pearson correlation of values and scores after subtracting each group's means."""
    centred = []
    for tensor in (values, scores):
        means = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).index_add_(0, groups, tensor.double())
        counts = torch.bincount(groups).double()
        centred.append(tensor.double() - (means / counts)[groups])
    a, b = centred
    denominator = (a.norm() * b.norm()).item()
    return float(a @ b / denominator) if denominator > 0 else math.nan


def study_checkpoint(trainer: Trainer, iteration: int) -> dict:
    batch = trainer.rollout.batch(iteration)
    samples = trainer.rollout.sample(batch)
    scored = trainer.rollout.score(batch, samples)
    x0, r, scores = samples.x0, scored.probability, scored.rewards.score.cpu()
    norms = x0.square().flatten(1).mean(1).cpu()
    by_category: dict[str, list[int]] = defaultdict(list)
    for row, meta in enumerate(batch.my_prompts()[1]):
        by_category[meta.get("category", "all")].append(row)
    positives = r.cpu() > 0.5
    return {
        "iteration": iteration,
        "reward": float(scores.mean()),
        "x0_norm": float(norms.mean()),
        "x0_norm_positive": float(norms[positives].mean()) if positives.any() else math.nan,
        "x0_norm_negative": float(norms[~positives].mean()) if (~positives).any() else math.nan,
        "reward_norm_correlation": within_group_correlation(norms, scores, batch.groups),
        "categories": {
            name: {"images": len(rows), "reward": float(scores[rows].mean()), "x0_norm": float(norms[rows].mean())}
            for name, rows in sorted(by_category.items())
        },
        "times": [branch_gradients(trainer, x0, samples.text, r, j) for j in range(trainer.config.rollout.steps)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--every", type=int, default=20, help="study every checkpoint whose iteration this divides")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config = load_config(args.run / "config.yaml", ["logging.progress=false"])  # needs nft.kl_coef > 0 (v_ref)
    out = args.out or args.run / "collapse_study.json"
    results = json.loads(out.read_text()) if out.exists() else []
    done = {row["iteration"] for row in results}
    for path in list_checkpoints(args.run):
        iteration = int(path.name.rsplit("_", 1)[1])
        if iteration % args.every or iteration in done:
            continue
        trainer = Trainer(config, progress=False)
        load_checkpoint(trainer.checkpoint_parts(), path)
        results.append(study_checkpoint(trainer, iteration))
        out.write_text(json.dumps(sorted(results, key=lambda row: row["iteration"]), indent=1))
        row = results[-1]
        print(f"iteration {iteration}: x0_norm {row['x0_norm']:.3f}, corr {row['reward_norm_correlation']:+.3f}")


if __name__ == "__main__":
    main()
