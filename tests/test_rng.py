"""Keyed draws do not depend on which other images share a batch or a process."""

import pytest
import torch

from fastnft.prompts import prompt_indices
from fastnft.rng import keyed_randn


def test_a_row_depends_only_on_its_key():
    batch = keyed_randn((3, 4), 0, 5, [2, 7, 9], "rollout_noise")
    alone = keyed_randn((3, 4), 0, 5, [7], "rollout_noise")
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(alone, keyed_randn((3, 4), 0, 6, [7], "rollout_noise"))  # iteration
    assert not torch.equal(alone, keyed_randn((3, 4), 1, 5, [7], "rollout_noise"))  # seed
    assert not torch.equal(alone, keyed_randn((3, 4), 0, 5, [7], "training_noise"))  # purpose
    assert not torch.equal(alone, keyed_randn((3, 4), 0, 5, [7], "training_noise", 1))  # extra key
    with pytest.raises(ValueError, match="unknown purpose"):
        keyed_randn((1,), 0, 0, [0], "dropout")


def test_prompt_order_walks_whole_epochs():
    first_epoch = prompt_indices(10, 0, 5, seed=3) + prompt_indices(10, 1, 5, seed=3)
    assert sorted(first_epoch) == list(range(10))  # every prompt once per epoch
    assert prompt_indices(10, 2, 5, seed=3) + prompt_indices(10, 3, 5, seed=3) != first_epoch
    assert prompt_indices(10, 1, 5, seed=3) == prompt_indices(10, 1, 5, seed=3)
    straddling = prompt_indices(4, 1, 3, seed=0)  # positions 3, 4, 5: the end of epoch 0, then epoch 1
    assert straddling[0] == prompt_indices(4, 0, 4, seed=0)[3]
