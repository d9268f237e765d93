"""The reward interface, registry and weighted sum (docs/algorithm.md, section 3)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastnft.visual import even_frames

_REGISTRY: dict[str, type[Reward]] = {}


@dataclass
class RewardOutput:
    score: Tensor  # [B]
    extras: dict[str, Tensor] = field(default_factory=dict)  # each [B], e.g. "accuracy"

    @staticmethod
    def cat(parts: list[RewardOutput]) -> RewardOutput:
        """Batches' outputs joined in order."""
        extras = {key: torch.cat([part.extras[key] for part in parts]) for key in parts[0].extras}
        return RewardOutput(torch.cat([part.score for part in parts]), extras)


class Reward(ABC):
    """A scorer; subclasses take their options as keyword arguments."""

    name: str = ""
    extra: str | None = None  # the pip extra that provides its optional dependencies

    @abstractmethod
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput: ...


def register(name: str):
    """Class decorator: makes a Reward buildable by name."""

    def decorator(cls: type[Reward]) -> type[Reward]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def build_reward(name: str, **options: Any) -> Reward:
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}")
    cls = _REGISTRY[name]
    try:
        return cls(**options)
    except ImportError as error:
        raise ImportError(f"reward {name!r} needs the '{cls.extra}' extra: pip install 'fastnft[{cls.extra}]'") from (
            error
        )
    except TypeError as error:
        # The option names only: a value may be a credential, which must not reach a log.
        raise ValueError(f"reward {name!r}: bad options ({', '.join(sorted(options))}): {error}") from None


def score_frames(
    reward: Reward, videos: Tensor, prompts: list[str], metadata: list[dict[str, Any]], frames: int | None
) -> RewardOutput:
    """An image reward on videos [B, 3, F, H, W]: `frames` evenly spaced frames of each video
    (every frame when None) scored as one batch of images, each video's score and extras the
    mean over its frames. Every image reward scores videos this way, none of them knows it."""
    batch, _, total = videos.shape[:3]
    chosen = list(range(total)) if frames is None else even_frames(total, frames)
    count = len(chosen)
    images = videos[:, :, chosen].movedim(2, 1).flatten(0, 1).contiguous()  # [B * count, 3, H, W], video-major
    output = reward(images, [p for p in prompts for _ in chosen], [m for m in metadata for _ in chosen])
    if output.score.shape != (batch * count,):
        raise RuntimeError(f"returned shape {tuple(output.score.shape)} for {batch * count} frames")

    def per_video(values: Tensor) -> Tensor:
        return values.detach().double().cpu().view(batch, count).mean(1)

    return RewardOutput(per_video(output.score), {key: per_video(value) for key, value in output.extras.items()})


class WeightedRewards:
    """R = sum_i weight_i * reward_i (the std of the optimality map is taken over this sum).
    Videos are scored frame by frame (score_frames), `frames[i]` frames for reward i."""

    def __init__(
        self, specs: list[tuple[str, float, dict[str, Any]]], frames: Sequence[int | None] | None = None
    ) -> None:
        self.rewards = [(build_reward(name, **options), weight) for name, weight, options in specs]
        self.frames = list(frames) if frames is not None else [None] * len(self.rewards)
        if len(self.frames) != len(self.rewards):
            raise ValueError(f"{len(self.frames)} frame counts for {len(self.rewards)} rewards")

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        """score [B] = the weighted sum; extras: reward_<name> [B] per reward and every reward's
        extras. `images` [B, 3, H, W], or videos [B, 3, F, H, W]."""
        total = torch.zeros(images.shape[0], dtype=torch.float64)
        extras: dict[str, Tensor] = {}
        for (reward, weight), frames in zip(self.rewards, self.frames, strict=True):
            try:
                if images.ndim == 5:
                    output = score_frames(reward, images, prompts, metadata, frames)
                else:
                    output = reward(images, prompts, metadata)
            except Exception as error:
                raise RuntimeError(f"reward {reward.name!r} failed: {error}") from error
            score = output.score.detach().double().cpu()
            if score.shape != total.shape or not bool(torch.isfinite(score).all()):
                bad = "non-finite scores" if score.shape == total.shape else f"shape {tuple(score.shape)}"
                raise RuntimeError(f"reward {reward.name!r} returned {bad} for a batch of {len(total)}")
            total += weight * score
            extras[f"reward_{reward.name}"] = score.float()
            for key, value in output.extras.items():
                extras[key] = value.detach().float().cpu()
        return RewardOutput(total.float(), extras)
