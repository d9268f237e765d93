"""The velocity field of a policy: v(x, t) of one of the policies' modules under a batch's
conditioning, through the model adapter, under the run's autocast (fp16 for the reference
precision on a GPU); with guidance > 1, the adapter's classifier-free guidance against the empty
prompt. Rollouts, evaluation and the NFT update all call the model through this one place."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from fastnft.models import ModelAdapter, TextEmbedding
from fastnft.sampling import VelocityFn


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """fp16 autocast for `model.precision: reference` on a GPU (the reference code's, with a
    GradScaler in training); none otherwise."""
    return torch.float16 if precision == "reference" and device.type == "cuda" else None


class Velocity:
    def __init__(
        self, model: ModelAdapter, autocast_dtype: torch.dtype | None, empty_text: Callable[[], TextEmbedding]
    ) -> None:
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.empty_text = empty_text  # the empty prompt's conditioning, asked for only under guidance

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast("cuda", dtype=self.autocast_dtype):
                yield

    def __call__(self, module: nn.Module, x: Tensor, t: Tensor, text: TextEmbedding) -> Tensor:
        """The conditional velocity [B, ...] of `module` (t [B] in [0, 1])."""
        with self.autocast():
            return self.model.velocity(module, x, t, text)

    def field(self, module: nn.Module, text: TextEmbedding, guidance_scale: float) -> VelocityFn:
        """(x, t) -> v for a sampler: conditional, or guided when guidance_scale > 1."""
        if guidance_scale == 1.0:
            return lambda x, t: self(module, x, t, text)
        empty = self.empty_text()

        def guided(x: Tensor, t: Tensor) -> Tensor:
            with self.autocast():
                return self.model.guided_velocity(module, x, t, text, empty, guidance_scale)

        return guided
