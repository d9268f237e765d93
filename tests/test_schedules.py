"""Old-policy and EMA schedules, and the soft update, against hand-computed values."""

import itertools

import pytest
import torch

from fastnft.schedules import adapted_kl_coef, ema_decay, lr_factor, old_policy_eta, soft_update


def test_schedule_one():
    assert old_policy_eta(1, 1) == pytest.approx(0.001)
    assert old_policy_eta(1, 250) == pytest.approx(0.25)
    assert old_policy_eta(1, 500) == 0.5 and old_policy_eta(1, 10_000) == 0.5


def test_schedule_one_with_its_own_rate_and_ceiling():
    assert old_policy_eta(1, 10, rate=0.01, maximum=0.4) == pytest.approx(0.1)
    assert old_policy_eta(1, 50, rate=0.01, maximum=0.4) == pytest.approx(0.4)
    assert old_policy_eta(2, 76, rate=0.01, maximum=0.4) == pytest.approx(0.0075)  # schedule 2 ignores them


def test_schedule_two_and_zero():
    assert old_policy_eta(2, 74) == 0.0
    assert old_policy_eta(2, 75) == 0.0
    assert old_policy_eta(2, 76) == pytest.approx(0.0075)
    assert old_policy_eta(2, 208) < 0.999 and old_policy_eta(2, 209) == 0.999
    assert old_policy_eta(0, 123) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        old_policy_eta(3, 1)


def test_ema_decay_counts_the_current_step():
    assert ema_decay(1) == pytest.approx(2 / 11)
    assert ema_decay(80) == 0.9 and ema_decay(79) == pytest.approx(80 / 89)


def test_soft_update_is_a_lerp():
    target, source = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    soft_update([target], [source], 0.25)
    assert torch.allclose(target, torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * -2]))
    with pytest.raises(ValueError, match="targets"):
        soft_update([target], [], 0.5)


def test_the_adaptive_kl_coefficient_moves_towards_its_budget_and_stays_above_its_floor():
    # above the budget by more than the clip: up by gain x clip = 10 %; below: down; at it: unchanged
    assert adapted_kl_coef(0.2, kl=5.0, target=1.0, floor=0.1) == pytest.approx(0.2 * (1 + 0.5 * 0.2))
    assert adapted_kl_coef(0.2, kl=0.0, target=1.0, floor=0.1) == pytest.approx(0.2 * (1 - 0.5 * 0.2))
    assert adapted_kl_coef(0.2, kl=1.1, target=1.0, floor=0.1) == pytest.approx(0.2 * 1.05)
    assert adapted_kl_coef(0.2, kl=1.0, target=1.0, floor=0.1) == 0.2
    assert adapted_kl_coef(0.105, kl=0.0, target=1.0, floor=0.1) == 0.1  # 0.0945 would be below the floor
    assert adapted_kl_coef(0.2, kl=float("nan"), target=1.0, floor=0.1) == 0.2  # every step skipped: no evidence


def test_cosine_learning_rate_from_one_to_its_final_fraction():
    assert lr_factor("constant", 7, 10, 0.1) == 1.0
    assert lr_factor("cosine", 0, 11, 0.1) == 1.0
    assert lr_factor("cosine", 5, 11, 0.1) == pytest.approx(0.55)  # halfway: the mean of both ends
    assert lr_factor("cosine", 10, 11, 0.1) == pytest.approx(0.1)
    assert lr_factor("cosine", 14, 11, 0.1) == pytest.approx(0.1)  # a run extended past its plan stays there
    factors = [lr_factor("cosine", i, 11, 0.0) for i in range(11)]
    assert all(a > b for a, b in itertools.pairwise(factors))
