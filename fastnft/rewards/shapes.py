"""The `shapes` task's reward: partial credit as the score, strict accuracy as `extras["accuracy"]`
(so evaluation logs `eval_accuracy`). Needs each prompt's metadata (shapes_*.jsonl carry it)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fastnft.rewards.base import Reward, RewardOutput, register
from fastnft.shapes.score import score_images


@register("shapes")
class ShapesReward(Reward):
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        if any("objects" not in m for m in metadata):
            raise ValueError("the shapes reward needs prompt metadata with 'objects' (use a shapes .jsonl file)")
        score, accuracy = score_images(images, metadata)
        return RewardOutput(score, {"accuracy": accuracy})
