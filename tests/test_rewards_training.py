"""Rewards inside training: overlapped scoring equals synchronous scoring, the weighted sum and
per-reward logging, and a failing reward stops the run without losing what was saved."""

import json

import pytest
import torch

from fastnft.checkpoint import latest_checkpoint, load_checkpoint
from fastnft.rewards import Reward, RewardOutput, register
from fastnft.rewards.jpeg import jpeg_size_kb
from fastnft.run import train
from fastnft.trainer import Trainer, build_rewards
from tests.helpers import tiny_config


@register("test_fails_after_first_call")
class FailsAfterFirstCall(Reward):
    """Scores the first batch it sees, then returns NaN (or raises, with raises=true)."""

    def __init__(self, raises: bool = False) -> None:
        self.calls = 0
        self.raises = raises

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if self.calls == 1:
            return RewardOutput(images.mean(dim=(1, 2, 3)))
        if self.raises:
            raise RuntimeError("the scorer crashed")
        return RewardOutput(torch.full((len(images),), float("nan")))


def test_overlapped_scoring_gives_the_synchronous_scores():
    overrides = ["rollout.batch_size=2"]  # four sampler batches per iteration, each scored on the worker
    rows = [
        Trainer(tiny_config([*overrides, f"rollout.overlap_reward={flag}"])).run_iteration()
        for flag in ("false", "true")
    ]
    for key in ("reward_mean", "reward_std", "reward_jpeg_incompressibility", "group_std_mean", "loss"):
        assert rows[0][key] == rows[1][key], key


def test_the_weighted_sum_and_each_reward_are_logged():
    rewards = "[{name: jpeg_incompressibility, weight: 2.0}, {name: jpeg_compressibility, weight: 0.5}]"
    config = tiny_config([f"rewards={rewards}"])
    images = torch.stack([torch.zeros(3, 32, 32), torch.rand(3, 32, 32)])
    out = build_rewards(config)(images, ["a", "b"], [{}, {}])
    size = jpeg_size_kb(images)
    torch.testing.assert_close(out.score, (2.0 * size + 0.5 * (-size / 500)).float())
    torch.testing.assert_close(out.extras["reward_jpeg_compressibility"], (-size / 500).float())
    row = Trainer(config).run_iteration()
    # the logged sum is the weighted sum of the logged rewards (compressibility = -size / 500)
    size_kb = row["reward_jpeg_incompressibility"]
    assert row["reward_jpeg_compressibility"] == pytest.approx(-size_kb / 500, rel=1e-5)
    assert row["reward_mean"] == pytest.approx(2.0 * size_kb + 0.5 * (-size_kb / 500), rel=1e-5)


def test_jpeg_rewards_order_flat_checkerboard_and_noise():
    flat = torch.full((3, 64, 64), 0.5)
    checkerboard = ((torch.arange(64)[:, None] // 8 + torch.arange(64)[None, :] // 8) % 2).float().expand(3, 64, 64)
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    size = jpeg_size_kb(torch.stack([flat, checkerboard, noise]))
    assert size[0] < size[1] < size[2]


@pytest.mark.parametrize(("raises", "message"), [(False, "returned non-finite scores"), (True, "the scorer crashed")])
def test_a_failing_reward_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, raises, message):
    reward = f"rewards=[{{name: test_fails_after_first_call, options: {{raises: {str(raises).lower()}}}}}]"
    config = tiny_config([reward, "rollout.overlap_reward=true", "eval.every=0"], iterations=3)
    with pytest.raises(RuntimeError, match=rf"reward 'test_fails_after_first_call'.*{message}"):
        train(config, tmp_path)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "iteration_000001"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [1]
    resumed = Trainer(config)
    load_checkpoint(resumed.checkpoint_parts(), checkpoint)
    assert resumed.iteration == 1
