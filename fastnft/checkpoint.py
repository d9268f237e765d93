"""Checkpoints of the full training state through torch.distributed.checkpoint (DCP).

A checkpoint holds the trained weights (LoRA adapter or full), the old policy, the EMA, the
optimizer (and GradScaler) state, the iteration, optimizer-step count, prompt position and config.
No RNG state: every random draw is keyed by (seed, iteration, image, purpose). Each checkpoint is
written to a temporary directory and renamed into place, so a run killed mid-write resumes from
the previous one; `keep_last` prunes older ones.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from fastnft.distributed import barrier, full_state_dict

CHECKPOINT_DIR = "checkpoints"
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


def _training_state(trainer: Any) -> dict[str, Any]:
    """The state DCP saves and loads in place (tensors alias the live ones)."""
    policies = trainer.policies
    options = StateDictOptions(ignore_frozen_params=True)
    state = {
        "trained": {name: p.detach() for name, p in policies.trained_parameters().items()},
        "old": {name: p.detach() for name, p in policies.old_parameters().items()},
        "ema": policies.ema,
        "optimizer": get_optimizer_state_dict(policies.transformer, trainer.optimizer, options=options),
        "meta": {
            "iteration": trainer.iteration,
            "optimizer_steps": trainer.optimizer_steps,
            "prompt_position": trainer.iteration * trainer.config.rollout.groups,
        },
    }
    if trainer.grad_scaler is not None:
        state["grad_scaler"] = trainer.grad_scaler.state_dict()
    return state


def save_checkpoint(trainer: Any, run_dir: Path, keep_last: int) -> Path:
    """Every rank writes its shards (one directory on a filesystem all ranks share); rank 0
    renames it into place and prunes."""
    world = trainer.world
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(trainer.iteration)
    temporary = root / f".tmp-{final.name}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    barrier(world)
    with _quiet_single_process():
        dcp.save(_training_state(trainer), checkpoint_id=str(temporary), no_dist=_single_process())
    barrier(world)
    if world.is_main:
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier(world)
    return final


def load_checkpoint(trainer: Any, path: Path) -> None:
    """Restores the training state of `trainer` in place from the checkpoint at path."""
    state = _training_state(trainer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=_single_process())
    options = StateDictOptions(ignore_frozen_params=True)
    set_optimizer_state_dict(
        trainer.policies.transformer, trainer.optimizer, optim_state_dict=state["optimizer"], options=options
    )
    if trainer.grad_scaler is not None:
        trainer.grad_scaler.load_state_dict(state["grad_scaler"])
    trainer.iteration = int(state["meta"]["iteration"])
    trainer.optimizer_steps = int(state["meta"]["optimizer_steps"])


def export_weights(trainer: Any, directory: Path) -> Path:
    """Writes the EMA weights under directory (rank 0): a LoRA in the layout the model family's
    diffusers pipeline loads with `load_lora_weights`, or the full transformer as
    `from_pretrained` loads it (gathered from the shards under FSDP2)."""
    from huggingface_hub import save_torch_state_dict
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    is_main = trainer.world.is_main
    with trainer.policies.ema_weights() as module:
        if not trainer.config.lora.enabled:
            state = full_state_dict(module, trainer.world)  # collective under FSDP2
            if is_main:
                module.save_config(directory / "transformer")
                pattern = "diffusion_pytorch_model{suffix}.safetensors"
                save_torch_state_dict(state, directory / "transformer", filename_pattern=pattern)
            return directory / "transformer"
        if not is_main:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        lora = get_peft_model_state_dict(module, adapter_name="default")
        lora = {name: t.detach().float().contiguous().clone() for name, t in lora.items()}
        metadata = module.peft_config["default"].to_dict()
    return trainer.model.save_lora(directory, lora, metadata)
