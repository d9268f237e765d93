"""Optimizers: torch AdamW (default), and 8-bit AdamW from bitsandbytes or torchao, which save
memory for full fine-tuning (they do not make a step faster, and change nothing for LoRA)."""

from __future__ import annotations

import torch
from torch import nn

from fastnft.config import ConfigError, OptimConfig


def build_optimizer(config: OptimConfig, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    options = dict(lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay, eps=config.eps)
    if config.name == "adamw":
        return torch.optim.AdamW(parameters, fused=config.fused or None, **options)
    if config.name == "adamw8bit-bnb":
        try:
            import bitsandbytes
        except ImportError as error:
            raise ConfigError("optim.name: adamw8bit-bnb needs bitsandbytes: pip install 'fastnft[bnb]'") from error
        return bitsandbytes.optim.AdamW8bit(parameters, **options)
    if config.name == "adamw8bit-torchao":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as error:
            raise ConfigError("optim.name: adamw8bit-torchao needs torchao: pip install 'fastnft[torchao]'") from error
        return AdamW8bit(parameters, bf16_stochastic_round=config.bf16_stochastic_round, **options)
    raise ConfigError(f"optim.name: unknown optimizer {config.name!r}")
