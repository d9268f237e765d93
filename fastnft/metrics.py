"""The run's records: metrics.jsonl (one row per iteration, separate evaluation rows),
TensorBoard events, and run.json (versions, commit, device, command line)."""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from fastnft.config import ConfigError
from fastnft_kernels.benchmarking import environment


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_rows(path: Path, iteration: int) -> None:
    """Keeps the rows of metrics.jsonl up to `iteration`. A last line that does not parse is what
    a kill during its write leaves: dropped with a warning. A bad line elsewhere is damage this
    cannot repair: a ConfigError naming it, with the file left as it was."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()  # a torn line may end mid-character
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse_row(line)
        if row is None and number == len(lines):
            print(f"fastnft: warning: {path}: dropped a torn last line (line {number})", file=sys.stderr)
            continue
        if row is None:
            raise ConfigError(f"metrics: {path} line {number} is not a JSON row with an iteration")
        if row["iteration"] <= iteration:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def _parse_row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("iteration"), int) else None


class MetricsLog:
    """metrics.jsonl, mirrored to TensorBoard and (optionally) Weights & Biases."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, wandb_config: dict[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.wandb_run = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_config is not None:
            try:
                import wandb
            except ImportError as error:
                raise ConfigError("logging.wandb: needs wandb: pip install 'fastnft[wandb]'") from error
            self.wandb_run = wandb.init(
                project="fastnft",
                dir=str(run_dir),
                config=wandb_config,
                resume="allow",
                id=Path(run_dir).resolve().name,
            )

    def truncate_after(self, iteration: int) -> None:
        """Drops rows of iterations after `iteration` (work a resumed run redoes)."""
        truncate_rows(self.path, iteration)

    def append(self, row: dict[str, Any]) -> None:
        row = {key: _clean(value) for key, value in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "iteration" and isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, row["iteration"])
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=row["iteration"])

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class NullLog:
    """The log of ranks other than 0: they compute every metric, rank 0 writes them."""

    def truncate_after(self, iteration: int) -> None:
        pass

    def append(self, row: dict[str, Any]) -> None:
        pass

    def rows(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        pass


def write_run_info(run_dir: Path, device: torch.device, argv: list[str], processes: int = 1) -> None:
    """run.json: the kernel package's environment probe (device, torch, triton, commit, date)
    plus the command line, the model libraries' versions and the process count."""
    import diffusers
    import peft
    import transformers

    info = {
        "command": [Path(sys.argv[0]).name, *argv],
        "python": platform.python_version(),
        **environment(device, checkout=Path(__file__)),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "processes": processes,
        "host": platform.node(),
    }
    (Path(run_dir) / "run.json").write_text(json.dumps(info, indent=2) + "\n")
