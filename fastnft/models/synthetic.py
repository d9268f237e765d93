"""Random prompt embeddings of a real model's shapes in place of its text encoders: the bench's
presets of published models (a random 4.7 B-parameter T5 or 7 B Qwen2.5-VL would cost memory and
time and measure nothing that matters for throughput). Each prompt's embedding is keyed by the
prompt alone."""

from __future__ import annotations

import torch

from fastnft.models.adapter import ModelAdapter, TextEmbedding, weight_dtype
from fastnft.models.flux import FluxAdapter
from fastnft.models.qwen_image import QwenImageAdapter
from fastnft.models.sd3 import SD3Adapter
from fastnft.models.wan import WanAdapter, input_dtype
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


class SyntheticTextQwenImageAdapter(QwenImageAdapter):
    """Qwen-Image with synthetic prompt embeddings: max_sequence_length (model.t5_max_length)
    tokens of Qwen2.5-VL's width (the transformer's joint_attention_dim) for every prompt, an upper
    bound on the pipeline's, which keeps each prompt's own length. The all-ones mask goes to the
    transformer, so that its attention takes the masked path a batch of prompts of different
    lengths takes; no pooled embedding."""

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        text = synthetic_text(
            prompts,
            sequence_length=self.max_sequence_length,
            width=self.transformer.config.joint_attention_dim,
            pooled_width=0,
            device=self.device,
            dtype=weight_dtype(self.transformer),
        )
        mask = torch.ones(len(prompts), self.max_sequence_length, dtype=torch.long, device=self.device)
        return TextEmbedding(text.sequence, text.pooled, mask)


class SyntheticTextWanAdapter(WanAdapter):
    """Wan with synthetic prompt embeddings: UMT5's t5_max_length tokens at the transformer's
    text_dim (the pipeline zeroes the positions past each prompt's length; the cost is the same);
    no pooled embedding."""

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        return synthetic_text(
            prompts,
            sequence_length=self.t5_max_length,
            width=self.transformer.config.text_dim,
            pooled_width=0,
            device=self.device,
            dtype=input_dtype(self.transformer),
        )


def synthetic_text_adapter(kind: str) -> type[ModelAdapter]:
    adapters = {
        "sd3": SyntheticTextSD3Adapter,
        "flux": SyntheticTextFluxAdapter,
        "qwen-image": SyntheticTextQwenImageAdapter,
        "wan": SyntheticTextWanAdapter,
    }
    return adapters[kind]
