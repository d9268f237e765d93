"""FLOPs of one DiffusionNFT iteration per image (per video for a video preset) for the bench
presets, counted on the CPU without allocating anything: each preset's transformer and VAE built
on the meta device from its real config, one forward, one forward + backward with a frozen base
(the input requires grad, so the backward computes dX only, as LoRA's does), one VAE decode, under
torch's FlopCounterMode.

    python benchmarks/count_flops.py [--presets sd35m,flux-dev-512,flux-dev,qwen-image,...]

Per sample: rollout = steps x forward; training = int(0.99 steps) x (old forward + reference
forward + trained forward and backward), the reference recipe's; text encoders and rewards aside.
Prints a markdown table (docs/performance.md holds its output).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastnft.bench.switches import preset_path
from fastnft.config import load_config
from fastnft.models import build_model

PRESETS = ("sd35m", "flux-dev-512", "flux-dev", "qwen-image", "wan2.1-1.3b", "wan2.1-14b")


def counted(fn) -> float:
    """TFLOP of fn()."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def preset_flops(preset: str) -> dict[str, float]:
    config = load_config(preset_path(preset))
    model = build_model(config.model, config.seed, torch.device("meta"), torch.bfloat16)
    model.transformer.requires_grad_(False)
    x = torch.randn(1, *model.sample_shape, device="meta")
    t = torch.tensor([0.5], device="meta")
    text = model.encode_text(["a prompt"])

    def forward() -> None:
        with torch.no_grad():
            model.velocity(model.transformer, x, t, text)

    def forward_backward() -> None:
        model.velocity(model.transformer, x.requires_grad_(True), t, text).float().square().mean().backward()

    def decode() -> None:
        with torch.no_grad():
            model.decode(x)

    steps = config.rollout.steps
    trained_times = int(config.nft.timestep_fraction * steps)
    row = {"forward": counted(forward), "forward_backward": counted(forward_backward), "decode": counted(decode)}
    row["rollout"] = steps * row["forward"]
    row["train"] = trained_times * (2 * row["forward"] + row["forward_backward"])
    row["iteration"] = row["rollout"] + row["decode"] + row["train"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print("| preset | forward | LoRA fwd + bwd | VAE decode | rollout (10 steps) | training (9 times) | iteration |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        row = preset_flops(preset)
        cells = [row[k] for k in ("forward", "forward_backward", "decode", "rollout", "train", "iteration")]
        print(f"| {preset} | " + " | ".join(f"{value:.1f}" for value in cells) + " |")


if __name__ == "__main__":
    main()
