"""The grid of the pipelines that hand their scheduler explicit sigmas (FluxPipeline,
QwenImagePipeline): `linspace(1, 1/steps, steps)` through the model's own
FlowMatchEulerDiscreteScheduler config, shifted by mu from the image token count when the config
has use_dynamic_shifting, else statically by its shift. One function, so that each family's grid
is its pipeline's by construction rather than by a copy of the same arithmetic."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastnft.config import ConfigError


def calculate_shift(tokens: int, config: Any) -> float:
    """mu, linear in the image token count between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift), with the pipelines' defaults for keys a config lacks (the
    `calculate_shift` of pipeline_flux.py and pipeline_qwenimage.py)."""
    base_tokens = config.get("base_image_seq_len", 256)
    max_tokens = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    intercept = base_shift - slope * base_tokens  # in the pipelines' order of operations: the same float
    return tokens * slope + intercept


def scheduler_grid(scheduler_config: Any, steps: int, shift: float | None, image_tokens: int, family: str) -> Tensor:
    """[steps + 1] sigmas from 1 to 0, exactly the scheduler's after the pipeline's set_timesteps
    call (shift_terminal and the time-shift type come with the config). `shift` (rollout.shift)
    overrides a static shift; a dynamic one follows the image size, so a shift is refused there."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    if not scheduler.config.use_dynamic_shifting:
        if shift is not None:
            scheduler.set_shift(shift)
        scheduler.set_timesteps(sigmas=sigmas)
    else:
        if shift is not None:
            raise ConfigError(f"rollout.shift: this {family} model shifts its grid by the image size; leave it unset")
        scheduler.set_timesteps(sigmas=sigmas, mu=calculate_shift(image_tokens, scheduler.config))
    return scheduler.sigmas.to(torch.float32).cpu()
