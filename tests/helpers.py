"""Shared test helpers."""

import json
from pathlib import Path

import torch

from fastnft.checkpoint import latest_checkpoint, load_checkpoint
from fastnft.cli import default_config_path, main
from fastnft.config import Config, load_config
from fastnft.run import train
from fastnft.trainer import Trainer

TINY_CONFIG = default_config_path().parent / "tiny.yaml"


def tiny_config(overrides: list[str] = (), *, iterations: int | None = None) -> Config:
    """configs/tiny.yaml without progress bars, plus overrides."""
    extra = ["logging.progress=false", "logging.tensorboard=false"]
    if iterations is not None:
        extra.append(f"iterations={iterations}")
    return load_config(TINY_CONFIG, [*extra, *overrides])


TIMING_KEYS = {"time_rollout", "time_reward", "time_train", "images_per_sec"}


def snapshot(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the weights of each policy and of the optimizer's state (8-bit states
    dequantized, bitsandbytes' nested entries flattened)."""

    def flatten(prefix: str, value) -> dict[str, torch.Tensor]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flatten(f"{prefix}.{key}", item).items()}
        if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor:  # torchao's 8-bit state
            value = value.dequantize()
        return {prefix: torch.as_tensor(value).float().clone()}

    policies = trainer.policies
    return {
        "trained": {k: v.detach().clone() for k, v in policies.trained_parameters().items()},
        "old": {k: v.detach().clone() for k, v in policies.old_parameters().items()},
        "ema": {k: v.clone() for k, v in policies.ema.items()},
        "optimizer": flatten("state", trainer.update.optimizer.state_dict()["state"]),
    }


def assert_bitwise_equal(first: dict, second: dict) -> None:
    for group in first:
        assert first[group].keys() == second[group].keys(), group
        for name in first[group]:
            assert torch.equal(first[group][name], second[group][name]), f"{group}/{name} differs"


def metrics_rows(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl rows without their timing fields."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def assert_resume_is_bit_exact(overrides: list[str], tmp_path: Path) -> Trainer:
    """Trains 2 iterations straight and 1 + a CLI resume to 2: the same weights, optimizer state
    and metrics rows. Returns the straight run's trainer."""
    straight = train(tiny_config(overrides, iterations=2), tmp_path / "straight")
    train(tiny_config(overrides, iterations=1), tmp_path / "split")
    assert main(["train", "--resume", str(tmp_path / "split"), "--iterations", "2", "logging.progress=false"]) == 0
    resumed = Trainer(tiny_config(overrides), progress=False)
    load_checkpoint(resumed.checkpoint_parts(), latest_checkpoint(tmp_path / "split"))
    assert resumed.iteration == straight.iteration == 2
    assert_bitwise_equal(snapshot(straight), snapshot(resumed))
    assert metrics_rows(tmp_path / "straight") == metrics_rows(tmp_path / "split")
    return straight


def train_fails(capsys, tmp_path: Path, *overrides: str) -> str:
    """The one error line of a `fastnft train` of configs/tiny.yaml that must stop with exit 2."""
    arguments = ["train", str(TINY_CONFIG), "--out", str(tmp_path / "run"), "logging.progress=false", *overrides]
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # a model that fails while it loads leaves diffusers' loading bars above the error line
    errors = [line for line in err.splitlines() if line.startswith("fastnft: error: ")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    return errors[0]
