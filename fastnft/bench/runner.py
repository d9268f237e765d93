"""Both paths of a preset measured in one process on the same inputs, then the fast path with
one switch flipped at a time; FLOPs counted once on the reference path; MFU on a GPU."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from fastnft.bench.phases import PHASES, UNITS, PhaseRunner
from fastnft.bench.switches import (
    SWITCHES,
    applicable_switches,
    bench_config,
    fast_on,
    observe,
    path_overrides,
    preset_path,
)
from fastnft.config import Config, load_config
from fastnft.distributed import resolve_device
from fastnft.trainer import Trainer
from fastnft_kernels.benchmarking import environment, measure

PEAK_BF16_TFLOPS = 798.0  # dense bf16 matmul on an H100 SXM, measured (docs/performance.md)
# The reference GenEval recipe on SD3.5-Medium at 512^2, per image (TFLOP): text 1.3, sampling 22.2,
# VAE decode 2.5 + reward 0.4, training 83.6 (docs/performance.md): the shares of those four pieces.
SD35M_FLOP_SHARES = {"text": 0.012, "rollout": 0.202, "reward": 0.026, "train": 0.760}


def time_phase(fn, device: torch.device, warmup: int, repeats: int) -> dict[str, float | None]:
    """Seconds per call: the first call (compile included), the median and 20/80 % quantiles of
    `repeats` calls after `warmup` calls (the first counts as one), peak memory on a GPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    timing = measure(fn, device, warmup=max(warmup, 1) - 1, repeats=repeats, whole_calls=True)
    median = timing.median_ms / 1e3
    return {
        "first_s": first,
        "median_s": median,
        "q20_s": timing.q20_ms / 1e3,
        "q80_s": timing.q80_ms / 1e3,
        "compile_s": max(0.0, first - median),
        "memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measured_matmul_tflops(device: torch.device) -> float | None:
    """A large bf16 matmul's TFLOP/s on this GPU, measured now (None on a CPU)."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (measure(lambda: a @ b, device).median_ms * 1e-3) / 1e12


def fresh_trainer(config: Config) -> Trainer:
    """A trainer that compiles from a clean dynamo cache: the previous trainer's guards would
    otherwise count towards the recompile limit and silently send later ones to eager."""
    torch._dynamo.reset()
    return Trainer(config)


def release_memory() -> None:
    """After the last reference to a trainer is gone: free its (GPU) memory before the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_bench(
    preset: str,
    overrides: list[str] = (),
    *,
    phases: tuple[str, ...] = PHASES,
    warmup: int = 2,
    repeats: int = 10,
    flips: list[str] | None = None,
) -> dict[str, Any]:
    """Measures both paths, then the fast path with each switch in `flips` (default: every one
    that applies to the device) flipped, and returns bench.json's content."""
    overrides = list(overrides)
    probe = load_config(preset_path(preset), overrides)
    device = resolve_device(probe.device)
    context = environment(device)
    result: dict[str, Any] = {
        **{k: context[k] for k in ("device", "commit", "date", "torch", "triton")},
        "preset": preset,
        "overrides": overrides,
        "phases": {},
        "compile_s": {},
        "seconds_per_call": {},
        "memory_gb": {},
        "switches": {},
        # each path's overrides on top of `overrides` (fastnft plan re-plans the fast path with them)
        "path_overrides": {path: path_overrides(path, device, probe) for path in ("reference", "fast")},
    }
    timings: dict[str, dict[str, dict[str, float]]] = {}
    work: dict[str, int] = {}
    flops: dict[str, float] = {}
    for path in ("reference", "fast"):
        trainer = fresh_trainer(bench_config(preset, overrides, path, device))
        graphs_before = compiled_graphs()
        runner = PhaseRunner(trainer)
        timings[path] = {}
        for phase in phases:
            timings[path][phase] = time_phase(runner.phase(phase), device, warmup, repeats)
            work[phase] = runner.work(phase)
        graphs_warm = compiled_graphs()
        trainer.run_iteration()  # warm: must compile nothing new
        state = observe(trainer)
        state.update(runner.count_forwards())
        state["compiled_graphs"] = graphs_warm - graphs_before
        state["new_graphs_after_warmup"] = compiled_graphs() - graphs_warm
        result["switches"][path] = state
        if path == "reference":
            flops = runner.count_flops()
        del runner, trainer
        release_memory()

    for phase in phases:
        reference, fast = (work[phase] / timings[p][phase]["median_s"] for p in ("reference", "fast"))
        result["phases"][phase] = {
            "reference": reference,
            "fast": fast,
            "unit": UNITS[phase],
            "speedup": fast / reference,
        }
        result["compile_s"][phase] = {p: timings[p][phase]["compile_s"] for p in timings}
        result["seconds_per_call"][phase] = {
            p: {k: timings[p][phase][k] for k in ("median_s", "q20_s", "q80_s")} for p in timings
        }
        result["memory_gb"][phase] = {p: timings[p][phase]["memory_gb"] for p in timings}
    if device.type == "cuda":  # each path's peak over its phases: torch.cuda.max_memory_allocated
        result["max_memory_allocated_gib"] = {
            path: max(timings[path][phase]["memory_gb"] for phase in phases) for path in timings
        }

    total = sum(flops.values())
    result["flop_shares"] = {name: value / total for name, value in flops.items()}
    result["flop_shares_sd35m"] = SD35M_FLOP_SHARES
    result["flops_per_image"] = {name: value / work.get("rollout", 1) for name, value in flops.items()}
    result["mfu"] = _mfu(flops, timings, device)

    if "iteration" in phases:
        result["switch_speedups"] = {}
        fast_seconds = timings["fast"]["iteration"]["median_s"]
        for name in applicable_switches(device, probe) if flips is None else flips:
            trainer = fresh_trainer(bench_config(preset, overrides, "fast", device, flipped=name))
            timing = time_phase(trainer.run_iteration, device, warmup, repeats)
            result["switch_speedups"][name] = {
                "in_fast_path": fast_on(SWITCHES[name], device),
                "time_ratio_flipped": timing["median_s"] / fast_seconds,
            }
            del trainer
            release_memory()
    return result


def _mfu(flops: dict[str, float], timings: dict, device: torch.device) -> dict[str, Any] | None:
    """Model FLOPs (text excluded) / time, against 798 TFLOP/s and a bf16 matmul measured now."""
    if device.type != "cuda":
        return None
    model_flops = {
        "rollout": flops["rollout"],
        "reward": flops["reward"],
        "train": flops["train"],
        "iteration": flops["rollout"] + flops["reward"] + flops["train"],
    }
    matmul = measured_matmul_tflops(device)
    mfu: dict[str, Any] = {"peak_tflops": PEAK_BF16_TFLOPS, "measured_matmul_tflops": matmul}
    for phase in (p for p in model_flops if p in timings["fast"]):
        for path, timing in timings.items():
            achieved = model_flops[phase] / timing[phase]["median_s"] / 1e12
            mfu[f"{phase}_{path}"] = {
                "tflops": achieved,
                "of_peak": achieved / PEAK_BF16_TFLOPS,
                "of_matmul": achieved / matmul,
            }
    return mfu
