"""The speed switches the bench compares, the config of each path, and each switch's state as
it shows on a live trainer (what the switches reported, and what the objects say)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from fastnft.config import Config, ConfigError, load_config
from fastnft.trainer import Trainer


@dataclass(frozen=True)
class Switch:
    """One speed switch: a config field, its fast and reference values, the state it shows."""

    field: str
    fast: Any
    reference: Any
    state: str  # the key of `observe` (or `count_iteration`) that must change when the switch flips
    cuda_only: bool = False  # means nothing on a CPU (e.g. cuDNN attention)
    applies: Callable[[Config], bool] = lambda config: True  # the config refuses the switch where it is false
    fast_on_cpu: bool = True  # part of the CPU fast path (measured: bf16 weights slow small CPU models)


SWITCHES = {
    "bf16_weights": Switch("model.precision", "bf16", "reference", "weight_dtype", fast_on_cpu=False),
    "text_cache": Switch("model.text_encoding", "cached", "per_image", "text_encoder_rows_per_iteration"),
    "loss": Switch("nft.loss_backend", "auto", "reference", "loss"),
    "compile": Switch("compile.enabled", True, False, "compiled_blocks"),
    "attention": Switch("model.attention", "sdpa-cudnn", "sdpa", "attention", cuda_only=True),
    "vae_channels_last": Switch("model.vae_channels_last", True, False, "vae_memory_format"),
    "fused_adamw": Switch("optim.fused", True, False, "optimizer", applies=lambda config: config.optim.name == "adamw"),
    "batch_old_ref": Switch(
        "nft.batch_old_ref", True, False, "transformer_calls_per_pair", applies=lambda config: config.lora.enabled
    ),
    "rollout_cuda_graphs": Switch("rollout.cuda_graphs", True, False, "rollout_cuda_graphs", cuda_only=True),
}


def applicable_switches(device: torch.device, config: Config) -> dict[str, Switch]:
    """The switches that mean something on this device for this config (the preset's, before
    the paths' overrides)."""
    return {name: s for name, s in SWITCHES.items() if (device.type == "cuda" or not s.cuda_only) and s.applies(config)}


def fast_on(switch: Switch, device: torch.device) -> bool:
    """Whether the fast path on this device turns the switch on."""
    return device.type == "cuda" or switch.fast_on_cpu


def path_overrides(path: str, device: torch.device, config: Config, flipped: str | None = None) -> list[str]:
    """Overrides for path "reference" or "fast", optionally with the switch `flipped` the other way."""
    overrides = []
    for name, switch in applicable_switches(device, config).items():
        on = path == "fast" and fast_on(switch, device)
        value = switch.fast if on != (name == flipped) else switch.reference
        overrides.append(f"{switch.field}={json.dumps(value)}")
    return overrides


def preset_path(name: str) -> Path:
    configs = files("fastnft.configs")
    path = Path(str(configs / f"{name}.yaml"))
    if not path.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in configs.iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"--preset: no preset {name!r}; known: {', '.join(known)}")
    return path


def bench_config(
    preset: str, overrides: list[str], path: str, device: torch.device, flipped: str | None = None
) -> Config:
    quiet = ["logging.progress=false", "logging.tensorboard=false", *overrides]
    config = load_config(preset_path(preset), quiet)
    return load_config(preset_path(preset), [*quiet, *path_overrides(path, device, config, flipped)])


def frozen_weight_dtype(trainer: Trainer) -> str:
    """The dtype of the weights the no-grad policies run with (LoRA: the base; full: the old copy):
    the first weight that is neither a LoRA factor nor one of those a diffusers class keeps in
    float32 whatever the precision (its _keep_in_fp32_modules: Wan's modulation tables and norms)."""
    transformer = trainer.model.transformer
    keep = set(getattr(getattr(transformer, "module", transformer), "_keep_in_fp32_modules", None) or ())
    with trainer.policies.role("old") as old:
        weight = next(p for n, p in old.named_parameters() if ".lora_" not in n and not keep & set(n.split(".")))
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


def rollout_graph_state(trainer: Trainer) -> str:
    """Whether the rollout runs under CUDA graphs, with inductor's count of graphs it refused to
    record (a skip leaves that forward eager)."""
    if not trainer.speed.rollout_cuda_graphs:
        return "off"
    return f"on, {torch._dynamo.utils.counters['inductor']['cudagraph_skips']} cudagraph skip(s)"


def observe(trainer: Trainer) -> dict[str, Any]:
    """Every switch's state: what the switches reported (trainer.speed) and what the live
    objects show (weight dtypes, memory formats, the optimizer)."""
    optimizer = trainer.update.optimizer
    speed = trainer.speed
    return {
        "weight_dtype": frozen_weight_dtype(trainer),
        "autocast": None if speed.autocast is None else str(speed.autocast).removeprefix("torch."),
        "text_encoding": trainer.config.model.text_encoding,
        "loss": resolved_loss(trainer),
        "compiled_blocks": speed.compiled_blocks,
        "attention": sorted(set(speed.attention.values())),
        "vae_memory_format": vae_memory_format(trainer),
        "optimizer": f"{type(optimizer).__name__}" + (" (fused)" if optimizer.defaults.get("fused") else ""),
        "rollout_cuda_graphs": rollout_graph_state(trainer),
    }


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
