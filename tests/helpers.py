"""Shared test helpers."""

from fastnft.cli import default_config_path
from fastnft.config import Config, load_config

TINY_CONFIG = default_config_path().parent / "tiny.yaml"


def tiny_config(overrides: list[str] = (), *, iterations: int | None = None) -> Config:
    """configs/tiny.yaml without progress bars, plus overrides."""
    extra = ["logging.progress=false", "logging.tensorboard=false"]
    if iterations is not None:
        extra.append(f"iterations={iterations}")
    return load_config(TINY_CONFIG, [*extra, *overrides])
