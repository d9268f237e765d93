"""Data collection (docs/algorithm.md, sections 3 and 4): an iteration's prompts, K images per
prompt from the OLD policy with keyed noise, decoded and scored (optionally overlapped with the
sampling), every rank's scores gathered and turned into optimality probabilities.

`KeyedSampler` and `Scorer` serve the evaluation too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastnft.conditioning import TextConditioning
from fastnft.config import Config
from fastnft.distributed import World, gather_rows
from fastnft.models import ModelAdapter, TextEmbedding
from fastnft.optimality import Optimality, optimality_probabilities
from fastnft.policy import Policies
from fastnft.prompts import PromptSet, prompt_indices
from fastnft.rewards import RewardOutput, WeightedRewards
from fastnft.rewards.overlap import OverlappedScoring
from fastnft.rng import keyed_randn
from fastnft.sampling import sample
from fastnft.speed import CudaGraphRollout
from fastnft.velocity import Velocity


def progress_bar(total: int, description: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=description, leave=False, disable=not enabled, dynamic_ncols=True)


class KeyedSampler:
    """Clean samples in batches, the initial (and SDE) noise of each keyed by (seed, iteration,
    global image index, purpose), so any process count and any batch size give the same images."""

    def __init__(
        self,
        velocity: Velocity,
        sample_shape: tuple[int, ...],
        device: torch.device,
        *,
        sde_noise_level: float,
        progress: bool,
    ) -> None:
        self.velocity = velocity
        self.sample_shape = sample_shape
        self.device = device
        self.sde_noise_level = sde_noise_level
        self.progress = progress

    def __call__(
        self,
        module: nn.Module | CudaGraphRollout,
        text: TextEmbedding,
        *,
        indices: list[int],
        seed: int,
        iteration: int,
        purpose: str,
        sampler: str,
        grid: Tensor,
        guidance_scale: float,
        batch_size: int,
        on_batch: Callable[[Tensor, list[int]], None] | None = None,
    ) -> Tensor:
        """[len(text), *sample_shape], row i from global image indices[i]; on_batch(samples,
        rows) is called as each sampler batch completes."""
        shape = self.sample_shape
        samples = []
        with torch.no_grad(), progress_bar(len(text), f"rollout {iteration}", self.progress) as bar:
            for start in range(0, len(text), batch_size):
                rows = list(range(start, min(start + batch_size, len(text))))
                images = [indices[row] for row in rows]
                noise = keyed_randn(shape, seed, iteration, images, purpose, device=self.device)

                def step_noise(step: int, images=images) -> Tensor:
                    return keyed_randn(shape, seed, iteration, images, "sde_noise", step, device=self.device)

                velocity = self.velocity.field(module, text.index(rows), guidance_scale)
                samples.append(
                    sample(sampler, velocity, noise, grid, noise_level=self.sde_noise_level, step_noise=step_noise)
                )
                if on_batch is not None:
                    on_batch(samples[-1], rows)
                bar.update(len(rows))
        return torch.cat(samples)


class Scorer:
    """Decodes samples and scores them with the run's weighted reward sum."""

    def __init__(self, model: ModelAdapter, rewards: WeightedRewards, world: World) -> None:
        self.model = model
        self.rewards = rewards
        self.world = world

    def __call__(
        self, samples: Tensor, prompts: list[str], metadata: list[dict], batch_size: int, keep_images: bool = False
    ) -> tuple[RewardOutput, Tensor | None]:
        """The weighted sum with per-reward extras, and the decoded images when keep_images
        (rollouts do not keep them: they can be large)."""
        outputs, kept = [], []
        for start in range(0, len(samples), batch_size):
            stop = start + batch_size
            images = self.model.decode(samples[start:stop])
            outputs.append(self.rewards(images, prompts[start:stop], metadata[start:stop]))
            if keep_images:
                kept.append(images)
        return RewardOutput.cat(outputs), torch.cat(kept) if keep_images else None

    def gather(self, local: RewardOutput, indices: list[int], count: int) -> RewardOutput:
        """Every rank's scores (and extras) in global image order [count], on every rank."""
        rows = gather_rows(
            self.world, {"score": local.score, **{f"extra.{k}": v for k, v in local.extras.items()}}, indices, count
        )
        return RewardOutput(rows.pop("score"), {key.removeprefix("extra."): value for key, value in rows.items()})


@dataclass
class IterationBatch:
    """An iteration's prompts; groups[i] is the prompt of global image i, mine this rank's images."""

    iteration: int
    prompts: list[str]
    metadata: list[dict]
    groups: Tensor
    mine: list[int]

    @property
    def my_groups(self) -> Tensor:
        return self.groups[self.mine]

    def my_prompts(self, rows: list[int] | None = None) -> tuple[list[str], list[dict]]:
        """Prompts and metadata of this rank's images (of `rows` of them; all when None)."""
        groups = self.my_groups.tolist()
        chosen = [groups[row] for row in rows] if rows is not None else groups
        return [self.prompts[g] for g in chosen], [self.metadata[g] for g in chosen]


@dataclass
class Samples:
    """This rank's clean samples and their conditioning; scores already computed on the side
    when scoring overlapped the sampling."""

    x0: Tensor
    text: TextEmbedding
    overlapped_scores: RewardOutput | None = None


@dataclass
class Scored:
    rewards: RewardOutput  # every rank's, in global image order
    optimality: Optimality
    probability: Tensor  # this rank's images' optimality probabilities, on the device


class Rollout:
    def __init__(
        self,
        config: Config,
        *,
        prompts: PromptSet,
        image_indices: list[int],
        conditioning: TextConditioning,
        policies: Policies,
        sampler: KeyedSampler,
        scorer: Scorer,
        grid: Tensor,
        cuda_graph: CudaGraphRollout | None,
    ) -> None:
        self.config = config
        self.prompts = prompts
        self.image_indices = image_indices  # this rank's global image indices, every iteration
        self.conditioning = conditioning
        self.policies = policies
        self.sampler = sampler
        self.scorer = scorer
        self.grid = grid
        self.cuda_graph = cuda_graph  # the old policy's module under CUDA graphs (rollout.cuda_graphs)

    def batch(self, iteration: int) -> IterationBatch:
        """The prompts of `iteration` (a function of the iteration alone) and this rank's images."""
        config = self.config.rollout
        chosen = prompt_indices(len(self.prompts), iteration, config.groups, self.config.seed)
        groups = torch.arange(len(chosen)).repeat_interleave(config.group_size)
        return IterationBatch(
            iteration,
            [self.prompts.prompts[i] for i in chosen],
            [self.prompts.metadata[i] for i in chosen],
            groups,
            self.image_indices,
        )

    def sample(self, batch: IterationBatch) -> Samples:
        """This rank's images from the old policy; with rollout.overlap_reward each sampler batch
        is scored on a worker while the next one samples."""
        config = self.config.rollout
        scoring = OverlappedScoring(self._score_batch, self.sampler.device) if config.overlap_reward else None

        def submit(samples: Tensor, rows: list[int]) -> None:
            scoring.submit(samples, *batch.my_prompts(rows))

        text = self.conditioning.for_images(batch.prompts, batch.my_groups)
        with self.policies.role("old") as old:
            x0 = self.sampler(
                old if self.cuda_graph is None else self.cuda_graph,
                text,
                indices=batch.mine,
                seed=self.config.seed,
                iteration=batch.iteration,
                purpose="rollout_noise",
                sampler=config.sampler,
                grid=self.grid,
                guidance_scale=config.guidance_scale,
                batch_size=config.batch_size,
                on_batch=submit if scoring is not None else None,
            )
        return Samples(x0, text, scoring.results() if scoring is not None else None)

    def _score_batch(self, samples: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return self.scorer(samples, prompts, metadata, len(samples))[0]

    def score(self, batch: IterationBatch, samples: Samples) -> Scored:
        """Decodes and scores this rank's images (unless scored while sampling), gathers every
        rank's scores (a prompt's K images may live on several ranks) and turns them into
        optimality probabilities."""
        local = samples.overlapped_scores
        if local is None:
            local, _ = self.scorer(samples.x0, *batch.my_prompts(), self.config.rollout.batch_size)
        rewards = self.scorer.gather(local, batch.mine, len(batch.groups))
        nft = self.config.nft
        optimality = optimality_probabilities(
            rewards.score, batch.groups, adv_clip_max=nft.adv_clip_max, std_scope=nft.std_scope
        )
        return Scored(rewards, optimality, optimality.probability[batch.mine].to(samples.x0.device))
