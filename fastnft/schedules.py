"""Old-policy soft update and EMA (docs/algorithm.md, section 6), and fastnft's additions for long
runs (section 8): the adaptive KL coefficient and the cosine learning rate.

`step` counts optimizer steps INCLUDING the current iteration's: after the first iteration
step = 1, so eta = 0.001 (schedule 1) and the EMA decay is min(2 / 11, 0.9). Order after each
iteration's optimizer step(s): EMA step, then old-policy update theta_old <- eta theta_old + (1 - eta) theta.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


def old_policy_eta(schedule: int, step: int, rate: float = 0.001, maximum: float = 0.5) -> float:
    """The old policy's decay eta after `step` optimizer steps; schedule 1 ramps at `rate` per
    step up to `maximum` (the reference: 0.001 and 0.5)."""
    if schedule == 0:
        return 0.0
    if schedule == 1:
        return min(rate * step, maximum)
    if schedule == 2:
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise ValueError(f"old_policy.schedule must be 0, 1 or 2, got {schedule}")


# The adaptive KL controller: the relative error of the measured KL against its budget, clipped to
# +-KL_ERROR_CLIP, moves the coefficient by KL_GAIN times that error per iteration (at most 10 %).
KL_ERROR_CLIP = 0.2
KL_GAIN = 0.5


def adapted_kl_coef(coef: float, kl: float, target: float, floor: float) -> float:
    """The next iteration's KL coefficient: up when the iteration's mean KL term exceeded the
    target, down when it stayed below (the proportional controller of Ziegler et al., 2019, per
    iteration), never below `floor` (nft.kl_coef): a run far inside its budget keeps the anchor it
    was configured with, so the coefficient need not climb back from nothing when the budget is
    reached. A non-finite kl (a skipped iteration) leaves it as it is."""
    if not math.isfinite(kl):
        return coef
    error = min(max(kl / target - 1, -KL_ERROR_CLIP), KL_ERROR_CLIP)
    return max(coef * (1 + KL_GAIN * error), floor)


def lr_factor(schedule: str, iteration: int, iterations: int, final_fraction: float) -> float:
    """The learning rate of 0-based `iteration` as a fraction of optim.lr: 1 throughout (constant),
    or a half cosine from 1 at the first iteration to final_fraction at the last."""
    if schedule == "constant" or iterations <= 1:
        return 1.0
    progress = min(iteration / (iterations - 1), 1.0)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay(step: int, max_decay: float = 0.9) -> float:
    return min((1 + step) / (10 + step), max_decay)


@torch.no_grad()
def soft_update(target: Iterable[Tensor], source: Iterable[Tensor], decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, in place, parameter by parameter."""
    targets, sources = list(target), list(source)
    if len(targets) != len(sources):
        raise ValueError(f"soft_update got {len(targets)} targets and {len(sources)} sources")
    for t, s in zip(targets, sources, strict=True):
        t.lerp_(s.to(t.dtype), 1.0 - decay)
