"""Optimizers: torch AdamW (default), and 8-bit AdamW from bitsandbytes or torchao, which save
memory for full fine-tuning (they do not make a step faster, and change nothing for LoRA)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

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


def _is_quantized(value: object) -> bool:
    """A quantized optimizer state: a tensor subclass holding its values in inner tensors
    (torchao's 8-bit codes and block scales)."""
    return (
        isinstance(value, Tensor)
        and not isinstance(value, DTensor)
        and type(value) is not Tensor
        and is_traceable_wrapper_subclass(value)
    )


def quantized_parts(value: object) -> object:
    """A quantized state as a checkpoint can hold it: its inner tensors, stored as they are (DCP
    would store the dequantized fp32 view, 4 bytes per value instead of about 1). A state sharded
    by FSDP2 (a DTensor around a quantized shard) is stored dequantized, as a plain DTensor, which
    DCP reshards for any number of processes. Any other value is returned unchanged."""
    if isinstance(value, DTensor):
        local = value.to_local()
        if not _is_quantized(local):
            return value
        return DTensor.from_local(
            local.dequantize(), value.device_mesh, value.placements, shape=value.shape, stride=value.stride()
        )
    if not _is_quantized(value):
        return value
    names, _ = value.__tensor_flatten__()
    return {name: getattr(value, name) for name in names}


def from_quantized_parts(parts: object, like: object) -> object:
    """Undoes quantized_parts, given `like`, the live state of the same parameter: rebuilds its
    subclass around the loaded inner tensors, or quantizes a loaded shard into it."""
    if isinstance(like, DTensor) and _is_quantized(like.to_local()):
        like.to_local().copy_(parts.to_local())
        return like
    if not _is_quantized(like):
        return parts
    names, context = like.__tensor_flatten__()
    return type(like).__tensor_unflatten__({name: parts[name] for name in names}, context, like.shape, like.stride())
