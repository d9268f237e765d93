"""What every benchmark shares: timing by the house rules, one environment probe, the CSV ledger.

Timing: warm up, then the median and 20/80 % quantiles of many repeats (CUDA events through
triton.testing.do_bench on a GPU, wall clock on a CPU). The environment probe is the one place
that reports device, torch and triton versions, commit and date; trainers add their own library
versions on top of it. Ledger rows share one schema (COLUMNS) and are appended to a CSV.

Depends on torch only (triton is imported when timing on a GPU or probing its version).
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


def measure(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 3,
    repeats: int = 20,
    whole_calls: bool = False,
) -> Timing:
    """Times fn() after `warmup` calls. On CUDA, kernel-sized calls go through do_bench (L2
    flushed between calls, its own repeat count); with whole_calls, each of `repeats` calls is
    timed between device synchronisations instead (calls of milliseconds or more, such as a
    training phase, whose own caches are part of what is measured)."""
    device = torch.device(device)
    if device.type == "cuda" and not whole_calls:
        from triton.testing import do_bench

        median, q20, q80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, q20, q80)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(samples)
    q20, _, _, q80 = statistics.quantiles(samples, n=5) if len(samples) > 1 else (median,) * 4
    return Timing(median, q20, q80)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device | str, *, checkout: str | Path | None = None) -> dict[str, str]:
    """What ran, where, and when: the ledger's context columns (device, torch, triton, commit, date).

    `checkout` is a file or directory inside the git checkout whose commit to report (default:
    this package's own directory, which is the checkout for an editable install).
    """
    return {
        "device": _device_name(torch.device(device)),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": _git_commit(Path(checkout) if checkout is not None else Path(__file__)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:  # triton is a Linux-only dependency
        return "none"
    return triton.__version__


def _git_commit(inside: Path) -> str:
    """The checkout's short commit, with '+dirty' for local changes; 'unknown' outside git."""
    here = inside.resolve()
    if not here.is_dir():
        here = here.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty.strip() else "")


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
