"""The DiffusionNFT iteration (docs/algorithm.md, sections 3-6), composed from the pieces:

1. draw `groups` prompts and encode each once;
2. roll out K images per prompt with the OLD policy on the pinned grid;
3. decode, score (weighted reward sum), turn scores into optimality probabilities;
4. train on int(timestep_fraction * steps) grid times per image with fresh noise, gradients
   accumulated over all (micro-batch, timestep) pairs of an optimizer step;
5. EMA step after every optimizer step, then the old-policy soft update;
6. log, evaluate, draw sample grids, checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastnft.config import Config, ConfigError
from fastnft.distributed import (
    World,
    check_recipe,
    even_shard,
    gather_rows,
    gradient_sync,
    image_shard,
    init_world,
    mean_over_ranks,
)
from fastnft.models import ModelAdapter, TextEmbedding, build_model
from fastnft.models.presets import seeded
from fastnft.optimality import Optimality, optimality_probabilities
from fastnft.optimizers import build_optimizer
from fastnft.policy import FullPolicies, LoraPolicies, Policies
from fastnft.prompts import PromptSet, prompt_indices
from fastnft.rewards import RewardOutput, WeightedRewards
from fastnft.rewards.overlap import OverlappedScoring
from fastnft.rng import generator, keyed_randn
from fastnft.sampling import sample, timestep_grid
from fastnft.schedules import ema_decay, old_policy_eta
from fastnft.speed import CudaGraphRollout, apply_attention, apply_compile
from fastnft.text_cache import PromptEmbeddings
from fastnft_kernels import nft_loss, nft_loss_torch


def resolve_device(name: str, world: World) -> torch.device:
    """The device of this process: under torchrun, the GPU of its local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", world.local_rank if world.size > 1 else torch.cuda.current_device())


def weight_dtype_for(config: Config) -> torch.dtype:
    """Frozen weights: bf16 for precision bf16 (on any device), else fp32 (the reference
    precision adds fp16 autocast on GPU)."""
    return torch.bfloat16 if config.model.precision == "bf16" else torch.float32


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


class Trainer:
    def __init__(self, config: Config, *, progress: bool | None = None) -> None:
        self.config = config
        self.world = init_world(config)
        check_recipe(config, self.world)
        self.device = resolve_device(config.device, self.world)
        if config.rollout.cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"rollout.cuda_graphs: CUDA graphs need a CUDA device; this run is on {self.device}")
        self.progress = (config.logging.progress if progress is None else progress) and self.world.is_main
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        weight_dtype = weight_dtype_for(config)
        self.model: ModelAdapter = build_model(config.model, config.seed, self.device, weight_dtype)
        for module in self.model.frozen_modules().values():
            module.requires_grad_(False).eval()
        self.attention = apply_attention(self.model.transformer, config.model.attention)
        if config.model.gradient_checkpointing:
            self.model.transformer.enable_gradient_checkpointing()
        with seeded(config.seed):  # LoRA's gaussian init draws from the global generator
            self.policies: Policies = self._build_policies(weight_dtype)
        if self.world.size > 1:
            self.policies.distribute(config.dist.strategy, self.device, weight_dtype)
        self.compiled_blocks = 0
        if config.compile.enabled:
            self.compiled_blocks = sum(apply_compile(module, config.compile) for module in self.policies.modules())
        self.rollout_graph: CudaGraphRollout | None = None  # the old policy's module under CUDA graphs
        if config.rollout.cuda_graphs:
            with self.policies.role("old") as old:
                self.rollout_graph = CudaGraphRollout(old)
        self.optimizer = build_optimizer(config.optim, list(self.policies.trained_parameters().values()))
        reference_precision = config.model.precision == "reference" and self.device.type == "cuda"
        self.autocast_dtype = torch.float16 if reference_precision else None
        self.grad_scaler = torch.amp.GradScaler("cuda") if reference_precision else None
        try:
            self.rewards = WeightedRewards([(r.name, r.weight, r.options) for r in config.rewards])
        except (ValueError, ImportError) as error:
            raise ConfigError(f"rewards: {error}") from error
        self.train_prompts = PromptSet.load(config.prompts.train)
        self.eval_prompts = PromptSet.load(config.prompts.eval) if config.prompts.eval else None
        self.prompt_embeddings = self._cache_prompt_embeddings() if config.model.text_encoding == "cached" else None
        images = config.rollout.groups * config.rollout.group_size
        self.image_indices = image_shard(images, config.optim.steps_per_iteration, self.world)  # this rank's
        self.grid = timestep_grid(config.rollout.steps, config.rollout.shift)
        self.eval_grid = timestep_grid(config.eval.steps, config.rollout.shift)
        self.iteration = 0  # completed iterations
        self.optimizer_steps = 0
        self.in_iteration = False  # true while an iteration is half done (its state is inconsistent)
        self.last_rollout: tuple[Tensor, list[str]] | None = None
        self._empty_text: TextEmbedding | None = None

    def _cache_prompt_embeddings(self) -> PromptEmbeddings:
        prompts = [*self.train_prompts.prompts, *(self.eval_prompts.prompts if self.eval_prompts else []), ""]
        cache = PromptEmbeddings(
            self.model.encode_text, prompts, batch_size=self.config.rollout.batch_size, device=self.device
        )
        if self.config.model.offload_text_encoders:
            for encoder in self.model.text_encoders().values():
                encoder.to("cpu")
            cache.encoders_available = False
        return cache

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        """Conditioning for prompts: from the cache (text_encoding: cached) or the text encoders."""
        if self.prompt_embeddings is not None:
            return self.prompt_embeddings(prompts)
        return self.model.encode_text(prompts)

    def _build_policies(self, weight_dtype: torch.dtype) -> Policies:
        config = self.config
        if config.lora.enabled:
            targets = config.lora.target_modules or list(self.model.default_lora_targets)
            policies = LoraPolicies(self.model.transformer, config.lora, targets)
            if config.model.init_lora:
                load_lora_into(policies, config.model.init_lora)
            return policies
        return FullPolicies(self.model.transformer, keep_reference=config.nft.kl_coef > 0, frozen_dtype=weight_dtype)

    # ------------------------------------------------------------ model calls

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast("cuda", dtype=self.autocast_dtype):
                yield

    def velocity_fn(self, module: nn.Module, text: TextEmbedding, guidance_scale: float):
        """v(x, t) for `module` under `text`; with guidance > 1, CFG against the empty prompt
        (conditional and unconditional halves in one batched call)."""
        if guidance_scale == 1.0:

            def velocity(x: Tensor, t: Tensor) -> Tensor:
                with self._autocast():
                    return self.model.velocity(module, x, t, text)

            return velocity
        empty = self.empty_text().repeat_interleave(len(text))
        both = TextEmbedding.cat([text, empty])

        def guided(x: Tensor, t: Tensor) -> Tensor:
            with self._autocast():
                v = self.model.velocity(module, torch.cat([x, x]), torch.cat([t, t]), both).float()
            conditional, unconditional = v.chunk(2)
            return unconditional + guidance_scale * (conditional - unconditional)

        return guided

    def empty_text(self) -> TextEmbedding:
        if self._empty_text is None:
            self._empty_text = self.encode_text([""])
        return self._empty_text

    def _bar(self, total: int, description: str):
        return tqdm(total=total, desc=description, leave=False, disable=not self.progress, dynamic_ncols=True)

    # ------------------------------------------------------------ one iteration

    def rollout(
        self,
        module: nn.Module | CudaGraphRollout,
        text: TextEmbedding,
        *,
        indices: list[int],
        seed: int,
        iteration: int,
        sampler: str,
        grid: Tensor,
        guidance_scale: float,
        batch_size: int,
        purpose: str,
        on_batch: Callable[[Tensor, list[int]], None] | None = None,
    ) -> Tensor:
        """Clean samples [len(text), *sample_shape], one per row of text, with noise keyed by
        (seed, iteration, global image index indices[row], purpose); on_batch(samples, rows) is
        called as each sampler batch completes."""
        shape = self.model.sample_shape
        samples = []
        with torch.no_grad(), self._bar(len(text), f"rollout {iteration}") as bar:
            for start in range(0, len(text), batch_size):
                rows = list(range(start, min(start + batch_size, len(text))))
                batch = [indices[row] for row in rows]
                noise = keyed_randn(shape, seed, iteration, batch, purpose, device=self.device)

                def step_noise(step: int, batch=batch) -> Tensor:
                    return keyed_randn(shape, seed, iteration, batch, "sde_noise", step, device=self.device)

                velocity = self.velocity_fn(module, text.index(rows), guidance_scale)
                samples.append(
                    sample(
                        sampler,
                        velocity,
                        noise,
                        grid,
                        noise_level=self.config.rollout.sde_noise_level,
                        step_noise=step_noise,
                    )
                )
                if on_batch is not None:
                    on_batch(samples[-1], rows)
                bar.update(len(rows))
        return torch.cat(samples)

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict], batch_size: int,
              keep_images: bool = False) -> tuple[RewardOutput, Tensor | None]:  # fmt: skip
        """Decodes and scores in batches; returns the weighted sum with per-reward extras, and the
        decoded images when keep_images (rollouts do not keep them: they can be large)."""
        outputs, kept = [], []
        for start in range(0, len(samples), batch_size):
            stop = start + batch_size
            images = self.model.decode(samples[start:stop])
            outputs.append(self.rewards(images, prompts[start:stop], metadata[start:stop]))
            if keep_images:
                kept.append(images)
        return RewardOutput.cat(outputs), torch.cat(kept) if keep_images else None

    def iteration_text(self, prompts: list[str], image_groups: Tensor) -> TextEmbedding:
        """The conditioning of each image (image_groups: its prompt's row in prompts), reused by
        rollout and training. per_prompt and cached encode each prompt once; per_image re-encodes
        every image's prompt in rollout-sized batches, as the reference code does."""
        if self.config.model.text_encoding != "per_image":
            text = self.encode_text(prompts)
            return text.index(image_groups.to(text.sequence.device))
        image_prompts = [prompts[g] for g in image_groups.tolist()]
        size = self.config.rollout.batch_size
        return TextEmbedding.cat(
            [self.model.encode_text(image_prompts[s : s + size]) for s in range(0, len(image_prompts), size)]
        )

    def gather_rewards(self, local: RewardOutput, indices: list[int], count: int) -> RewardOutput:
        """Every rank's scores (and extras) in global image order, on every rank."""
        rows = gather_rows(
            self.world, {"score": local.score, **{f"extra.{k}": v for k, v in local.extras.items()}}, indices, count
        )
        return RewardOutput(rows.pop("score"), {key.removeprefix("extra."): value for key, value in rows.items()})

    def iteration_batch(self, iteration: int) -> IterationBatch:
        """The prompts of `iteration` and this rank's images of them."""
        config = self.config
        chosen = prompt_indices(len(self.train_prompts), iteration, config.rollout.groups, config.seed)
        prompts = [self.train_prompts.prompts[i] for i in chosen]
        groups = torch.arange(len(prompts)).repeat_interleave(config.rollout.group_size)
        return IterationBatch(
            iteration, prompts, [self.train_prompts.metadata[i] for i in chosen], groups, self.image_indices
        )

    def roll_out(
        self, batch: IterationBatch, on_batch: Callable[[Tensor, list[int]], None] | None = None
    ) -> tuple[Tensor, TextEmbedding]:
        """Phase 1: this rank's images from the old policy, and their conditioning."""
        config = self.config
        text = self.iteration_text(batch.prompts, batch.my_groups)
        with self.policies.role("old") as old:
            x0 = self.rollout(
                old if self.rollout_graph is None else self.rollout_graph,
                text,
                seed=config.seed,
                iteration=batch.iteration,
                sampler=config.rollout.sampler,
                indices=batch.mine,
                grid=self.grid,
                guidance_scale=config.rollout.guidance_scale,
                batch_size=config.rollout.batch_size,
                purpose="rollout_noise",
                on_batch=on_batch,
            )
        return x0, text

    def roll_out_scoring(self, batch: IterationBatch) -> tuple[Tensor, TextEmbedding, RewardOutput]:
        """Phases 1 and 2 overlapped: each sampler batch is scored on a worker while the next one
        is sampled (rollout.overlap_reward)."""
        scoring = OverlappedScoring(self._score_batch, self.device)
        groups = batch.my_groups.tolist()

        def submit(samples: Tensor, rows: list[int]) -> None:
            prompts = [batch.prompts[groups[row]] for row in rows]
            scoring.submit(samples, prompts, [batch.metadata[groups[row]] for row in rows])

        x0, text = self.roll_out(batch, on_batch=submit)
        return x0, text, scoring.results()

    def _score_batch(self, samples: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return self.score(samples, prompts, metadata, len(samples))[0]

    def rank(
        self, batch: IterationBatch, x0: Tensor, local: RewardOutput | None = None
    ) -> tuple[RewardOutput, Optimality]:
        """Phase 2: decode and score this rank's images (unless their scores `local` are given),
        gather every rank's scores (a prompt's K images may live on several ranks), and turn them
        into optimality probabilities."""
        config = self.config
        if local is None:
            groups = batch.my_groups.tolist()
            local, _ = self.score(
                x0, [batch.prompts[g] for g in groups], [batch.metadata[g] for g in groups], config.rollout.batch_size
            )
        rewards = self.gather_rewards(local, batch.mine, len(batch.groups))
        optimality = optimality_probabilities(
            rewards.score, batch.groups, adv_clip_max=config.nft.adv_clip_max, std_scope=config.nft.std_scope
        )
        return rewards, optimality

    def run_iteration(self) -> dict[str, Any]:
        """Runs iteration self.iteration (0-based) and returns its metrics row."""
        config = self.config
        iteration = self.iteration
        self.in_iteration = True
        started = time.perf_counter()
        batch = self.iteration_batch(iteration)
        if config.rollout.overlap_reward:
            x0, text, local = self.roll_out_scoring(batch)
        else:
            x0, text = self.roll_out(batch)
            local = None
        rolled_out = time.perf_counter()
        rewards, optimality = self.rank(batch, x0, local)
        scored = time.perf_counter()

        self.last_rollout = (x0[:16], [batch.prompts[g] for g in batch.my_groups[:16].tolist()])  # sample grids
        probability = optimality.probability[batch.mine].to(self.device)
        train_metrics = self.train(x0, text, probability, iteration, batch.mine)
        old = config.old_policy
        eta = old_policy_eta(old.schedule, self.optimizer_steps, old.eta_rate, old.eta_max)
        self.policies.update_old_policy(eta)
        self.iteration += 1
        self.in_iteration = False
        finished = time.perf_counter()

        row: dict[str, Any] = {
            "iteration": self.iteration,
            "reward_mean": float(rewards.score.mean()),
            "reward_std": float(rewards.score.std(correction=0)),
        }
        row.update({key: float(value.mean()) for key, value in rewards.extras.items()})
        row.update(
            {
                "group_std_mean": optimality.group_std_mean,
                "zero_std_ratio": optimality.zero_std_ratio,
                **train_metrics,
                "eta": eta,
                "optimizer_steps": self.optimizer_steps,
                "time_rollout": rolled_out - started,
                "time_reward": scored - rolled_out,
                "time_train": finished - scored,
                "images_per_sec": len(batch.groups) / (finished - started),
            }
        )
        return row

    def train(
        self, x0: Tensor, text: TextEmbedding, probability: Tensor, iteration: int, indices: list[int]
    ) -> dict[str, float]:
        """The NFT update on this rank's clean samples (global image indices `indices`): one or more
        optimizer steps, EMA after each. Gradients accumulate locally and synchronise across
        ranks on the last (micro-batch, timestep) pair of each optimizer step."""
        config = self.config
        nft = config.nft
        steps = config.rollout.steps
        trained_times = int(nft.timestep_fraction * steps)
        count = len(x0)
        subsets = torch.stack(
            [
                torch.randperm(steps, generator=generator(config.seed, iteration, index, "timestep_subset"))[
                    :trained_times
                ]
                for index in indices
            ]
        )
        micro_batches = [list(range(s, s + nft.micro_batch_size)) for s in range(0, count, nft.micro_batch_size)]
        per_step = len(micro_batches) // config.optim.steps_per_iteration
        pairs_per_step = per_step * trained_times
        sums = dict.fromkeys(["loss", "positive_loss", "negative_loss", "kl", "old_deviation", "x0_norm"], 0.0)
        grad_norms = []
        shape = self.model.sample_shape
        with self._bar(len(micro_batches) * trained_times, f"train {iteration}") as bar:
            for number, positions in enumerate(micro_batches):
                rows = torch.tensor(positions, device=self.device)
                clean = x0[rows]
                cond = text.index(rows)
                r = probability[rows]
                image_ids = [indices[p] for p in positions]
                for slot in range(trained_times):
                    t = self.grid[subsets[positions, slot]].to(self.device)
                    noise = keyed_randn(
                        shape, config.seed, iteration, image_ids, "training_noise", slot, device=self.device
                    )
                    syncs = (number + 1) % per_step == 0 and slot == trained_times - 1
                    with gradient_sync(self.policies.grad_module, syncs):
                        out = self.nft_step(clean, noise, t, r, cond)
                        loss = out.loss / pairs_per_step
                        (self.grad_scaler.scale(loss) if self.grad_scaler else loss).backward()
                    sums["loss"] += float(out.loss.detach())
                    for key in ("positive_loss", "negative_loss", "kl", "old_deviation", "x0_norm"):
                        sums[key] += float(getattr(out, key).mean())
                    bar.update(1)
                if (number + 1) % per_step == 0:
                    grad_norms.append(self.optimizer_step())
        pairs = len(micro_batches) * trained_times
        metrics = mean_over_ranks(self.world, {key: value / pairs for key, value in sums.items()})
        if nft.kl_coef == 0:
            metrics["kl"] = None
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return metrics

    def nft_step(self, x0: Tensor, noise: Tensor, t: Tensor, r: Tensor, text: TextEmbedding):
        """One (micro-batch, timestep) pair: old (and reference) forwards without grad, the
        trained forward with grad, and the NFT loss."""
        nft = self.config.nft
        t_b = t.view(-1, *[1] * (x0.ndim - 1))
        x_t = (1 - t_b) * x0 + t_b * noise
        with torch.no_grad():
            v_ref = None
            if nft.kl_coef > 0 and nft.batch_old_ref:  # one forward of 2n rows: old, then reference
                with self.policies.old_then_reference() as both:
                    velocity = self.velocity_fn(both, TextEmbedding.cat([text, text]), 1.0)
                    v_old, v_ref = velocity(torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)
            else:
                with self.policies.role("old") as old:
                    v_old = self.velocity_fn(old, text, 1.0)(x_t, t)
                if nft.kl_coef > 0:
                    with self.policies.role("ref") as ref:
                        v_ref = self.velocity_fn(ref, text, 1.0)(x_t, t)
        with self.policies.role("trained"):
            v_theta = self.velocity_fn(self.policies.grad_module, text, 1.0)(x_t, t)
        options = dict(
            beta=nft.beta, v_ref=v_ref, kl_coef=nft.kl_coef, adv_clip_max=nft.adv_clip_max,
            loss_space=nft.loss_space, eps=nft.eps,
        )  # fmt: skip
        if nft.loss_backend == "reference":  # the reference code's eager loss, adaptive weights in float64
            return nft_loss_torch(v_theta, v_old, x0, noise, t, r, **options, weight_dtype=torch.float64)
        return nft_loss(v_theta, v_old, x0, noise, t, r, **options, backend=nft.loss_backend)

    def optimizer_step(self) -> float:
        """Clip, step, zero the gradients, then the EMA step; returns the pre-clip grad norm."""
        parameters = list(self.policies.trained_parameters().values())
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        if self.config.ema.enabled:
            self.policies.update_ema(ema_decay(self.optimizer_steps, self.config.ema.max_decay))
        return float(norm)

    # ------------------------------------------------------------ evaluation

    def evaluate(
        self,
        prompts: PromptSet,
        *,
        guidance_scale: float | None = None,
        use_ema: bool = True,
        keep: list[int] | None = None,
    ) -> tuple[dict[str, float], Tensor]:
        """Held-out prompts with fixed seeds (eval.images_per_prompt images each, prompt-major),
        split across ranks: mean reward, per-reward means and every extra's mean (e.g.
        eval_accuracy). Returns (metrics, images): the images of global indices `keep` (all when
        None), on every rank."""
        config = self.config.eval
        guidance = config.guidance_scale if guidance_scale is None else guidance_scale
        context = self.policies.ema_weights() if use_ema and self.config.ema.enabled else self.policies.role("trained")
        repeats = config.images_per_prompt
        count = len(prompts) * repeats
        indices, real = even_shard(count, self.world)
        prompt_rows = [index // repeats for index in indices]
        text = self.encode_text(prompts.prompts).index(torch.tensor(prompt_rows, device=self.device))
        prompt_list = [prompts.prompts[row] for row in prompt_rows]
        metadata = [prompts.metadata[row] for row in prompt_rows]
        with context as module:
            samples = self.rollout(
                module,
                text,
                indices=indices,
                seed=config.seed,
                iteration=0,
                sampler=config.sampler,
                grid=self.eval_grid,
                guidance_scale=guidance,
                batch_size=config.batch_size,
                purpose="eval_noise",
            )
        local, images = self.score(samples, prompt_list, metadata, config.batch_size, keep_images=True)
        rewards = self.gather_rewards(
            RewardOutput(local.score[:real], {k: v[:real] for k, v in local.extras.items()}), indices[:real], count
        )
        wanted = list(range(count)) if keep is None else keep
        position = {index: slot for slot, index in enumerate(wanted)}
        mine = [(row, position[index]) for row, index in enumerate(indices[:real]) if index in position]
        images = gather_rows(
            self.world, {"image": images[[row for row, _ in mine]]}, [slot for _, slot in mine], len(wanted)
        )["image"]
        metrics = {"eval_reward_mean": float(rewards.score.mean())}
        metrics.update({f"eval_{key}": float(value.mean()) for key, value in rewards.extras.items()})
        return metrics, images


def load_lora_into(policies: LoraPolicies, path: str) -> None:
    """Warm start: copies a LoRA safetensors file (diffusers or peft names) into both adapters."""
    from safetensors.torch import load_file

    state = load_file(path)
    trained = policies.trained_parameters()
    loaded = 0
    for key, tensor in state.items():
        name = key.removeprefix("transformer.").replace(".lora_A.weight", ".lora_A.default.weight")
        name = name.replace(".lora_B.weight", ".lora_B.default.weight")
        if name not in trained:
            continue
        if trained[name].shape != tensor.shape:
            raise ValueError(
                f"model.init_lora: {key} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(trained[name].shape)} (lora.rank differs?)"
            )
        with torch.no_grad():
            trained[name].copy_(tensor)
            policies.old_parameters()[name].copy_(tensor)
            policies.ema[name].copy_(tensor)
        loaded += 1
    if loaded == 0:
        raise ValueError(f"model.init_lora: {path} holds no LoRA weight for lora.target_modules")
