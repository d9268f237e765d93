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
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastnft.benchmarking import append_rows, environment
from fastnft.config import Config, ConfigError, load_config
from fastnft.trainer import Trainer

PHASES = ("rollout", "reward", "train", "iteration")
UNITS = {"rollout": "img/s", "reward": "img/s", "train": "samples/s", "iteration": "img/s"}
PEAK_BF16_TFLOPS = 798.0  # dense bf16 matmul on an H100 SXM, measured (docs/performance.md)
# The reference GenEval recipe on SD3.5-Medium at 512^2, per image (TFLOP): text 1.3, sampling 22.2,
# VAE decode 2.5 + reward 0.4, training 83.6 (docs/performance.md): the shares of those four pieces.
SD35M_FLOP_SHARES = {"text": 0.012, "rollout": 0.202, "reward": 0.026, "train": 0.760}


@dataclass(frozen=True)
class Switch:
    """One speed switch: a config field, its fast and reference values, the state it shows."""

    field: str
    fast: Any
    reference: Any
    state: str  # the key of `observe` that must change when the switch flips
    cuda_only: bool = False  # means nothing on a CPU (e.g. cuDNN attention)
    fast_on_cpu: bool = True  # part of the CPU fast path (measured: bf16 weights slow small CPU models)


SWITCHES = {
    "bf16_weights": Switch("model.precision", "bf16", "reference", "weight_dtype", fast_on_cpu=False),
    "text_cache": Switch("model.text_encoding", "cached", "per_image", "text_encoder_rows_per_iteration"),
    "loss": Switch("nft.loss_backend", "auto", "reference", "loss"),
    "compile": Switch("compile.enabled", True, False, "compiled_blocks"),
    "attention": Switch("model.attention", "sdpa-cudnn", "sdpa", "attention", cuda_only=True),
    "vae_channels_last": Switch("model.vae_channels_last", True, False, "vae_memory_format"),
    "fused_adamw": Switch("optim.fused", True, False, "optimizer"),
    "batch_old_ref": Switch("nft.batch_old_ref", True, False, "transformer_calls_per_pair"),
    "rollout_cuda_graphs": Switch("rollout.cuda_graphs", True, False, "rollout_cuda_graphs", cuda_only=True),
}


def applicable_switches(device: torch.device) -> dict[str, Switch]:
    return {name: s for name, s in SWITCHES.items() if device.type == "cuda" or not s.cuda_only}


def fast_on(switch: Switch, device: torch.device) -> bool:
    """Whether the fast path on this device turns the switch on."""
    return device.type == "cuda" or switch.fast_on_cpu


def path_overrides(path: str, device: torch.device, flipped: str | None = None) -> list[str]:
    """Overrides for path "reference" or "fast", optionally with the switch `flipped` the other way."""
    overrides = []
    for name, switch in applicable_switches(device).items():
        on = path == "fast" and fast_on(switch, device)
        value = switch.fast if on != (name == flipped) else switch.reference
        overrides.append(f"{switch.field}={json.dumps(value)}")
    return overrides


def preset_path(name: str) -> Path:
    from importlib.resources import files

    configs = files("fastnft.configs")
    path = Path(str(configs / f"{name}.yaml"))
    if not path.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in configs.iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"--preset: no preset {name!r}; known: {', '.join(known)}")
    return path


def bench_config(preset: str, overrides: list[str], path: str, device: torch.device, flipped: str | None = None):
    quiet = ["logging.progress=false", "logging.tensorboard=false"]
    return load_config(preset_path(preset), [*quiet, *overrides, *path_overrides(path, device, flipped)])


# ---------------------------------------------------------------- observing the switches


def frozen_weight_dtype(trainer: Trainer) -> str:
    """The dtype of the weights the no-grad policies run with (LoRA: the base; full: the old copy)."""
    if trainer.config.lora.enabled:
        weight = next(p for n, p in trainer.policies.transformer.named_parameters() if ".lora_" not in n)
    else:
        weight = next(trainer.policies.old.parameters())
    return str(weight.dtype).removeprefix("torch.")


def vae_memory_format(trainer: Trainer) -> str | None:
    vae = getattr(trainer.model, "vae", None)
    if vae is None:
        return None
    conv = next(p for p in vae.parameters() if p.ndim == 4 and p.shape[-1] > 1)
    return "channels_last" if conv.is_contiguous(memory_format=torch.channels_last) else "contiguous"


def resolved_loss(trainer: Trainer) -> str:
    backend = trainer.config.nft.loss_backend
    if backend == "reference":
        return "torch, float64 adaptive weights"
    if backend == "auto":
        from fastnft_kernels import triton_available

        backend = "triton" if trainer.device.type == "cuda" and triton_available() else "torch"
    return f"{backend}, float32 adaptive weights"


def count_rows(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, int], Callable[[], None]]:
    """Rows (batch entries) through each module's forward, and calls under "<name>.calls";
    returns (counts, remove hooks)."""
    counts = dict.fromkeys(modules, 0) | dict.fromkeys((f"{name}.calls" for name in modules), 0)
    handles = []
    for name, module in modules.items():

        def hook(module, args, kwargs, name=name):
            first = kwargs.get("hidden_states", kwargs.get("input_ids", args[0] if args else None))
            counts[name] += first.shape[0]
            counts[f"{name}.calls"] += 1

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return counts, lambda: [h.remove() for h in handles]


def observe(trainer: Trainer) -> dict[str, Any]:
    """Every switch's observable state, from the live objects (not from the config)."""
    optimizer = trainer.optimizer
    return {
        "weight_dtype": frozen_weight_dtype(trainer),
        "autocast": None if trainer.autocast_dtype is None else str(trainer.autocast_dtype).removeprefix("torch."),
        "text_encoding": trainer.config.model.text_encoding,
        "loss": resolved_loss(trainer),
        "compiled_blocks": trainer.compiled_blocks,
        "attention": sorted(set(trainer.attention.values())),
        "vae_memory_format": vae_memory_format(trainer),
        "optimizer": f"{type(optimizer).__name__}" + (" (fused)" if optimizer.defaults.get("fused") else ""),
        "rollout_cuda_graphs": rollout_graph_state(trainer),
    }


def rollout_graph_state(trainer: Trainer) -> str:
    """Whether the rollout runs under CUDA graphs, with inductor's count of graphs it refused to
    record (a skip leaves that forward eager)."""
    if trainer.rollout_graph is None:
        return "off"
    return f"on, {torch._dynamo.utils.counters['inductor']['cudagraph_skips']} cudagraph skip(s)"


def count_iteration(trainer: Trainer) -> dict[str, float]:
    """Runs one iteration counting text-encoder rows and transformer rows per trained sample."""
    config = trainer.config
    transformers = {f"policy{i}": m for i, m in enumerate(trainer.policies.modules())}
    counts, remove = count_rows({**trainer.model.text_encoders(), **transformers})
    batch = trainer.iteration_batch(trainer.iteration)
    x0, text = trainer.roll_out(batch)
    _, optimality = trainer.rank(batch, x0)
    for name in transformers:
        counts[name] = counts[f"{name}.calls"] = 0
    trainer.train(x0, text, optimality.probability[batch.mine], trainer.iteration, batch.mine)
    remove()
    trained_times = int(config.nft.timestep_fraction * config.rollout.steps)
    pairs = -(-len(x0) // config.nft.micro_batch_size) * trained_times
    text_rows = max((counts[n] for n in trainer.model.text_encoders()), default=0)
    return {
        "text_encoder_rows_per_iteration": text_rows,
        "forwards_per_sample": sum(counts[n] for n in transformers) / (len(x0) * trained_times),
        "transformer_calls_per_pair": sum(counts[f"{n}.calls"] for n in transformers) / pairs,
    }


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phase(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Seconds per call: the first call (compile included), the median of `repeats` after
    `warmup` calls (the first counts as one), and peak memory on a GPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(warmup, 1) + repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    timed = times[max(warmup, 1) :] or times
    median = statistics.median(timed)
    q20, _, _, q80 = statistics.quantiles(timed, n=5) if len(timed) > 1 else (median,) * 4
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "first_s": times[0],
        "median_s": median,
        "q20_s": q20,
        "q80_s": q80,
        "compile_s": max(0.0, times[0] - median),
        "memory_gb": memory,
    }


class PhaseRunner:
    """One path's trainer and a fixed iteration: every phase repeats on the same inputs."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.batch = trainer.iteration_batch(0)
        self.x0 = self.text = self.probability = None
        config = trainer.config
        self.images = len(self.batch.mine)
        self.samples = self.images * int(config.nft.timestep_fraction * config.rollout.steps)

    def _roll_out(self) -> None:
        self.x0, self.text = self.trainer.roll_out(self.batch)

    def _rolled_out(self) -> torch.Tensor:
        """The rollout the later phases reuse (made on first need, so that the rollout phase's
        first call is the one that compiles)."""
        if self.x0 is None:
            self._roll_out()
        return self.x0

    def _train(self) -> None:
        if self.probability is None:
            _, optimality = self.trainer.rank(self.batch, self._rolled_out())
            self.probability = optimality.probability[self.batch.mine].to(self.trainer.device)
        self.trainer.train(self.x0, self.text, self.probability, 0, self.batch.mine)

    def phase(self, name: str) -> Callable[[], object]:
        return {
            "rollout": self._roll_out,
            "reward": lambda: self.trainer.rank(self.batch, self._rolled_out()),
            "train": self._train,
            "iteration": self.trainer.run_iteration,
        }[name]

    def work(self, name: str) -> int:
        return self.samples if name == "train" else self.images

    def count_flops(self) -> dict[str, float]:
        """FLOPs of each piece of an iteration: text, rollout sampling, decode + reward, train."""
        from torch.utils.flop_counter import FlopCounterMode

        trainer, batch = self.trainer, self.batch
        pieces = {
            "text": lambda: trainer.iteration_text(batch.prompts, batch.my_groups),
            "rollout": self._roll_out,
            "reward": lambda: trainer.rank(batch, self._rolled_out()),
            "train": self._train,
        }
        flops = {}
        for name, fn in pieces.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[name] = float(counter.get_total_flops())
        flops["rollout"] -= flops["text"]  # roll_out encodes the prompts too
        return flops


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measured_matmul_tflops(device: torch.device) -> float | None:
    """A large bf16 matmul's TFLOP/s on this GPU, measured now (None on a CPU)."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench

    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    milliseconds = do_bench(lambda: a @ b, warmup=25, rep=200)
    return 2 * n**3 / (milliseconds * 1e-3) / 1e12


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


# ---------------------------------------------------------------- the bench


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
    probe = load_config(preset_path(preset), ["logging.progress=false", *overrides])
    device = _device_of(probe)
    result: dict[str, Any] = {
        **{k: v for k, v in environment(device).items() if k in ("device", "commit", "date", "torch", "triton")},
        "preset": preset,
        "overrides": overrides,
        "phases": {},
        "compile_s": {},
        "seconds_per_call": {},
        "memory_gb": {},
        "switches": {},
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
        runner.phase("iteration")()  # warm: must compile nothing new
        state = observe(trainer)
        state.update(count_iteration(trainer))
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

    total = sum(flops.values())
    result["flop_shares"] = {name: value / total for name, value in flops.items()}
    result["flop_shares_sd35m"] = SD35M_FLOP_SHARES
    result["flops_per_image"] = {name: value / work.get("rollout", 1) for name, value in flops.items()}
    result["mfu"] = _mfu(flops, timings, work, device)

    if "iteration" in phases:
        result["switch_speedups"] = {}
        fast_seconds = timings["fast"]["iteration"]["median_s"]
        for name in applicable_switches(device) if flips is None else flips:
            trainer = fresh_trainer(bench_config(preset, overrides, "fast", device, flipped=name))
            timing = time_phase(trainer.run_iteration, device, warmup, repeats)
            result["switch_speedups"][name] = {
                "in_fast_path": fast_on(SWITCHES[name], device),
                "time_ratio_flipped": timing["median_s"] / fast_seconds,
            }
            del trainer
            release_memory()
    return result


def _device_of(config: Config) -> torch.device:
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _mfu(flops: dict[str, float], timings: dict, work: dict[str, int], device: torch.device) -> dict[str, Any] | None:
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


# ---------------------------------------------------------------- outputs


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(result))
    plot(result, out / "bench.png")


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# fastnft bench: preset `{result['preset']}` on {result['device']} (commit {result['commit']})",
        "",
        "| phase | reference | fast | speed-up | unit | compile s (fast) |",
        "|---|---|---|---|---|---|",
    ]
    for phase, row in result["phases"].items():
        compile_s = result["compile_s"][phase]["fast"]
        lines.append(
            f"| {phase} | {row['reference']:.3g} | {row['fast']:.3g} | {row['speedup']:.2f}x | {row['unit']} | "
            f"{compile_s:.1f} |"
        )
    if result.get("switch_speedups"):
        lines += ["", "| switch | in the fast path | iteration time with it flipped / fast |", "|---|---|---|"]
        lines += [
            f"| {name} | {'yes' if row['in_fast_path'] else 'no'} | {row['time_ratio_flipped']:.2f}x |"
            for name, row in result["switch_speedups"].items()
        ]
    shares = result["flop_shares"]
    lines += ["", "| FLOP share | this preset | SD3.5-M reference |", "|---|---|---|"]
    lines += [f"| {name} | {shares[name]:.1%} | {SD35M_FLOP_SHARES[name]:.1%} |" for name in SD35M_FLOP_SHARES]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speedups = {name: row["time_ratio_flipped"] for name, row in (result.get("switch_speedups") or {}).items()}
    figure, axes = plt.subplots(1, 2 if speedups else 1, figsize=(11 if speedups else 6, 3.6), squeeze=False)
    phases = list(result["phases"])
    ratio = [result["phases"][p]["speedup"] for p in phases]
    axes[0][0].bar(phases, ratio, color="tab:green")
    axes[0][0].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    axes[0][0].set_ylabel("fast / reference throughput")
    axes[0][0].set_title(f"{result['preset']} on {result['device']}")
    if speedups:
        axes[0][1].barh(list(speedups), list(speedups.values()), color="tab:blue")
        axes[0][1].axvline(1.0, color="gray", linestyle="--", linewidth=1)
        axes[0][1].set_xlabel("iteration time, switch flipped / fast path (> 1: the fast path's choice pays)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def ledger_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    context = {k: result[k] for k in ("device", "torch", "triton", "commit", "date")}
    benchmark = f"bench_{result['preset']}"
    rows = []
    for phase, row in result["phases"].items():
        for path in ("reference", "fast"):
            rows.append(
                {
                    **context,
                    "benchmark": benchmark,
                    "provider": path,
                    "shape": phase,
                    "metric": "throughput",
                    "value": f"{row[path]:.6g}",
                    "unit": row["unit"],
                }
            )
    for name, row in (result.get("switch_speedups") or {}).items():
        rows.append(
            {
                **context,
                "benchmark": benchmark,
                "provider": f"fast-flipped-{name}",
                "shape": "iteration",
                "metric": "time_ratio_flipped",
                "value": f"{row['time_ratio_flipped']:.4g}",
                "unit": "x",
            }
        )
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastnft bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="configs/NAME.yaml (package data): tiny, sd35m, sd35m-1024")
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
