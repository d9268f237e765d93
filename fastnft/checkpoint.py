"""Checkpoints of the full training state through torch.distributed.checkpoint (DCP).

A checkpoint is a dict of Stateful parts (the trainer's `checkpoint_parts`: the policies'
trained, old and EMA weights, the update's optimizer, GradScaler and step count, the iteration);
the config sits beside it in the run directory. No RNG state: every random draw is keyed by
(seed, iteration, image, purpose). Each checkpoint is written to a temporary directory and
renamed into place, so a run killed mid-write resumes from the previous one; `keep_last` prunes
older ones.

Loading is safe on doctored files: `.metadata` is unpickled by an allowlist of DCP's own classes
and the non-tensor entries load weights-only, so a checkpoint cannot run code. A checkpoint that
does not read back (truncated, zeroed, missing metadata) raises CheckpointError naming it;
`load_latest` then falls back to the previous one.
"""

from __future__ import annotations

import io
import pickle
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.stateful import Stateful

from fastnft.config import ConfigError
from fastnft.distributed import World, any_rank, full_state_dict, is_sharded
from fastnft.models import ModelAdapter
from fastnft.policy import LoraPolicies, Policies

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ConfigError):
    """A checkpoint (or export) that cannot be read or written. A ConfigError, so the CLI reports
    it the same way: one line naming the path, exit 2."""


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
    prunes. A write that fails raises CheckpointError on every rank and leaves the older
    checkpoints as they were."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(iteration)
    temporary = root / f".tmp-{final.name}"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)

    def write() -> None:
        with _quiet_single_process():
            dcp.save(dict(parts), checkpoint_id=str(temporary), no_dist=_single_process())

    def publish() -> None:
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)

    # Rank 0 alone prepares and publishes; each step ends in a collective, so every rank learns
    # of a failure on any.
    for step, on_every_rank in ((prepare, False), (write, True), (publish, False)):
        failure = _attempt(step) if on_every_rank or world.is_main else None
        if any_rank(world, failure is not None):
            if world.is_main:
                shutil.rmtree(temporary, ignore_errors=True)
            reason = error_line(failure) if failure is not None else "failed on another rank"
            raise CheckpointError(f"checkpoint: cannot write {final}: {reason}")
    return final


def _attempt(step: Callable[[], None]) -> BaseException | None:
    try:
        step()
    except (Exception, CheckpointException) as error:
        return _cause(error)
    return None


def _cause(error: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (which wraps every error,
    a Ctrl-C too: that one is raised again rather than taken for a bad checkpoint)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    if not isinstance(error, Exception):
        raise error
    return error


def error_line(error: BaseException) -> str:
    """An error in one line: the exception's first line, or for torch.load's weights-only refusal (a page of
    advice) the reason that follows its marker."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for index, line in enumerate(lines):
        if line.startswith(marker):
            detail = line.removeprefix(marker).strip() or " ".join(lines[index + 1 : index + 2])
            return f"refused by the weights-only unpickler: {detail.split('. ')[0]}"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# What torch.distributed.checkpoint pickles into .metadata, found by tracing find_class over the
# checkpoints of LoRA, full fine-tuning and 8-bit optimizer runs. Nothing else is admitted:
# unpickling any other class or function could run code.
_METADATA = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    *(
        (_METADATA, name)
        for name in (
            "Metadata",
            "StorageMeta",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a torch.layout pickles as this lookup by name
    # StorageMeta.checkpoint_id is the path the checkpoint was written to (pathlib._local: 3.13+)
    *((module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "WindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class (refused to load it)")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is unpickled through the allowlist above. (Tensor
    entries are already read with torch.load(weights_only=True).)"""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        with path.open("rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner reads the non-tensor entries (ints, optimizer param_groups) with
    torch.load(weights_only=False); here they must pass the weights-only unpickler first."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        data = torch.load(value, weights_only=True)
        # Handed on re-serialised, so the default planner's own load sees only vetted data.
        vetted = io.BytesIO()
        torch.save(data, vetted)
        vetted.seek(0)
        super().load_bytes(read_item, vetted)


def check_checkpoint(path: Path) -> Metadata:
    """The checkpoint's metadata, after checking that it unpickles safely and that every file it
    names lies in the checkpoint directory and is long enough; CheckpointError names the bad file."""
    path = Path(path)
    metadata_path = path / ".metadata"
    if not metadata_path.is_file():
        raise CheckpointError(f"checkpoint: {metadata_path} is missing (not a complete checkpoint)")
    try:
        metadata = SafeFileSystemReader(str(path)).read_metadata()
    except Exception as error:
        raise CheckpointError(f"checkpoint: {metadata_path} is damaged or unsafe: {error_line(error)}") from None
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = str(getattr(info, "relative_path", ""))
        if not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"checkpoint: {metadata_path} names a file outside the checkpoint: {name!r}")
        if name not in sizes:
            file = path / name
            sizes[name] = file.stat().st_size if file.is_file() else -1
        if sizes[name] < 0:
            raise CheckpointError(f"checkpoint: {path / name} is missing")
        if info.offset + info.length > sizes[name]:
            raise CheckpointError(f"checkpoint: {path / name} is truncated ({sizes[name]} bytes)")
    return metadata


def load_checkpoint(parts: dict[str, Stateful], path: Path) -> None:
    """Restores each part in place (DCP calls its load_state_dict); a checkpoint may hold more
    parts than asked for (inference loads the policies alone). CheckpointError names a
    checkpoint that does not read back; no code in the files runs."""
    check_checkpoint(path)
    try:
        with _quiet_single_process():
            dcp.load(
                dict(parts),
                storage_reader=SafeFileSystemReader(str(path)),
                planner=WeightsOnlyLoadPlanner(),
                no_dist=_single_process(),
            )
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"checkpoint: {path} does not load: {error_line(_cause(error))}") from None


def warn(message: str) -> None:
    """A warning line on stderr, from rank 0 only."""
    if _single_process() or torch.distributed.get_rank() == 0:
        print(f"fastnft: warning: {message}", file=sys.stderr, flush=True)


def load_latest(parts: dict[str, Stateful], run_dir: Path) -> Path | None:
    """Loads the newest checkpoint of the run that reads back, warning about each newer one that
    does not; None when the run has no checkpoint. CheckpointError when none loads."""
    found = list_checkpoints(run_dir)
    for index in range(len(found) - 1, -1, -1):
        try:
            load_checkpoint(parts, found[index])
            return found[index]
        except CheckpointError as error:
            if index == 0:
                older = f"; no checkpoint in {found[0].parent} loads" if len(found) > 1 else ""
                raise CheckpointError(f"{error}{older}") from None
            warn(f"{error}; falling back to {found[index - 1].name}")
    return None


def load_from(parts: dict[str, Stateful], source: Path) -> Path:
    """`source` is a checkpoint (loaded as it is) or a run directory (its newest checkpoint that
    loads, as load_latest); returns the checkpoint loaded."""
    source = Path(source)
    if source.parent.name == CHECKPOINT_DIR:
        load_checkpoint(parts, source)
        return source
    loaded = load_latest(parts, source)
    if loaded is None:
        raise CheckpointError(f"checkpoint: {source} has no checkpoint yet")
    return loaded


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
        full = full_state_dict(module, world) if is_sharded(module) else None  # collective under FSDP2
        if not world.is_main:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        lora = get_peft_model_state_dict(module, state_dict=full, adapter_name="default")
        lora = {name: t.detach().float().contiguous().clone() for name, t in lora.items()}
        metadata = module.peft_config["default"].to_dict()
        # peft keeps target_modules as a set: sorted, identical runs export identical bytes
        metadata["target_modules"] = sorted(metadata["target_modules"])
    return model.save_lora(directory, lora, metadata)
