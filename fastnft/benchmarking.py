"""What every benchmark shares: timing by the house rules and the CSV ledger.

Timing: warm up, then the median and 20/80 % quantiles of many repeats (CUDA events through
triton.testing.do_bench on a GPU, wall clock on a CPU). Ledger rows share one schema and are
appended only when a benchmark is given `--ledger PATH`; the committed ledger is
benchmarks/results/ledger.csv. Tests never write it.
"""

from __future__ import annotations

import csv
import datetime
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

COLUMNS = ("device", "torch", "triton", "commit", "date", "benchmark", "provider", "shape", "metric", "value", "unit")


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call."""

    median_ms: float
    q20_ms: float
    q80_ms: float


def measure(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, repeats: int = 20) -> Timing:
    """Times fn() after `warmup` calls; on CUDA through do_bench (L2 flushed between calls)."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        median, q20, q80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, q20, q80)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q20, _, _, q80 = statistics.quantiles(samples, n=5)
    return Timing(statistics.median(samples), q20, q80)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """The commit of the checkout this code runs from, with '+dirty' for local changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty.strip() else "")


def environment(device: torch.device | str) -> dict[str, str]:
    """The ledger's context columns: what ran, where, and when."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def append_rows(path: str | Path, rows: Iterable[dict[str, object]]) -> int:
    """Appends rows (each holding every column) to the CSV at path; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    count = 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="raise")
        if new_file:
            writer.writeheader()
        for row in rows:
            missing = [column for column in COLUMNS if column not in row]
            if missing:
                raise ValueError(f"ledger row lacks columns {missing}: {row}")
            writer.writerow(row)
            count += 1
    return count
