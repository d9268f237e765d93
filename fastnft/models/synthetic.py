"""Random prompt embeddings of a real model's shapes in place of its text encoders: the bench's
SD3.5-Medium and FLUX.1-dev presets (a random 4.7 B-parameter T5 would cost memory and time and measure nothing
that matters for throughput). Each prompt's embedding is keyed by the prompt alone."""

from __future__ import annotations

import torch

from fastnft.models.adapter import ModelAdapter, TextEmbedding
from fastnft.models.flux import FluxAdapter
from fastnft.models.sd3 import SD3Adapter
from fastnft.rng import generator


def synthetic_text(
    prompts: list[str], *, sequence_length: int, width: int, pooled_width: int, device: torch.device, dtype: torch.dtype
) -> TextEmbedding:
    """Standard-normal [len(prompts), sequence_length, width] and [len(prompts), pooled_width]."""
    sequences, pooled = [], []
    for prompt in prompts:
        draw = generator("synthetic_text", prompt)
        sequences.append(torch.randn(sequence_length, width, generator=draw))
        pooled.append(torch.randn(pooled_width, generator=draw))
    return TextEmbedding(torch.stack(sequences), torch.stack(pooled)).to(device).cast(dtype)


class SyntheticTextSD3Adapter(SD3Adapter):
    """SD3 with synthetic prompt embeddings: CLIP's clip_max_length tokens plus T5's t5_max_length,
    at the transformer's joint-attention and pooled widths."""

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        config = self.transformer.config
        return synthetic_text(
            prompts,
            sequence_length=self.clip_max_length + self.t5_max_length,
            width=config.joint_attention_dim,
            pooled_width=config.pooled_projection_dim,
            device=self.device,
            dtype=self.transformer.dtype,
        )


class SyntheticTextFluxAdapter(FluxAdapter):
    """FLUX with synthetic prompt embeddings: T5's t5_max_length tokens at the joint-attention
    width, and CLIP's pooled width."""

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        config = self.transformer.config
        return synthetic_text(
            prompts,
            sequence_length=self.t5_max_length,
            width=config.joint_attention_dim,
            pooled_width=config.pooled_projection_dim,
            device=self.device,
            dtype=self.transformer.dtype,
        )


def synthetic_text_adapter(kind: str) -> type[ModelAdapter]:
    return {"sd3": SyntheticTextSD3Adapter, "flux": SyntheticTextFluxAdapter}[kind]
