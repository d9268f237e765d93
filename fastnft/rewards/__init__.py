"""Rewards: black-box scorers of decoded images.

    reward(images [B, 3, H, W] in [0, 1], prompts, metadata) -> RewardOutput(score [B], extras)

A video model's videos [B, 3, F, H, W] reach every reward as frames (`rewards[].frames` evenly
spaced frames of each, every frame by default), each video scored by the mean over its frames
(`WeightedRewards`, `score_frames`).

`register` adds a reward class under a name, `build_reward(name, **options)` builds one,
`available_rewards()` lists them. Importing this package registers every built-in reward, also
those whose optional packages are missing: building one of those names the extra to install.
"""

from fastnft.rewards.base import (
    Reward,
    RewardOutput,
    WeightedRewards,
    available_rewards,
    build_reward,
    register,
)
from fastnft.rewards.clip import Aesthetic, ClipScore, HPSv2, PickScore
from fastnft.rewards.imagenet import ImageNetClass
from fastnft.rewards.jpeg import JpegCompressibility, JpegIncompressibility
from fastnft.rewards.remote import HttpReward, JudgeReward
from fastnft.rewards.shapes import ShapesReward

__all__ = [
    "Aesthetic",
    "ClipScore",
    "HPSv2",
    "HttpReward",
    "ImageNetClass",
    "JpegCompressibility",
    "JpegIncompressibility",
    "JudgeReward",
    "PickScore",
    "Reward",
    "RewardOutput",
    "ShapesReward",
    "WeightedRewards",
    "available_rewards",
    "build_reward",
    "register",
]
