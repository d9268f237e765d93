"""The NFT update on clean samples (docs/algorithm.md, sections 5 and 6): each image trains on
int(timestep_fraction * steps) grid times in random order with fresh noise; gradients of all
(micro-batch, timestep) pairs of an optimizer step accumulate locally and synchronise across
ranks on the step's last pair; clip, step, then the EMA step.

No host sync per pair: the loss and diagnostics accumulate on the device (float64, in pair
order) and are read once, when the update ends. Each optimizer step reads one pair of numbers,
whether its loss and grad norm are finite and that norm: a step that is not finite is skipped
(gradients dropped, no optimizer or EMA step) and counted, and optim.max_skipped_steps skipped in
a row stop the run (NonFiniteError).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from fastnft.config import Config, ConfigError
from fastnft.distributed import World, gradient_sync, mean_over_ranks
from fastnft.models import TextEmbedding
from fastnft.optimizers import from_quantized_parts, quantized_parts
from fastnft.policy import Policies
from fastnft.rng import generator, keyed_randn
from fastnft.rollout import progress_bar
from fastnft.schedules import adapted_kl_coef, ema_decay, lr_factor
from fastnft.velocity import Velocity
from fastnft_kernels import NFTLossOutput, nft_loss, nft_loss_torch

PAIR_METRICS = ("loss", "positive_loss", "negative_loss", "kl", "old_deviation", "x0_norm")
_OPTIMIZER_OPTIONS = StateDictOptions(ignore_frozen_params=True)


class NonFiniteError(ConfigError):
    """optim.max_skipped_steps optimizer steps in a row had a non-finite loss or grad norm. A
    ConfigError, so that the CLI reports it as one line naming the field (exit 2); the run keeps
    its last checkpoint."""


class NFTUpdate:
    """Owns the optimizer, the GradScaler (reference precision on a GPU) and the optimizer-step
    count; Stateful for checkpoints."""

    def __init__(
        self,
        config: Config,
        *,
        policies: Policies,
        velocity: Velocity,
        optimizer: torch.optim.Optimizer,
        grad_scaler: torch.amp.GradScaler | None,
        grid: Tensor,
        sample_shape: tuple[int, ...],
        world: World,
        device: torch.device,
        progress: bool,
    ) -> None:
        self.config = config
        self.policies = policies
        self.velocity = velocity
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.grid = grid
        self.sample_shape = sample_shape
        self.world = world
        self.device = device
        self.progress = progress
        self.steps = 0  # optimizer steps so far
        self.kl_coef = config.nft.kl_coef  # adapted after each iteration when nft.kl_target is set
        # Skipped steps in a row, across iterations; not checkpointed: a resume starts at 0.
        self.skipped_in_a_row = 0

    def __call__(
        self, x0: Tensor, text: TextEmbedding, probability: Tensor, iteration: int, indices: list[int]
    ) -> dict[str, float | None]:
        """Trains on this rank's clean samples x0 (global image indices `indices`, optimality
        probabilities `probability`): optim.steps_per_iteration optimizer steps at this
        iteration's learning rate. Returns the mean of each pair metric over the pairs and ranks
        and the mean pre-clip grad norm, both over the steps taken (NaN when every step was
        skipped), the number skipped, the learning rate and the KL coefficient used; then adapts
        the coefficient for the next iteration (nft.kl_target)."""
        config = self.config
        nft = config.nft
        optim = config.optim
        lr = optim.lr * lr_factor(optim.lr_schedule, iteration, config.iterations, optim.lr_final_fraction)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):  # torchao's 8-bit AdamW keeps it as a tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        steps = config.rollout.steps
        trained_times = int(nft.timestep_fraction * steps)
        subsets = torch.stack(
            [
                torch.randperm(steps, generator=generator(config.seed, iteration, index, "timestep_subset"))
                for index in indices
            ]
        )[:, :trained_times]
        micro_batches = [list(range(s, s + nft.micro_batch_size)) for s in range(0, len(x0), nft.micro_batch_size)]
        per_step = len(micro_batches) // config.optim.steps_per_iteration
        pairs_per_step = per_step * trained_times
        sums = torch.zeros(len(PAIR_METRICS), dtype=torch.float64, device=self.device)
        step_start = sums.clone()  # the sums before this step's pairs: a skipped step goes back to it
        grad_norms: list[float] = []
        with progress_bar(len(micro_batches) * trained_times, f"train {iteration}", self.progress) as bar:
            for number, positions in enumerate(micro_batches):
                rows = torch.tensor(positions, device=self.device)
                clean, cond, r = x0[rows], text.index(rows), probability[rows]
                image_ids = [indices[p] for p in positions]
                for slot in range(trained_times):
                    t = self.grid[subsets[positions, slot]].to(self.device)
                    noise = keyed_randn(
                        self.sample_shape, config.seed, iteration, image_ids, "training_noise", slot, device=self.device
                    )
                    syncs = (number + 1) % per_step == 0 and slot == trained_times - 1
                    with gradient_sync(self.policies.grad_module, syncs):
                        out = self.pair_loss(clean, noise, t, r, cond)
                        loss = out.loss / pairs_per_step
                        (self.grad_scaler.scale(loss) if self.grad_scaler else loss).backward()
                    pair = [out.loss.detach(), *(getattr(out, key).detach().mean() for key in PAIR_METRICS[1:])]
                    sums += torch.stack([value.double() for value in pair])
                    bar.update(1)
                if (number + 1) % per_step == 0:
                    norm = self.optimizer_step(sums[0] - step_start[0])
                    if norm is None:
                        sums.copy_(step_start)
                        self._count_skip(iteration)
                    else:
                        grad_norms.append(norm)
                        self.skipped_in_a_row = 0
                    step_start.copy_(sums)
        pairs = len(grad_norms) * pairs_per_step
        means = mean_over_ranks(self.world, sums / pairs if pairs else sums.fill_(math.nan))
        metrics: dict[str, float | None] = dict(zip(PAIR_METRICS, means.tolist(), strict=True))
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
        metrics["skipped_steps"] = config.optim.steps_per_iteration - len(grad_norms)
        metrics["lr"] = lr
        if nft.kl_coef == 0:
            metrics["kl"] = None
        else:
            metrics["kl_coef"] = self.kl_coef
            if nft.kl_target is not None:
                self.kl_coef = adapted_kl_coef(self.kl_coef, metrics["kl"], nft.kl_target, nft.kl_coef)
        return metrics

    def _count_skip(self, iteration: int) -> None:
        self.skipped_in_a_row += 1
        limit = self.config.optim.max_skipped_steps
        if self.skipped_in_a_row >= limit:
            raise NonFiniteError(
                f"optim.max_skipped_steps: {limit} optimizer steps in a row had a non-finite loss or gradient "
                f"norm, the last in iteration {iteration + 1}; stopped with the last checkpoint kept "
                "(a lower optim.lr or optim.grad_clip may help)"
            )

    def pair_loss(self, x0: Tensor, noise: Tensor, t: Tensor, r: Tensor, text: TextEmbedding) -> NFTLossOutput:
        """One (micro-batch, timestep) pair: old (and reference) velocities without grad, the
        trained velocity with grad, and the NFT loss."""
        nft = self.config.nft
        policies, velocity = self.policies, self.velocity
        t_b = t.view(-1, *[1] * (x0.ndim - 1))
        x_t = (1 - t_b) * x0 + t_b * noise
        with torch.no_grad():
            v_ref = None
            if nft.kl_coef > 0 and nft.batch_old_ref:  # one forward of 2n rows: old, then reference
                with policies.old_then_reference() as both:
                    doubled = velocity(both, torch.cat([x_t, x_t]), torch.cat([t, t]), TextEmbedding.cat([text, text]))
                v_old, v_ref = doubled.chunk(2)
            else:
                with policies.role("old") as old:
                    v_old = velocity(old, x_t, t, text)
                if nft.kl_coef > 0:
                    with policies.role("ref") as ref:
                        v_ref = velocity(ref, x_t, t, text)
        with policies.role("trained"):
            v_theta = velocity(policies.grad_module, x_t, t, text)
        options: dict[str, Any] = {
            "beta": nft.beta,
            "v_ref": v_ref,
            "kl_coef": self.kl_coef,
            "adv_clip_max": nft.adv_clip_max,
            "loss_space": nft.loss_space,
            "eps": nft.eps,
        }
        if nft.loss_backend == "reference":  # the reference code's eager loss, adaptive weights in float64
            return nft_loss_torch(v_theta, v_old, x0, noise, t, r, **options, weight_dtype=torch.float64)
        return nft_loss(v_theta, v_old, x0, noise, t, r, **options, backend=nft.loss_backend)

    def optimizer_step(self, loss: Tensor) -> float | None:
        """Clip, step, zero the gradients, then the EMA step; returns the pre-clip grad norm. A
        step whose loss (this rank's sum over its pairs, a device scalar) or grad norm is not
        finite on any rank is skipped instead: gradients dropped, no optimizer or EMA step;
        returns None. The decision reads the device once per step."""
        parameters = list(self.policies.trained_parameters().values())
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
        bad = ~torch.isfinite(loss)
        if self.grad_scaler is None:  # a GradScaler skips inf gradients itself, and lowers its scale
            bad = bad | ~torch.isfinite(norm)
        bad = bad.double()
        if self.world.size > 1:  # every rank must take the same decision
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        skipped, norm_value = torch.stack([bad, norm.double()]).tolist()
        if skipped:
            if self.grad_scaler is not None:
                self.grad_scaler.update()  # ends this step's unscale_
            self.optimizer.zero_grad(set_to_none=True)
            return None
        for parameter in parameters:
            # one the loss does not reach (Qwen-Image's last text-stream layers) takes its first
            # step with a zero gradient rather than none, so the optimizer's state covers every
            # trained parameter and a resumed run finds each one's state in the checkpoint; later
            # steps skip it (no weight decay on a layer that never trains)
            if parameter.grad is None and parameter not in self.optimizer.state:
                parameter.grad = torch.zeros_like(parameter)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.config.ema.enabled:
            self.policies.update_ema(ema_decay(self.steps, self.config.ema.max_decay))
        return norm_value

    def _optimizer_state(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.policies.transformer, self.optimizer, options=_OPTIMIZER_OPTIONS)

    def state_dict(self) -> dict[str, Any]:
        optimizer = self._optimizer_state()
        optimizer["state"] = {
            name: {key: quantized_parts(value) for key, value in per_parameter.items()}
            for name, per_parameter in optimizer["state"].items()
        }
        state = {"optimizer": optimizer, "steps": self.steps, "kl_coef": self.kl_coef}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        live = self._optimizer_state()["state"]
        optimizer = dict(state["optimizer"])
        optimizer["state"] = {
            name: {key: from_quantized_parts(value, live[name][key]) for key, value in per_parameter.items()}
            for name, per_parameter in optimizer["state"].items()
        }
        set_optimizer_state_dict(
            self.policies.transformer, self.optimizer, optim_state_dict=optimizer, options=_OPTIMIZER_OPTIONS
        )
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.steps = int(state["steps"])
        self.kl_coef = float(state["kl_coef"])
