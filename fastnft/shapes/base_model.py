"""The `shapes` base model's architecture: a 32 x 32 pixel-space MMDiT (patch 4, 4 blocks, width 128,
about 2.4 M parameters) and a small CLIP-style text encoder over the task's words, run by the
`sd3-pixel` model kind. Pretraining builds it from random weights; the trainer loads the committed
weights (fastnft/assets/shapes-base) from their saved configs, so it never calls this module."""

from __future__ import annotations

from fastnft.models.presets import seeded, word_tokenizer
from fastnft.shapes.task import GRID, RESOLUTION, vocabulary

MAX_LENGTH = 16  # tokens per prompt: room for the longest (7 words) plus <bos> and <eos>


def base_model_components(seed: int) -> dict[str, object]:
    """Random-init transformer, text_encoder and tokenizer; weights are seeded by `seed`."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = word_tokenizer(vocabulary(), MAX_LENGTH)
    with seeded(seed):
        return {
            "transformer": SD3Transformer2DModel(
                sample_size=RESOLUTION,
                patch_size=GRID,  # the renderer puts object edges on patch edges
                in_channels=3,
                out_channels=3,
                num_layers=4,
                attention_head_dim=32,
                num_attention_heads=4,
                joint_attention_dim=64,
                caption_projection_dim=128,
                pooled_projection_dim=64,
                pos_embed_max_size=RESOLUTION // GRID,
                qk_norm="rms_norm",
            ),
            "text_encoder": CLIPTextModelWithProjection(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    projection_dim=64,
                    max_position_embeddings=MAX_LENGTH,
                    pad_token_id=0,
                    bos_token_id=2,
                    eos_token_id=3,
                )
            ),
            "tokenizer": tokenizer,
        }
