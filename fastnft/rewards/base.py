"""The reward interface, registry and weighted sum (docs/algorithm.md, section 3)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

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
        raise ValueError(f"reward {name!r}: bad options {options}: {error}") from None


class WeightedRewards:
    """R = sum_i weight_i * reward_i (the std of the optimality map is taken over this sum)."""

    def __init__(self, specs: list[tuple[str, float, dict[str, Any]]]) -> None:
        self.rewards = [(build_reward(name, **options), weight) for name, weight, options in specs]

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        """score [B] = the weighted sum; extras: reward_<name> [B] per reward and every reward's extras."""
        total = torch.zeros(images.shape[0], dtype=torch.float64)
        extras: dict[str, Tensor] = {}
        for reward, weight in self.rewards:
            try:
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
