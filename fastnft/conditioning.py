"""The conditioning of prompts (`model.text_encoding`): per_image re-encodes every image's prompt
in rollout-sized batches, as the reference code does; per_prompt encodes each prompt of an
iteration once; cached encodes every train and eval prompt once at start (text_cache.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastnft.models import ModelAdapter, TextEmbedding
from fastnft.text_cache import PromptEmbeddings


class TextConditioning:
    def __init__(self, model: ModelAdapter, mode: str, batch_size: int, cache: PromptEmbeddings | None) -> None:
        self.model = model
        self.mode = mode
        self.batch_size = batch_size  # per_image: the encoder batch, the rollout's
        self.cache = cache
        self._empty: TextEmbedding | None = None

    @classmethod
    def build(
        cls,
        model: ModelAdapter,
        mode: str,
        *,
        batch_size: int,
        prompts: list[str],
        device: torch.device,
        offload_encoders: bool,
    ) -> TextConditioning:
        """With mode cached, encodes `prompts` and the empty prompt (the model's negative_prompt)
        now, then offloads the text encoders to the CPU when asked."""
        if mode != "cached":
            return cls(model, mode, batch_size, None)
        every = [*prompts, model.negative_prompt]
        cache = PromptEmbeddings(model.encode_text, every, batch_size=batch_size, device=device)
        if offload_encoders:
            for encoder in model.text_encoders().values():
                encoder.to("cpu")
            cache.encoders_available = False
        return cls(model, mode, batch_size, cache)

    def __call__(self, prompts: list[str]) -> TextEmbedding:
        """One row per prompt: from the cache, or the text encoders."""
        if self.cache is not None:
            return self.cache(prompts)
        return self.model.encode_text(prompts)

    def for_images(self, prompts: list[str], image_groups: Tensor) -> TextEmbedding:
        """The conditioning of each image (image_groups[i]: the row in prompts of image i)."""
        if self.mode != "per_image":
            text = self(prompts)
            return text.index(image_groups.to(text.sequence.device))
        image_prompts = [prompts[g] for g in image_groups.tolist()]
        size = self.batch_size
        return TextEmbedding.cat(
            [self.model.encode_text(image_prompts[s : s + size]) for s in range(0, len(image_prompts), size)]
        )

    def empty(self) -> TextEmbedding:
        """The empty prompt's conditioning (classifier-free guidance), encoded once: the model's
        negative_prompt ("", or the one its pipeline uses by default, as Qwen-Image's " ")."""
        if self._empty is None:
            self._empty = self([self.model.negative_prompt])
        return self._empty
