"""A run's EMA weights for `fastnft sample` and `fastnft eval`: the model, the policies restored
from a checkpoint and an Evaluator. No optimizer and no training prompts; the reward models are
loaded only to score (eval), so sampling never needs them."""

from __future__ import annotations

from pathlib import Path

from fastnft.checkpoint import Progress, load_from
from fastnft.conditioning import TextConditioning
from fastnft.config import Config
from fastnft.distributed import World, init_world, resolve_device
from fastnft.evaluation import Evaluator
from fastnft.prompts import PromptSet
from fastnft.rollout import KeyedSampler, Scorer
from fastnft.trainer import build_policy_model, build_rewards
from fastnft.velocity import Velocity, autocast_dtype


def load_evaluator(
    config: Config, checkpoint: Path, prompts: PromptSet, *, with_rewards: bool
) -> tuple[Evaluator, World, int]:
    """(evaluator, world, the checkpoint's iteration) for the run of `config`. `checkpoint` is a
    checkpoint, or a run directory: its newest checkpoint that loads."""
    world = init_world(config)
    device = resolve_device(config.device, world)
    model, policies, _ = build_policy_model(config, world, device)
    progress = Progress()
    load_from({"policies": policies, "progress": progress}, checkpoint)
    conditioning = TextConditioning.build(
        model,
        config.model.text_encoding,
        batch_size=config.eval.batch_size,
        prompts=prompts.prompts,
        device=device,
        offload_encoders=False,
    )
    velocity = Velocity(model, autocast_dtype(config.model.precision, device), conditioning.empty)
    sampler = KeyedSampler(
        velocity,
        model.sample_shape,
        device,
        sde_noise_level=config.rollout.sde_noise_level,
        progress=config.logging.progress and world.is_main,
    )
    evaluator = Evaluator(
        config.eval,
        policies=policies,
        use_ema_weights=config.ema.enabled,
        conditioning=conditioning,
        sampler=sampler,
        grid=model.timestep_grid(config.eval.steps, config.rollout.shift),
        model=model,
        scorer=Scorer(model, build_rewards(config), world) if with_rewards else None,
        world=world,
    )
    return evaluator, world, progress.iteration
