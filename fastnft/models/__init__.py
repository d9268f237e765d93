"""Model adapters by `model.kind`, and the one place that names the families: `resolve_kind`
turns `model.kind: auto` into a family (presets imply theirs; a pipeline directory names its
pipeline class in model_index.json), `check_model_rules` checks the config rules of the family
before anything loads, and `build_model` loads the adapter."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastnft.config import Config, ConfigError, ModelConfig
from fastnft.models.adapter import ModelAdapter, ModelTraits, TextEmbedding
from fastnft.models.presets import SYNTHETIC_TEXT_PRESETS

__all__ = ["ModelAdapter", "ModelTraits", "TextEmbedding", "build_model", "check_model_rules", "resolve_kind"]


@dataclass(frozen=True)
class Family:
    adapter: str  # "module:Class", imported only when the family is used
    pipeline_class: str | None  # model_index.json's _class_name; None: a layout of its own, no index


FAMILIES = {
    "sd3": Family("fastnft.models.sd3:SD3Adapter", "StableDiffusion3Pipeline"),
    "sd3-pixel": Family("fastnft.models.sd3_pixel:SD3PixelAdapter", None),
    "flux": Family("fastnft.models.flux:FluxAdapter", "FluxPipeline"),
    "qwen-image": Family("fastnft.models.qwen_image:QwenImageAdapter", "QwenImagePipeline"),
    "wan": Family("fastnft.models.wan:WanAdapter", "WanPipeline"),
}
PLANNED: dict[str, str] = {}  # pipeline class -> kind: named in errors, not implemented
PRESET_KINDS = {  # the family of each preset in presets.PRESETS
    "tiny-sd3": "sd3",
    "sd35m": "sd3",
    "flux-dev": "flux",
    "qwen-image": "qwen-image",
    "wan2.1-1.3b": "wan",
    "wan2.1-14b": "wan",
}
INDEX = "model_index.json"


def _supported() -> str:
    return ", ".join(f"{f.pipeline_class} ({kind})" for kind, f in FAMILIES.items() if f.pipeline_class)


def read_json(path: Path, field: str) -> dict[str, Any]:
    """A small JSON file of a model directory as a dict, or a ConfigError naming `field` and the file."""
    if not path.is_file():
        raise ConfigError(f"{field}: {path} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{field}: {path} is not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{field}: {path} does not hold a JSON object")
    return data


def pipeline_class(root: Path) -> str:
    """The _class_name of the pipeline directory `root` (from its model_index.json)."""
    index = root / INDEX
    if not index.is_file():
        raise ConfigError(
            f"model.path: {index} not found (model.kind auto reads the pipeline class from it; "
            f"or set model.kind to one of {', '.join(FAMILIES)})"
        )
    name = read_json(index, "model.path").get("_class_name")
    if not isinstance(name, str):
        raise ConfigError(f"model.path: {index} names no pipeline class (_class_name)")
    return name


def resolve_kind(config: ModelConfig) -> str:
    """model.kind, with auto resolved: a preset's family, else the family of the pipeline class
    in model.path's model_index.json. An explicit kind is checked against that index when there
    is one."""
    if config.preset is not None:  # presets win over a path, as the loaders do
        if config.preset not in PRESET_KINDS:
            raise ConfigError(f"model.preset: unknown preset {config.preset!r}; known: {', '.join(PRESET_KINDS)}")
        kind = PRESET_KINDS[config.preset]
        if config.kind not in ("auto", kind):
            raise ConfigError(f"model.kind: preset {config.preset} is a {kind} model, not {config.kind}")
        return kind
    if config.path is None:
        raise ConfigError("model.path: set a local pipeline directory (or model.preset for random-init components)")
    root = Path(config.path)
    if config.kind != "auto":
        if FAMILIES[config.kind].pipeline_class is not None and (root / INDEX).is_file():
            found = pipeline_class(root)
            expected = FAMILIES[config.kind].pipeline_class
            if found != expected:
                raise ConfigError(
                    f"model.kind: {config.kind} loads a {expected} directory, but {root / INDEX} names {found} "
                    "(model.kind auto picks the family from it)"
                )
        return config.kind
    name = pipeline_class(root)
    for kind, family in FAMILIES.items():
        if family.pipeline_class == name:
            return kind
    if name in PLANNED:
        raise ConfigError(
            f"model.path: {root / INDEX} holds a {name} ({PLANNED[name]}), which fastnft does not support yet; "
            f"supported: {_supported()}"
        )
    raise ConfigError(
        f"model.path: {root / INDEX} holds a {name}, which fastnft does not support; supported: {_supported()}"
    )


def adapter_class(kind: str) -> type[ModelAdapter]:
    module, _, name = FAMILIES[kind].adapter.partition(":")
    return getattr(importlib.import_module(module), name)


def check_model_rules(config: Config) -> None:
    """The config rules that depend on the model's family (model.kind, auto resolved from the
    pipeline directory), read from its small config files before anything loads. config.py
    cannot check them (the families live above it): the CLI calls this right after loading a
    config, and the trainer before it builds the model."""
    kind = resolve_kind(config.model)
    traits = adapter_class(kind).traits(kind, config.model)
    if config.rollout.shift is not None and traits.dynamic_shift:
        raise ConfigError(
            f"rollout.shift: this {kind} model shifts its grid by the image size (its scheduler's "
            "use_dynamic_shifting); leave rollout.shift unset"
        )
    if config.model.guidance is not None and not traits.embedded_guidance:
        raise ConfigError(
            f"model.guidance: this {kind} transformer takes no guidance input (FLUX.1-dev's distilled "
            "guidance); classifier-free guidance is rollout.guidance_scale"
        )
    check_frames(config, kind, traits)


def check_frames(config: Config, kind: str, traits: ModelTraits) -> None:
    """model.frames and rewards[].frames against the samples: an image family makes one frame;
    a video family checked model.frames against its VAE's temporal stride in its traits."""
    if not traits.video and config.model.frames not in (None, 1):
        raise ConfigError(f"model.frames: this {kind} model makes images (1 frame); got {config.model.frames}")
    for number, reward in enumerate(config.rewards):
        if reward.frames is not None and reward.frames > traits.frames:
            samples = f"{traits.frames}-frame videos" if traits.video else f"images (this {kind} model's samples)"
            raise ConfigError(f"rewards[{number}].frames: {reward.frames} frames of {samples}")


def build_model(config: ModelConfig, seed: int, device: torch.device, weight_dtype: torch.dtype) -> ModelAdapter:
    kind = resolve_kind(config)
    if config.preset in SYNTHETIC_TEXT_PRESETS:
        from fastnft.models.synthetic import synthetic_text_adapter

        return synthetic_text_adapter(kind).from_config(config, seed, device, weight_dtype)
    return adapter_class(kind).from_config(config, seed, device, weight_dtype)
