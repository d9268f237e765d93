"""Rollout and evaluation samplers on the pinned timestep grid.

Rectified flow: x_t = (1 - t) x0 + t eps, target velocity v = eps - x0; sampling integrates
dx/dt = v from t = 1 (noise) to t = 0 (data). Every sampler steps on the same grid, diffusers'
FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift).set_timesteps(N).sigmas
(for N = 10, shift 3: 1.0, 0.9601, ..., 0.2780, 0.0089, 0), and training draws its t from
the first N entries of that grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...], t [B]) -> v [B, ...]
StepNoiseFn = Callable[[int], Tensor]  # step index -> standard normal noise shaped like x

SAMPLERS = ("dpm2m", "euler", "sde")


def timestep_grid(steps: int, shift: float) -> Tensor:
    """[steps + 1] times from 1 to 0, exactly diffusers' shifted flow-matching sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.to(torch.float32).cpu()


def _times(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)


def euler(velocity: VelocityFn, noise: Tensor, grid: Tensor) -> Tensor:
    """First-order ODE: x <- x + (t_next - t) v(x, t)."""
    x = noise.float()
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        x = x + (t_next - t) * velocity(x, _times(x, t)).float()
    return x


def _log_snr(t: float) -> float:
    """lambda(t) = log(alpha / sigma) = log((1 - t) / t); -inf at t = 1, +inf at t = 0."""
    if t >= 1.0:
        return -math.inf
    if t <= 0.0:
        return math.inf
    return math.log((1.0 - t) / t)


def dpm_solver_pp_2m(velocity: VelocityFn, noise: Tensor, grid: Tensor) -> Tensor:
    """Deterministic DPM-Solver++(2M) in data prediction, first order on the first and last step.

    With alpha_t = 1 - t, sigma_t = t, data prediction D = x - t v and h = lambda_next - lambda:
        x_next = (t_next / t) x + alpha_next (1 - e^-h) D_eff,
        D_eff  = (1 + 1 / 2r) D - (1 / 2r) D_prev,  r = h_prev / h   (D_eff = D when first order).
    Starting at t = 1, h_prev is infinite, so the second step's correction vanishes too.
    """
    x = noise.float()
    times = grid.tolist()
    previous_data, previous_h = None, None
    for i, (t, t_next) in enumerate(itertools.pairwise(times)):
        data = x - t * velocity(x, _times(x, t)).float()
        if t_next <= 0.0:
            return data
        h = _log_snr(t_next) - _log_snr(t)
        last = i == len(times) - 2
        if previous_data is None or last:
            data_eff = data
        else:
            inverse_2r = h / (2.0 * previous_h)  # 1 / (2r); 0 when h_prev is infinite
            data_eff = (1.0 + inverse_2r) * data - inverse_2r * previous_data
        x = (t_next / t) * x + (1.0 - t_next) * (1.0 - math.exp(-h)) * data_eff
        previous_data, previous_h = data, h
    return x


def sde(velocity: VelocityFn, noise: Tensor, grid: Tensor, noise_level: float, step_noise: StepNoiseFn) -> Tensor:
    """Euler-Maruyama on the marginal-preserving reverse SDE of the flow:

        dx = [v + g_t^2 / (2t) (x + (1 - t) v)] dt + g_t dW,   g_t = noise_level sqrt(t / (1 - t))

    (x + (1 - t) v = E[eps | x_t], so the extra drift is -g^2/2 times the score). At t = 1 the
    scale uses the next grid time instead (it diverges there); the last step adds no noise, so
    the sample is clean. noise_level = 0 is exactly Euler.
    """
    x = noise.float()
    times = grid.tolist()
    for i, (t, t_next) in enumerate(itertools.pairwise(times)):
        v = velocity(x, _times(x, t)).float()
        dt = t_next - t
        t_scale = times[1] if t >= 1.0 else t
        g = noise_level * math.sqrt(t_scale / (1.0 - t_scale))
        x = x + (v + g * g / (2.0 * t) * (x + (1.0 - t) * v)) * dt
        if g > 0 and i < len(times) - 2:
            x = x + g * math.sqrt(-dt) * step_noise(i).to(x)
    return x


def sample(
    name: str,
    velocity: VelocityFn,
    noise: Tensor,
    grid: Tensor,
    *,
    noise_level: float = 0.0,
    step_noise: StepNoiseFn | None = None,
) -> Tensor:
    """Runs the sampler `name` (one of SAMPLERS) from `noise` at t = 1 to a clean sample."""
    if name == "euler":
        return euler(velocity, noise, grid)
    if name == "dpm2m":
        return dpm_solver_pp_2m(velocity, noise, grid)
    if name == "sde":
        if step_noise is None:
            raise ValueError("the sde sampler needs step_noise")
        return sde(velocity, noise, grid, noise_level, step_noise)
    raise ValueError(f"unknown sampler {name!r}; known: {SAMPLERS}")
