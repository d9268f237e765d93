"""Model adapters by `model.kind`."""

from __future__ import annotations

import torch

from fastnft.config import ModelConfig
from fastnft.models.adapter import ModelAdapter, TextEmbedding
from fastnft.models.presets import SYNTHETIC_TEXT_PRESETS

__all__ = ["ModelAdapter", "TextEmbedding", "build_model"]


def build_model(config: ModelConfig, seed: int, device: torch.device, weight_dtype: torch.dtype) -> ModelAdapter:
    if config.kind == "sd3" and config.preset in SYNTHETIC_TEXT_PRESETS:
        from fastnft.models.synthetic import SyntheticTextSD3Adapter

        return SyntheticTextSD3Adapter.from_config(config, seed, device, weight_dtype)
    if config.kind == "sd3":
        from fastnft.models.sd3 import SD3Adapter

        return SD3Adapter.from_config(config, seed, device, weight_dtype)
    if config.kind == "sd3-pixel":
        from fastnft.models.sd3_pixel import SD3PixelAdapter

        return SD3PixelAdapter.from_config(config, seed, device, weight_dtype)
    raise ValueError(f"model.kind: unknown model kind {config.kind!r}")
