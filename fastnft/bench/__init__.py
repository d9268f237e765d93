"""`fastnft bench`: the reference path beside the fast path, in one process, on the same inputs.

    fastnft bench --preset NAME [--out DIR] [--ledger PATH] [--phases rollout,reward,train,iteration]
                  [--warmup N] [--repeats N] [key=value ...]

A preset is a trainer config shipped as configs/NAME.yaml; key=value overrides apply to both paths.
The two paths run the same math (a test checks their losses agree on the same tensors):

- reference: the reference implementation's settings: fp32 weights (fp16 autocast and a
  GradScaler on GPU), every image's prompt re-encoded, eager, default SDPA, torch AdamW, the eager
  loss with float64 adaptive weights, VAE in the default memory format;
- fast: the SWITCHES entries that apply to the device and pay off there (on a CPU, bf16 weights
  slow the small models the CPU can run, so its fast path keeps fp32).

Phases (throughput = median over repeats after warm-up; the first call's extra time is reported
as compile time): rollout (prompt encoding + sampling, images/s), reward (VAE decode + rewards,
images/s), train (the NFT update, (image, timestep) samples/s), iteration (all of it, images/s).
Then, for the iteration, the fast path with one switch flipped at a time: each switch's own
effect (time with it flipped / time of the fast path; above 1, the fast path's choice pays).
FLOPs are counted once (torch.utils.flop_counter) on the reference path; on a GPU, MFU is given
against 798 TFLOP/s (H100/H200 dense bf16) and against a bf16 matmul measured in this run.
Outputs: DIR/bench.json, DIR/bench.md, DIR/bench.png, and ledger rows with --ledger.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastnft.bench.phases import PHASES
from fastnft.bench.report import ledger_rows, markdown, write_outputs
from fastnft.bench.runner import run_bench
from fastnft.bench.switches import SWITCHES
from fastnft.config import ConfigError
from fastnft_kernels.benchmarking import append_rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastnft bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        default="tiny",
        help=(
            "configs/NAME.yaml (package data): tiny, sd35m, sd35m-1024, flux-dev, flux-dev-512, qwen-image, "
            "wan2.1-1.3b, wan2.1-14b"
        ),
    )
    parser.add_argument("--out", type=Path, help="output directory (default runs/bench-PRESET)")
    parser.add_argument("--ledger", type=Path, help="append ledger rows to this CSV")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per phase (median reported)")
    parser.add_argument(
        "--flip",
        help="comma-separated switches to flip one at a time (default: all; 'none' skips): " + ",".join(SWITCHES),
    )
    args, overrides = parser.parse_known_args(argv)
    unknown = [item for item in overrides if "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    phases = tuple(p for p in args.phases.split(",") if p)
    bad = [p for p in phases if p not in PHASES]
    if bad:
        raise ConfigError(f"--phases: unknown phase {bad[0]!r}; known: {', '.join(PHASES)}")
    flips = None
    if args.flip is not None:
        flips = [] if args.flip == "none" else [name for name in args.flip.split(",") if name]
        bad = [name for name in flips if name not in SWITCHES]
        if bad:
            raise ConfigError(f"--flip: unknown switch {bad[0]!r}; known: {', '.join(SWITCHES)}")
    result = run_bench(args.preset, overrides, phases=phases, warmup=args.warmup, repeats=args.repeats, flips=flips)
    out = args.out or Path("runs") / f"bench-{args.preset}"
    write_outputs(result, out)
    if args.ledger is not None:
        append_rows(args.ledger, ledger_rows(result))
    print(markdown(result))
    print(f"wrote {out / 'bench.json'} ({result['device']})")
    return 0
