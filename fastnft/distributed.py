"""More than one process: torch.distributed as torchrun launches it (one process per device),
DDP for LoRA, FSDP2 for full fine-tuning. No home-made engine.

The config states the GLOBAL recipe (rollout.groups x rollout.group_size images per iteration,
nft.micro_batch_size per device). `image_shard` hands each rank its images so that every optimizer
step trains on the same images whatever the number of processes; every random draw is keyed by
global image index (fastnft.rng), so the same config is the same algorithm at N = 1, 2 or 8.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastnft.config import Config, ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run (size 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(config: Config) -> World:
    """Joins the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR);
    a single process needs no process group."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = resolve_device(config.device).type == "cuda"
        backend = config.dist.backend if config.dist.backend != "auto" else ("nccl" if cuda else "gloo")
        if backend == "nccl" and not cuda:
            raise ConfigError("dist.backend: nccl needs CUDA devices; use gloo on CPU")
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend)
    return world


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """The device of this process for `device` (auto | cpu | cuda): under torchrun, the GPU of
    its local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if world is not None and world.size > 1:
        return torch.device("cuda", world.local_rank)
    return torch.device("cuda", torch.cuda.current_device())


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def image_shard(images: int, optimizer_steps: int, world: World) -> list[int]:
    """The global indices of this rank's images: each optimizer step's block of images is cut
    into world.size equal slices, so a step sees the same images on any number of processes."""
    per_step = images // optimizer_steps
    share = per_step // world.size
    return [step * per_step + world.rank * share + j for step in range(optimizer_steps) for j in range(share)]


def even_shard(count: int, world: World) -> tuple[list[int], int]:
    """(indices, real) for work that every rank must run in equal amounts (FSDP2 forwards are
    collective): ceil(count / size) indices per rank, the last ones padded by repeating index 0;
    only the first `real` are this rank's own."""
    per_rank = -(-count // world.size)
    start = world.rank * per_rank
    real = max(0, min(count - start, per_rank))
    return [start + j for j in range(real)] + [0] * (per_rank - real), real


def gather_rows(world: World, rows: dict[str, Tensor], indices: list[int], count: int) -> dict[str, Tensor]:
    """Every rank's rows (row i of each tensor belongs to global index indices[i]) assembled in
    global order [count, ...] on every rank, on the CPU."""
    rows = {key: value.detach().cpu() for key, value in rows.items()}
    if world.size == 1:
        parts = [(indices, rows)]
    else:
        parts = [None] * world.size
        dist.all_gather_object(parts, (indices, rows))
    template = parts[0][1]
    out = {key: value.new_zeros((count, *value.shape[1:])) for key, value in template.items()}
    for part_indices, part_rows in parts:
        for key, value in part_rows.items():
            out[key][torch.tensor(part_indices, dtype=torch.long)] = value
    return out


def mean_over_ranks(world: World, values: Tensor) -> Tensor:
    """The mean of each entry over the ranks (each rank held an equal share), on the device."""
    if world.size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world.size


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when it is true on any (a stop request must stop all ranks together)."""
    if world.size == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


# ---------------------------------------------------------------- wrapping the trained module


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the parameters that require grad (freeze everything else BEFORE wrapping)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # Buffers (positional tables) are identical on every rank: no broadcast before each forward.
    # torch >= 2.13 renames the switch.
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in accepted else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(module, device_ids=device_ids, **no_buffer_sync)


def shard_fsdp2(module: nn.Module, blocks: list[nn.Module], param_dtype: torch.dtype) -> None:
    """FSDP2 in place: fully_shard each repeated block, then the root; compute in param_dtype,
    gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    # The root reshards after forward too: the no-grad policies never run a backward, and the
    # old-policy and EMA updates must find the sharded parameters registered.
    fully_shard(module, mp_policy=policy, reshard_after_forward=True)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def gradient_sync(module: nn.Module, enabled: bool):
    """Context for one forward-backward: with enabled=False, gradients accumulate locally
    (DDP no_sync, FSDP2 set_requires_gradient_sync) until a micro-step that syncs."""
    if enabled:
        return nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    if is_sharded(module):
        return _fsdp_no_sync(module)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def full_state_dict(module: nn.Module, world: World) -> dict[str, Tensor]:
    """The whole module's state on the CPU of rank 0 (gathered from the shards under FSDP2;
    the other ranks get an empty dict)."""
    if not is_sharded(module):
        return {key: value.detach().cpu() for key, value in module.state_dict().items()} if world.is_main else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a parameter sharded over more ranks than its first dimension has rows (Wan's [1, 2, D]
    # scale_shift_table) comes back as a view into the padded gather buffer, which safetensors refuses
    return {key: v if v.untyped_storage().nbytes() == v.nbytes else v.clone() for key, v in state.items()}
