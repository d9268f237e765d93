"""Kill tally: SIGKILL `fastnft train` at random moments, resume, and check that every run that
reaches its end equals an uninterrupted one (docs/reliability.md, "What a stop or a kill loses").

    python benchmarks/kill_tally.py [--kills 20] [--iterations 100] [--budget 1800] [--seed 0] [--out DIR]

It first runs configs/tiny.yaml uninterrupted twice: the reference. The faster run's times (warm
caches) set the kill delays. Then it loops: start the run (`--resume` when it has a checkpoint,
else afresh with `--overwrite`) and kill it after a random delay, drawn from [half the start-up
time, the time the rest of the run should take: start-up plus the iterations after its last
checkpoint], until `--kills` kills. A run that ends before its kill is compared with the
reference, and so is the final run, resumed once more and left to finish. Every wait is
bounded: the loop stops at `--budget` seconds. Prints a line per start and the tally: kills (and
what each interrupted), resumes, fresh starts, completed runs, mismatches, failures.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny.yaml"
OVERRIDES = [
    "eval.every=0",
    "logging.sample_grid_every=0",
    "logging.progress=false",
    "logging.tensorboard=false",
    "nft.loss_backend=torch",
]
TIMING = {"time_rollout", "time_reward", "time_train", "images_per_sec"}
RUN_LIMIT = 600  # seconds an unkilled run may take before it counts as a failure


def command(run: Path, iterations: int, resume: bool) -> list[str]:
    start = ["--resume", str(run)] if resume else [str(CONFIG), "--out", str(run), "--overwrite"]
    return [sys.executable, "-m", "fastnft", "train", *start, "--iterations", str(iterations), *OVERRIDES]


def checkpoints(run: Path) -> list[str]:
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("iteration_")) if root.is_dir() else []


def done(run: Path) -> int:
    """The iteration of the run's last checkpoint (0: none)."""
    names = checkpoints(run)
    return int(names[-1].removeprefix("iteration_")) if names else 0


def result(run: Path) -> tuple[list[dict], dict[str, bytes]]:
    """The metrics rows without their timing fields, and the exported weights' tensors as bytes."""
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    rows = [{k: v for k, v in row.items() if k not in TIMING} for row in rows]
    weights = load_file(run / "export" / "pytorch_lora_weights.safetensors")
    return rows, {name: tensor.numpy().tobytes() for name, tensor in weights.items()}


def rows_in(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_bytes().splitlines()) if metrics.exists() else 0


def interrupted(run: Path, launched: float, rows_before: int, done_before: int, iterations: int) -> str:
    """What a kill interrupted, from what the run wrote since its launch (wall-clock `launched`)."""
    root = run / "checkpoints"
    temporary = [p for p in root.glob(".tmp-*")] if root.is_dir() else []
    if any(p.stat().st_mtime >= launched for p in temporary):
        return "a checkpoint being written"
    if done(run) == iterations and (run / "export").exists() and done_before == iterations:
        return "the end (report, export)"
    if rows_in(run) > rows_before or done(run) > done_before:
        return "training"
    return "the start (before its first iteration)"


def reference_run(out: Path, iterations: int) -> tuple[float, float]:
    """Runs the reference; returns (seconds to its first iteration line, seconds in all)."""
    started = time.monotonic()
    child = subprocess.Popen(
        command(out / "reference", iterations, resume=False),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    first = None
    for line in child.stdout:
        if first is None and line.startswith("iteration 1/"):
            first = time.monotonic() - started
    if child.wait(timeout=RUN_LIMIT) != 0:
        raise SystemExit("the reference run failed")
    return first or 0.0, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds; the loop stops there")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="work directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="kill-tally-"))
    rng = random.Random(args.seed)

    start_up, whole = min((reference_run(out, args.iterations) for _ in range(2)), key=lambda times: times[1])
    expected = result(out / "reference")
    print(f"reference: {args.iterations} iterations in {whole:.1f} s (first iteration after {start_up:.1f} s)")
    per_iteration = (whole - start_up) / args.iterations

    run = out / "run"
    tally: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    began = time.monotonic()
    deadline = began + args.budget
    finishing = False
    while True:
        finishing = finishing or tally["kills"] >= args.kills or time.monotonic() > deadline
        resume, start = bool(checkpoints(run)), done(run)
        tally["resumes" if resume else "fresh starts"] += 1
        launched, rows_before = time.time(), rows_in(run)
        child = subprocess.Popen(
            command(run, args.iterations, resume), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        rest = start_up + (args.iterations - start) * per_iteration
        delay = RUN_LIMIT if finishing else rng.uniform(start_up / 2, rest)
        line = f"{time.monotonic() - began:6.0f} s  {'resume from ' + str(start) if resume else 'fresh start'}: "
        try:
            code = child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            if finishing:  # a run left to finish did not: a failure, not a kill
                child.kill()
                child.wait()
                tally["failures"] += 1
                break
            child.send_signal(signal.SIGKILL)
            child.wait()
            tally["kills"] += 1
            stage = interrupted(run, launched, rows_before, start, args.iterations)
            stages[stage] += 1
            print(f"{line}killed after {delay:.1f} s, during {stage} (last checkpoint: {done(run)})", flush=True)
            continue
        if code != 0:
            tally["failures"] += 1
            print(f"run exited {code}: {command(run, args.iterations, resume)}", file=sys.stderr)
            break
        tally["completed runs"] += 1
        same = result(run) == expected
        tally["mismatches"] += not same
        print(f"{line}completed, {'equal to' if same else 'DIFFERENT from'} the reference", flush=True)
        shutil.rmtree(run)
        if finishing:
            break

    print(
        f"kills {tally['kills']}, resumes {tally['resumes']}, fresh starts {tally['fresh starts']}, "
        f"completed runs {tally['completed runs']}, mismatches {tally['mismatches']}, failures {tally['failures']}"
    )
    print("the kills interrupted: " + ", ".join(f"{stage} {count}" for stage, count in stages.most_common()))
    if args.out is None:
        shutil.rmtree(out)
    return 1 if tally["mismatches"] or tally["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
