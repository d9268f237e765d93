"""Samplers on Gaussian data, where the velocity and the ODE solution are known in closed form."""

import itertools
import math

import pytest
import torch

from fastnft.sampling import dpm_solver_pp_2m, euler, sample, sde, timestep_grid

MU, SD = 0.7, 0.4  # data x0 ~ N(MU, SD^2)


def gaussian_velocity(x, t):
    """E[eps - x0 | x_t] for x0 ~ N(MU, SD^2): affine in x."""
    t = t.double().view(-1, *[1] * (x.ndim - 1))
    variance = (1 - t) ** 2 * SD**2 + t**2
    return (-MU + (t - (1 - t) * SD**2) / variance * (x.double() - (1 - t) * MU)).float()


def ode_endpoint(noise):
    """The flow maps x_1 = eps to x_0 = MU + SD * eps (a monotone affine map of Gaussians)."""
    return MU + SD * noise


NOISE = torch.linspace(-2.5, 2.5, 201).view(-1, 1)


def test_grid_is_the_pinned_vector():
    expected = [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
    grid = timestep_grid(10, 3.0)
    assert grid.shape == (11,)
    assert torch.allclose(grid, torch.tensor(expected), atol=5e-5)


def error(sampler, steps):
    return float((sampler(gaussian_velocity, NOISE, timestep_grid(steps, 3.0)) - ode_endpoint(NOISE)).abs().max())


@pytest.mark.parametrize("steps", [40, 80])
def test_euler_is_first_order(steps):
    ratio = error(euler, steps) / error(euler, 2 * steps)
    assert 1.7 < ratio < 2.3


@pytest.mark.parametrize("steps", [40, 80])
def test_dpm_solver_pp_2m_is_second_order(steps):
    ratio = error(dpm_solver_pp_2m, steps) / error(dpm_solver_pp_2m, 2 * steps)
    assert 3.3 < ratio < 4.7


def test_sde_without_noise_is_euler():
    grid = timestep_grid(10, 3.0)
    stochastic = sde(gaussian_velocity, NOISE, grid, 0.0, lambda step: torch.randn_like(NOISE))
    assert torch.equal(stochastic, euler(gaussian_velocity, NOISE, grid))


def test_sde_matches_its_analytic_mean_and_variance():
    # With an affine velocity every SDE step is x <- a x + b + c z, so the law of the sample is
    # Gaussian with a mean and variance that propagate exactly from N(0, 1).
    grid, noise_level, count = timestep_grid(20, 3.0), 0.7, 40000
    times = grid.tolist()
    mean, variance = 0.0, 1.0
    for i, (t, t_next) in enumerate(itertools.pairwise(times)):
        probe = torch.tensor([[0.0], [1.0]])
        v0, v1 = gaussian_velocity(probe, torch.full((2,), t)).double().flatten().tolist()
        dt = t_next - t
        t_scale = times[1] if t >= 1 else t
        g = noise_level * math.sqrt(t_scale / (1 - t_scale))
        slope_v, offset_v = v1 - v0, v0
        a = 1 + (slope_v + g * g / (2 * t) * (1 + (1 - t) * slope_v)) * dt
        b = (offset_v + g * g / (2 * t) * (1 - t) * offset_v) * dt
        c2 = g * g * (-dt) if i < len(times) - 2 else 0.0
        mean, variance = a * mean + b, a * a * variance + c2
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(count, 1, generator=generator)
    samples = sde(gaussian_velocity, start, grid, noise_level, lambda step: torch.randn(count, 1, generator=generator))
    standard_error_mean = math.sqrt(variance / count)
    standard_error_variance = variance * math.sqrt(2 / (count - 1))
    assert abs(float(samples.mean()) - mean) < 3 * standard_error_mean
    assert abs(float(samples.var()) - variance) < 3 * standard_error_variance
    # and the SDE keeps the data marginal, up to discretisation: N(MU, SD^2)
    assert abs(mean - MU) < 0.05 and abs(math.sqrt(variance) - SD) < 0.05


def test_sample_dispatches_and_rejects_unknown_names():
    grid = timestep_grid(4, 3.0)
    assert torch.equal(sample("euler", gaussian_velocity, NOISE, grid), euler(gaussian_velocity, NOISE, grid))
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("heun", gaussian_velocity, NOISE, grid)
    with pytest.raises(ValueError, match="step_noise"):
        sample("sde", gaussian_velocity, NOISE, grid, noise_level=0.5)
