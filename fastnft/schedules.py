"""Old-policy soft update and EMA (docs/algorithm.md, section 6).

`step` counts optimizer steps INCLUDING the current iteration's: after the first iteration
step = 1, so eta = 0.001 (schedule 1) and the EMA decay is min(2 / 11, 0.9). Order after each
iteration's optimizer step(s): EMA step, then old-policy update theta_old <- eta theta_old + (1 - eta) theta.
"""

from __future__ import annotations

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
