"""Evaluation on held-out prompts with fixed seeds (eval.images_per_prompt images each,
prompt-major), with the EMA weights by default, split across ranks in equal padded shares
(FSDP2 forwards are collective) and gathered. `fastnft sample` uses it without rewards."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from fastnft.conditioning import TextConditioning
from fastnft.config import EvalConfig
from fastnft.distributed import World, even_shard, gather_rows
from fastnft.models import ModelAdapter
from fastnft.policy import Policies
from fastnft.prompts import PromptSet
from fastnft.rewards import RewardOutput
from fastnft.rollout import KeyedSampler, Scorer


class Evaluator:
    def __init__(
        self,
        config: EvalConfig,
        *,
        policies: Policies,
        use_ema_weights: bool,
        conditioning: TextConditioning,
        sampler: KeyedSampler,
        grid: Tensor,
        model: ModelAdapter,
        scorer: Scorer | None,
        world: World,
    ) -> None:
        self.config = config
        self.policies = policies
        self.use_ema_weights = use_ema_weights  # ema.enabled: otherwise the trained weights
        self.conditioning = conditioning
        self.sampler = sampler
        self.grid = grid
        self.model = model  # decodes samples to images
        self.scorer = scorer  # None: images only (no reward models loaded)
        self.world = world

    def _weights(self, use_ema: bool) -> AbstractContextManager[nn.Module]:
        if use_ema and self.use_ema_weights:
            return self.policies.ema_weights()
        return self.policies.role("trained")

    def _generate(
        self, prompts: PromptSet, guidance_scale: float | None, use_ema: bool
    ) -> tuple[Tensor, list[int], list[int]]:
        """This rank's share of the samples, their global indices (padded, see even_shard: only
        the first `real` are this rank's own) and each one's prompt row."""
        indices, real = even_shard(len(prompts) * self.config.images_per_prompt, self.world)
        rows = [index // self.config.images_per_prompt for index in indices]
        text = self.conditioning(prompts.prompts).index(torch.tensor(rows, device=self.sampler.device))
        with self._weights(use_ema) as module:
            samples = self.sampler(
                module,
                text,
                indices=indices,
                seed=self.config.seed,
                iteration=0,
                purpose="eval_noise",
                sampler=self.config.sampler,
                grid=self.grid,
                guidance_scale=self.config.guidance_scale if guidance_scale is None else guidance_scale,
                batch_size=self.config.batch_size,
            )
        return samples, indices[:real], rows

    def __call__(
        self,
        prompts: PromptSet,
        *,
        guidance_scale: float | None = None,
        use_ema: bool = True,
        keep: list[int] | None = None,
    ) -> tuple[dict[str, float], Tensor]:
        """Mean reward, per-reward means and every extra's mean (e.g. eval_accuracy), and the
        images of global indices `keep` (all when None), on every rank."""
        if self.scorer is None:
            raise ValueError("this evaluator was built without rewards: it makes images only")
        samples, mine, rows = self._generate(prompts, guidance_scale, use_ema)
        count = len(prompts) * self.config.images_per_prompt
        local, images = self.scorer(
            samples,
            [prompts.prompts[row] for row in rows],
            [prompts.metadata[row] for row in rows],
            self.config.batch_size,
            keep_images=True,
        )
        real = len(mine)
        rewards = self.scorer.gather(
            RewardOutput(local.score[:real], {k: v[:real] for k, v in local.extras.items()}), mine, count
        )
        metrics = {"eval_reward_mean": float(rewards.score.mean())}
        metrics.update({f"eval_{key}": float(value.mean()) for key, value in rewards.extras.items()})
        return metrics, self._gather_images(images, mine, count, keep)

    def images(self, prompts: PromptSet, *, guidance_scale: float | None = None) -> Tensor:
        """Every image [len(prompts) * images_per_prompt, 3, H, W] (a video model's videos
        [.., 3, F, H, W]) with the EMA weights, decoded without scoring, on every rank."""
        samples, mine, _ = self._generate(prompts, guidance_scale, use_ema=True)
        size = self.config.batch_size
        images = torch.cat([self.model.decode(samples[s : s + size]) for s in range(0, len(samples), size)])
        return self._gather_images(images, mine, len(prompts) * self.config.images_per_prompt, None)

    def _gather_images(self, images: Tensor, indices: list[int], count: int, keep: list[int] | None) -> Tensor:
        """The images of global indices `keep` (all when None) from every rank, in that order."""
        wanted = list(range(count)) if keep is None else keep
        position = {index: slot for slot, index in enumerate(wanted)}
        mine = [(row, position[index]) for row, index in enumerate(indices) if index in position]
        return gather_rows(
            self.world, {"image": images[[row for row, _ in mine]]}, [slot for _, slot in mine], len(wanted)
        )["image"]
