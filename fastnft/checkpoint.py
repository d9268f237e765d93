"""Checkpoints of the full training state through torch.distributed.checkpoint (DCP).

A checkpoint is a dict of Stateful parts (the trainer's `checkpoint_parts`: the policies'
trained, old and EMA weights, the update's optimizer, GradScaler and step count, the iteration);
the config sits beside it in the run directory. No RNG state: every random draw is keyed by
(seed, iteration, image, purpose). Each checkpoint is written to a temporary directory and
renamed into place, so a run killed mid-write resumes from the previous one; `keep_last` prunes
older ones.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from fastnft.distributed import World, barrier, full_state_dict
from fastnft.models import ModelAdapter
from fastnft.policy import LoraPolicies, Policies

CHECKPOINT_DIR = "checkpoints"


class Progress:
    """The run's position, a checkpoint part: the number of completed iterations."""

    def __init__(self) -> None:
        self.iteration = 0

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iteration = int(state["iteration"])


NAME = re.compile(r"^iteration_(\d{6})$")


def checkpoint_name(iteration: int) -> str:
    return f"iteration_{iteration:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are not listed)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _single_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save and load, which is a supported use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(parts: dict[str, Stateful], run_dir: Path, iteration: int, world: World, keep_last: int) -> Path:
    """Saves every part's state_dict as checkpoints/iteration_NNNNNN. Every rank writes its
    shards (one directory on a filesystem all ranks share); rank 0 renames it into place and
    prunes."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(iteration)
    temporary = root / f".tmp-{final.name}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    barrier(world)
    with _quiet_single_process():
        dcp.save(dict(parts), checkpoint_id=str(temporary), no_dist=_single_process())
    barrier(world)
    if world.is_main:
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier(world)
    return final


def load_checkpoint(parts: dict[str, Stateful], path: Path) -> None:
    """Restores each part in place (DCP calls its load_state_dict); a checkpoint may hold more
    parts than asked for (inference loads the policies alone)."""
    with _quiet_single_process():
        dcp.load(dict(parts), checkpoint_id=str(path), no_dist=_single_process())


def export_weights(policies: Policies, model: ModelAdapter, world: World, directory: Path) -> Path:
    """Writes the EMA weights under directory (rank 0): a LoRA in the layout the model family's
    diffusers pipeline loads with `load_lora_weights`, or the full transformer as
    `from_pretrained` loads it (gathered from the shards under FSDP2)."""
    from huggingface_hub import save_torch_state_dict
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    with policies.ema_weights() as module:
        if not isinstance(policies, LoraPolicies):
            state = full_state_dict(module, world)  # collective under FSDP2
            if world.is_main:
                module.save_config(directory / "transformer")
                pattern = "diffusion_pytorch_model{suffix}.safetensors"
                save_torch_state_dict(state, directory / "transformer", filename_pattern=pattern)
            return directory / "transformer"
        if not world.is_main:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        lora = get_peft_model_state_dict(module, adapter_name="default")
        lora = {name: t.detach().float().contiguous().clone() for name, t in lora.items()}
        metadata = module.peft_config["default"].to_dict()
    return model.save_lora(directory, lora, metadata)
