"""The DiffusionNFT iteration (docs/algorithm.md, section 3). The Trainer builds the components
and composes them; they compute:

- rollout.py: the iteration's prompts, K images per prompt from the OLD policy, their scores and
  optimality probabilities;
- update.py: the NFT loss on the clean images, the optimizer and EMA steps;
- then the old-policy soft update (policy.py);
- evaluation.py: held-out prompts with the EMA weights.

run.py drives the iterations on disk (cadences, checkpoints, exports, a clean stop).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from fastnft.checkpoint import Progress
from fastnft.conditioning import TextConditioning
from fastnft.config import Config, ConfigError, check_recipe
from fastnft.distributed import World, image_shard, init_world, resolve_device
from fastnft.evaluation import Evaluator
from fastnft.models import ModelAdapter, build_model, check_model_rules
from fastnft.models.presets import seeded
from fastnft.optimizers import build_optimizer
from fastnft.policy import Policies, build_policies, frozen_weight_dtype
from fastnft.prompts import PromptSet
from fastnft.quantize import quantize_frozen_base
from fastnft.rewards import WeightedRewards
from fastnft.rollout import KeyedSampler, Rollout, Scorer
from fastnft.schedules import old_policy_eta
from fastnft.speed import CudaGraphRollout, SpeedReport, apply_attention, apply_compile
from fastnft.update import NFTUpdate
from fastnft.velocity import Velocity, autocast_dtype


def build_policy_model(
    config: Config, world: World, device: torch.device
) -> tuple[ModelAdapter, Policies, SpeedReport]:
    """The model with its frozen modules frozen (and quantized: model.quantize, quantize_text), the
    attention switch and gradient checkpointing applied, and the policies on it (distributed over
    the process group)."""
    check_model_rules(config)
    model = build_model(config.model, config.seed, device, frozen_weight_dtype(config))
    for module in model.frozen_modules().values():
        module.requires_grad_(False).eval()
    quantize_frozen_base(model.transformer, model.text_encoders(), config.model, frozen_weight_dtype(config))
    speed = SpeedReport(attention=apply_attention(model.transformer, config.model.attention))
    if config.model.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    with seeded(config.seed):  # LoRA's gaussian init draws from the global generator
        policies = build_policies(config, model.transformer, model.default_lora_targets)
    if world.size > 1:
        policies.distribute(config.dist.strategy, device, frozen_weight_dtype(config))
    return model, policies, speed


def build_rewards(config: Config) -> WeightedRewards:
    try:
        return WeightedRewards(
            [(r.name, r.weight, r.options) for r in config.rewards], [r.frames for r in config.rewards]
        )
    except (ValueError, ImportError) as error:
        raise ConfigError(f"rewards: {error}") from error


class Trainer:
    def __init__(self, config: Config, *, progress: bool | None = None) -> None:
        self.config = config
        self.world = init_world(config)
        check_recipe(config, self.world.size)
        self.device = resolve_device(config.device, self.world)
        if config.rollout.cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"rollout.cuda_graphs: CUDA graphs need a CUDA device; this run is on {self.device}")
        progress = (config.logging.progress if progress is None else progress) and self.world.is_main
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        self.model, self.policies, self.speed = build_policy_model(config, self.world, self.device)
        if config.compile.enabled:
            self.speed.compiled_blocks = sum(apply_compile(m, config.compile) for m in self.policies.modules())
        cuda_graph = None
        if config.rollout.cuda_graphs:
            with self.policies.role("old") as old:
                cuda_graph = CudaGraphRollout(old)
            self.speed.rollout_cuda_graphs = True
        self.speed.autocast = autocast_dtype(config.model.precision, self.device)
        scorer = Scorer(self.model, build_rewards(config), self.world)
        self.train_prompts = PromptSet.load(config.prompts.train)
        self.eval_prompts = PromptSet.load(config.prompts.eval) if config.prompts.eval else None
        conditioning = TextConditioning.build(
            self.model,
            config.model.text_encoding,
            batch_size=config.rollout.batch_size,
            prompts=[*self.train_prompts.prompts, *(self.eval_prompts.prompts if self.eval_prompts else [])],
            device=self.device,
            offload_encoders=config.model.offload_text_encoders,
        )
        velocity = Velocity(self.model, self.speed.autocast, conditioning.empty)
        sampler = KeyedSampler(
            velocity,
            self.model.sample_shape,
            self.device,
            sde_noise_level=config.rollout.sde_noise_level,
            progress=progress,
        )
        grid = self.model.timestep_grid(config.rollout.steps, config.rollout.shift)
        self.rollout = Rollout(
            config,
            prompts=self.train_prompts,
            image_indices=image_shard(
                config.rollout.groups * config.rollout.group_size, config.optim.steps_per_iteration, self.world
            ),
            conditioning=conditioning,
            policies=self.policies,
            sampler=sampler,
            scorer=scorer,
            grid=grid,
            cuda_graph=cuda_graph,
        )
        self.update = NFTUpdate(
            config,
            policies=self.policies,
            velocity=velocity,
            optimizer=build_optimizer(config.optim, list(self.policies.trained_parameters().values())),
            grad_scaler=torch.amp.GradScaler("cuda") if self.speed.autocast is not None else None,
            grid=grid,
            sample_shape=self.model.sample_shape,
            world=self.world,
            device=self.device,
            progress=progress,
        )
        self.evaluator = Evaluator(
            config.eval,
            policies=self.policies,
            use_ema_weights=config.ema.enabled,
            conditioning=conditioning,
            sampler=sampler,
            grid=self.model.timestep_grid(config.eval.steps, config.rollout.shift),
            model=self.model,
            scorer=scorer,
            world=self.world,
        )
        self.progress = Progress()
        self.in_iteration = False  # true while an iteration is half done (its state is inconsistent)
        self.last_rollout: tuple[torch.Tensor, list[str]] | None = None  # for the sample grids

    def run_iteration(self) -> dict[str, Any]:
        """Runs iteration self.iteration (0-based) and returns its metrics row."""
        self.in_iteration = True
        started = time.perf_counter()
        batch = self.rollout.batch(self.iteration)
        samples = self.rollout.sample(batch)
        sampled = time.perf_counter()
        scored = self.rollout.score(batch, samples)
        scored_at = time.perf_counter()
        self.last_rollout = (samples.x0[:16], batch.my_prompts()[0][:16])
        trained = self.update(samples.x0, samples.text, scored.probability, self.iteration, batch.mine)
        old = self.config.old_policy
        eta = old_policy_eta(old.schedule, self.update.steps, old.eta_rate, old.eta_max)
        self.policies.update_old_policy(eta)
        self.progress.iteration += 1
        self.in_iteration = False
        finished = time.perf_counter()

        rewards, optimality = scored.rewards, scored.optimality
        return {
            "iteration": self.iteration,
            "reward_mean": float(rewards.score.mean()),
            "reward_std": float(rewards.score.std(correction=0)),
            **{key: float(value.mean()) for key, value in rewards.extras.items()},
            "group_std_mean": optimality.group_std_mean,
            "zero_std_ratio": optimality.zero_std_ratio,
            **trained,
            "eta": eta,
            "optimizer_steps": self.update.steps,
            "time_rollout": sampled - started,
            "time_reward": scored_at - sampled,
            "time_train": finished - scored_at,
            "images_per_sec": len(batch.groups) / (finished - started),
        }

    @property
    def iteration(self) -> int:
        """Completed iterations."""
        return self.progress.iteration

    def checkpoint_parts(self) -> dict[str, Stateful]:
        """The training state, part by part (checkpoint.py saves and loads them)."""
        return {"policies": self.policies, "update": self.update, "progress": self.progress}
