"""The phases of one iteration, driven through the trainer's own components (the calls
Trainer.run_iteration makes), repeatable on fixed inputs: rollout (prompt encoding + sampling),
reward (decode, score, gather, optimality), train (the NFT update), iteration (all of it)."""

from __future__ import annotations

from collections.abc import Callable

from fastnft.bench.switches import count_rows
from fastnft.rollout import Samples, Scored
from fastnft.trainer import Trainer

PHASES = ("rollout", "reward", "train", "iteration")
UNITS = {"rollout": "img/s", "reward": "img/s", "train": "samples/s", "iteration": "img/s"}


class PhaseRunner:
    """One path's trainer and the fixed batch of iteration 0: every phase repeats on the same
    inputs (a later phase reuses the first result of the phase before it)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.batch = trainer.rollout.batch(0)
        self.samples: Samples | None = None
        self.scored: Scored | None = None
        config = trainer.config
        self.images = len(self.batch.mine)
        self.trained_times = int(config.nft.timestep_fraction * config.rollout.steps)

    def rollout(self) -> Samples:
        self.samples = self.trainer.rollout.sample(self.batch)
        return self.samples

    def reward(self) -> Scored:
        self.scored = self.trainer.rollout.score(self.batch, self.samples or self.rollout())
        return self.scored

    def train(self) -> None:
        scored = self.scored or self.reward()
        self.trainer.update(self.samples.x0, self.samples.text, scored.probability, 0, self.batch.mine)

    def phase(self, name: str) -> Callable[[], object]:
        return {"rollout": self.rollout, "reward": self.reward, "train": self.train}.get(
            name, self.trainer.run_iteration
        )

    def work(self, name: str) -> int:
        """Images per call, or (image, timestep) samples for the train phase."""
        return self.images * self.trained_times if name == "train" else self.images

    def count_forwards(self) -> dict[str, float]:
        """Text-encoder rows of an iteration's data collection, and transformer rows per trained
        sample and calls per (micro-batch, timestep) pair of its update."""
        trainer = self.trainer
        transformers = {f"policy{i}": m for i, m in enumerate(trainer.policies.modules())}
        counts, remove = count_rows({**trainer.model.text_encoders(), **transformers})
        try:
            self.rollout()
            self.reward()
            for name in transformers:
                counts[name] = counts[f"{name}.calls"] = 0
            self.train()
        finally:
            remove()
        micro_batch = trainer.config.nft.micro_batch_size
        pairs = -(-self.images // micro_batch) * self.trained_times
        return {
            "text_encoder_rows_per_iteration": max((counts[n] for n in trainer.model.text_encoders()), default=0),
            "forwards_per_sample": sum(counts[n] for n in transformers) / (self.images * self.trained_times),
            "transformer_calls_per_pair": sum(counts[f"{n}.calls"] for n in transformers) / pairs,
        }

    def count_flops(self) -> dict[str, float]:
        """FLOPs of each piece of an iteration: text, rollout sampling, decode + reward, train."""
        from torch.utils._python_dispatch import _disable_current_modes
        from torch.utils.flop_counter import FlopCounterMode

        conditioning = self.trainer.rollout.conditioning
        pieces = {
            "text": lambda: conditioning.for_images(self.batch.prompts, self.batch.my_groups),
            "rollout": self.rollout,
            "reward": self.reward,
            "train": self.train,
        }
        optimizer = self.trainer.update.optimizer
        step = optimizer.step

        def step_uncounted(*args, **kwargs):  # negligible FLOPs; torchao compiles its step, which a mode breaks
            with _disable_current_modes():
                return step(*args, **kwargs)

        flops = {}
        optimizer.step = step_uncounted
        try:
            for name, fn in pieces.items():
                with FlopCounterMode(display=False) as counter:
                    fn()
                flops[name] = float(counter.get_total_flops())
        finally:
            optimizer.step = step
        flops["rollout"] -= flops["text"]  # the rollout encodes the prompts too
        return flops
