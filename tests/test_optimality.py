"""Rewards -> optimality probabilities, against hand-computed examples."""

import math

import pytest
import torch

from fastnft.optimality import optimality_probabilities


def test_global_std_example():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])  # prompt 0: {1, 3}, prompt 1: {2, 2}
    groups = torch.tensor([0, 0, 1, 1])
    out = optimality_probabilities(rewards, groups, adv_clip_max=5.0)
    std = math.sqrt(((1 - 2) ** 2 + (3 - 2) ** 2 + 0 + 0) / 4)  # population std of all rewards
    advantage = [-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0]
    assert torch.allclose(out.advantage, torch.tensor(advantage))
    assert torch.allclose(out.probability, torch.tensor([a / 10 + 0.5 for a in advantage]))
    assert out.zero_std_ratio == 0.5  # prompt 1's rewards are all equal
    assert out.group_std_mean == pytest.approx((1.0 + 0.0) / 2)


def test_equal_rewards_give_one_half():
    out = optimality_probabilities(torch.full((6,), 0.3), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.equal(out.probability, torch.full((6,), 0.5))
    assert out.zero_std_ratio == 1.0


def test_clipping_at_adv_clip_max():
    rewards = torch.tensor([0.0] * 9 + [100.0, 0.0, 0.0])
    groups = torch.tensor([0] * 10 + [1, 1])
    out = optimality_probabilities(rewards, groups, adv_clip_max=2.0)
    assert out.advantage.max() == 2.0 and out.probability.max() == 1.0
    assert 0.0 <= out.probability.min() < 0.5


def test_group_std_scope():
    rewards = torch.tensor([1.0, 3.0, 10.0, 30.0])
    groups = torch.tensor([0, 0, 1, 1])
    out = optimality_probabilities(rewards, groups, adv_clip_max=5.0, std_scope="group")
    expected = torch.tensor([-1 / (1 + 1e-4), 1 / (1 + 1e-4), -10 / (10 + 1e-4), 10 / (10 + 1e-4)])
    assert torch.allclose(out.advantage, expected)
    with pytest.raises(ValueError, match="std_scope"):
        optimality_probabilities(rewards, groups, std_scope="batch")


def test_groups_need_not_be_contiguous():
    rewards = torch.tensor([1.0, 5.0, 3.0, 7.0])
    interleaved = optimality_probabilities(rewards, torch.tensor([0, 1, 0, 1]))
    contiguous = optimality_probabilities(rewards[[0, 2, 1, 3]], torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(interleaved.probability[[0, 2, 1, 3]], contiguous.probability)
