"""Kill tally: SIGKILL `fastnft train` at random moments, resume, and check that every run that
reaches its end equals an uninterrupted one (docs/reliability.md, "What a stop or a kill loses").

    python benchmarks/kill_tally.py [--kills 20] [--iterations 100] [--budget 1800] [--seed 0] [--out DIR]

It first runs configs/tiny.yaml uninterrupted twice, the reference, and times it (the faster run:
warm caches): the start of a fresh and of a resumed run, each iteration, the end. Then it loops:
start the run (`--resume` when it has a checkpoint, else afresh with `--overwrite`) and kill it
at a moment drawn uniformly from the time the launch should live and a quarter more, so that
about one launch in five ends first; until `--kills` kills. A run that reaches its end is
compared with the reference, and so is the final run, resumed once more and left to finish.
Every wait is bounded: the loop stops at `--budget` seconds. Prints a line per launch and the
tally: kills (and what each interrupted), resumes, fresh starts, completed runs, mismatches,
failures.
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


def interrupted(run: Path, launched: float, rows_before: int, done_before: int) -> str:
    """What a kill interrupted, from what the launch wrote (files newer than `launched`, wall clock)."""

    def newer(paths: list[Path]) -> bool:
        return any(path.stat().st_mtime >= launched for path in paths)

    if newer(list((run / "checkpoints").glob(".tmp-*"))):
        return "a checkpoint being written"
    if newer([path for path in (run / "export").rglob("*") if path.is_file()]):
        return "the end (export, report)"
    if rows_in(run) > rows_before or done(run) > done_before:
        return "training, between checkpoints"
    return "the start (before its first iteration)"


def timed(arguments: list[str], first: str) -> tuple[float, float]:
    """Runs `fastnft train` to its end: (seconds to its first line starting with `first`, seconds
    in all)."""
    started, first_at = time.monotonic(), 0.0
    child = subprocess.Popen(arguments, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in child.stdout:
        if not first_at and line.startswith(first):
            first_at = time.monotonic() - started
    if child.wait(timeout=RUN_LIMIT) != 0:
        raise SystemExit(f"an uninterrupted run failed: {arguments}")
    return first_at, time.monotonic() - started


def reference_times(out: Path, iterations: int) -> dict[str, float]:
    """Runs the reference twice (the faster run's times count: warm caches), and resumes a copy of
    it for one iteration more. Returns the seconds of a fresh and of a resumed run's start (to the
    end of its first iteration), of each further iteration, and of the end (export, report)."""
    reference = out / "reference"
    runs = [timed(command(reference, iterations, resume=False), "iteration 1/") for _ in range(2)]
    start_up, whole = min(runs, key=lambda times: times[1])
    shutil.copytree(reference, out / "resumed")
    resume_start_up, resumed = timed(
        command(out / "resumed", iterations + 1, resume=True), f"iteration {iterations + 1}/"
    )
    shutil.rmtree(out / "resumed")
    end = resumed - resume_start_up
    return {
        "start": start_up,
        "resumed start": resume_start_up,
        "iteration": (whole - start_up - end) / (iterations - 1),
        "end": end,
    }


def lifetime(times: dict[str, float], iterations: int, resume_from: int | None) -> float:
    """How long a launch should live: its start, the iterations after the first, the end."""
    start = times["start"] if resume_from is None else times["resumed start"]
    left = iterations - 1 - (resume_from or 0)
    return start + max(left, 0) * times["iteration"] + times["end"]


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

    times = reference_times(out, args.iterations)
    expected = result(out / "reference")
    print("reference, seconds: " + ", ".join(f"{name} {value:.2f}" for name, value in times.items()))

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
        # Uniform over the launch's life and a quarter past it, so that about one launch in five ends first.
        life = lifetime(times, args.iterations, start if resume else None)
        delay = RUN_LIMIT if finishing else rng.uniform(0, 1.25 * life)
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
            stage = interrupted(run, launched, rows_before, start)
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
