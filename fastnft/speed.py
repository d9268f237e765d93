"""Speed switches applied to the transformer by small functions, each a config field:
the attention implementation, regional torch.compile, CUDA graphs for the rollout sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from fastnft.config import CompileConfig, ConfigError
from fastnft.models.adapter import repeated_blocks


@dataclass
class SpeedReport:
    """What the speed switches did to a run's modules, as they returned it (the bench records it
    beside what it observes on the live objects)."""

    attention: dict[str, str] = field(default_factory=dict)  # the processor on each attention layer
    compiled_blocks: int = 0  # blocks under regional torch.compile, over every policy module
    rollout_cuda_graphs: bool = False
    autocast: torch.dtype | None = None  # fp16 autocast of the reference precision on a GPU


SDPA_BACKENDS = {
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}


class _FlashAttention(TorchFunctionMode):
    """Routes SDPA calls (layout [B, H, L, D], no mask) to flash-attn's kernel ([B, L, H, D])."""

    def __init__(self, flash_attn_func) -> None:
        super().__init__()
        self.flash_attn_func = flash_attn_func

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) == 3:
            query, key, value = (x.transpose(1, 2) for x in args)
            causal = kwargs.get("is_causal", False)
            return self.flash_attn_func(query, key, value, causal=causal).transpose(1, 2)
        return func(*args, **kwargs)


class AttentionBackend:
    """Wraps a model's own attention processor: runs it with a chosen SDPA backend, or with
    flash-attn in place of SDPA. The model's attention math itself is untouched."""

    def __init__(self, processor, name: str) -> None:
        self.processor = processor
        self.name = name
        if name == "flash-attn":
            try:
                from flash_attn import flash_attn_func
            except ImportError as error:
                raise ConfigError(
                    "model.attention: flash-attn is not installed (pip install 'fastnft[flash]'; it builds "
                    "from source against your CUDA torch), or use sdpa-cudnn"
                ) from error
            self.context = lambda: _FlashAttention(flash_attn_func)
        else:
            self.context = lambda: sdpa_kernel(SDPA_BACKENDS[name])

    def __call__(self, *args, **kwargs):
        with self.context():
            return self.processor(*args, **kwargs)


def apply_attention(transformer: nn.Module, name: str) -> dict[str, str]:
    """Installs the attention implementation `name` with set_attn_processor; returns the
    processor installed on each attention layer (recorded in bench results)."""
    if name != "sdpa":
        processors = transformer.attn_processors
        transformer.set_attn_processor({key: AttentionBackend(p, name) for key, p in processors.items()})
    return {key: getattr(p, "name", type(p).__name__) for key, p in transformer.attn_processors.items()}


def apply_compile(transformer: nn.Module, config: CompileConfig) -> int:
    """Regional compile: each repeated transformer block compiles on its own (a short compile,
    shared across the policies' roles). Returns the number of compiled blocks."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = config.recompile_limit
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 8 * config.recompile_limit)
    try:
        blocks = repeated_blocks(transformer)
    except ValueError as error:
        raise ConfigError(f"compile.enabled: {error} to compile") from None
    for block in blocks:
        block.compile(backend=config.backend, mode=config.mode)
    return len(blocks)


class CudaGraphRollout:
    """The rollout sampler's transformer under CUDA graphs (rollout.cuda_graphs): torch.compile's
    mode="reduce-overhead" records the forward of each (role, batch shape) once and replays it on
    every sampler step, so a step costs one graph launch instead of hundreds of kernel launches.

    Sound for the trainer's weights because every update (optimizer, old-policy soft update, EMA
    swap) writes the parameters in place: a replay reads the current values. Each call starts a
    new cudagraph-tree step and returns copies, so no output is overwritten by the next replay.
    `backend` other than inductor compiles without graphs (the CPU check of this wrapper)."""

    def __init__(self, module: nn.Module, backend: str = "inductor") -> None:
        self.module = module  # ModelAdapter.velocity reads the weight dtype from .module
        mode = "reduce-overhead" if backend == "inductor" else None
        self.compiled = torch.compile(module, backend=backend, mode=mode, dynamic=False)

    def __call__(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(output.clone() for output in self.compiled(*args, **kwargs))
