"""Rewards -> optimality probabilities (docs/algorithm.md, section 4).

    A = (R - mean of R over the same prompt) / (std of ALL R of the iteration + 1e-4)
    A = clip(A, -adv_clip_max, adv_clip_max)
    r = clip(A / adv_clip_max / 2 + 0.5, 0, 1)

std is the population std (ddof 0) over the whole iteration ("global", the reference), or over
the prompt's own group ("group"). Statistics are computed afresh every iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

STD_EPS = 1e-4


@dataclass(frozen=True)
class Optimality:
    probability: Tensor  # [N] r in [0, 1]
    advantage: Tensor  # [N] clipped advantage
    group_std_mean: float  # mean over prompts of the std of their K rewards
    zero_std_ratio: float  # fraction of prompts whose K rewards are all equal


def optimality_probabilities(
    rewards: Tensor, group_ids: Tensor, *, adv_clip_max: float = 5.0, std_scope: str = "global"
) -> Optimality:
    """rewards [N] (every image of the iteration, gathered from all ranks), group_ids [N]
    (the prompt index of each image) -> per-image optimality probabilities."""
    rewards = rewards.double()
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, inverse, rewards) / count
    centered = rewards - mean[inverse]
    group_var = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, inverse, centered.square()) / count
    group_std = group_var.sqrt()
    if std_scope == "global":
        std = rewards.std(correction=0).expand_as(rewards)
    elif std_scope == "group":
        std = group_std[inverse]
    else:
        raise ValueError(f"std_scope must be 'global' or 'group', got {std_scope!r}")
    advantage = (centered / (std + STD_EPS)).clamp(-adv_clip_max, adv_clip_max)
    probability = (advantage / adv_clip_max / 2 + 0.5).clamp(0.0, 1.0)
    return Optimality(
        probability=probability.float(),
        advantage=advantage.float(),
        group_std_mean=float(group_std.mean()),
        zero_std_ratio=float((group_std == 0).double().mean()),
    )
