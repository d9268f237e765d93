"""Random-init components ("presets"): models built from config dicts with random weights, for
tests and benchmarks. Weights are seeded from the run's seed, so every process (resumed ones
too) rebuilds identical components. Tokenizers are word-level and built offline."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fastnft.config import ConfigError

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
BASIC_WORDS = (
    "a an the of and with on in at to left right above below next photo picture image small large big tiny "
    "red green blue yellow orange purple pink white black brown gray cat dog bird car tree house circle square "
    "triangle star one two three four five apple banana cup chair table flower sky sea mountain person"
).split()


def word_tokenizer(words: list[str], model_max_length: int) -> PreTrainedTokenizerFast:
    """Lower-cased word-level tokenizer: <bos> words <eos>, unknown words map to <unk>."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=model_max_length,
    )


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic weight init without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_sd3_components(seed: int) -> dict[str, object]:
    """SD3.5-Medium's layout in miniature: MMDiT-X with a dual-attention block and QK RMS-norm,
    a 2x VAE with shift and scaling factors, CLIP-L, CLIP-G and T5 with their tokenizers. Sized so
    that an iteration's FLOP shares (text, rollout, decode + reward, training) stay within 2x of
    SD3.5-Medium's (`fastnft bench --preset tiny` reports them; a test checks)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tokenizer = word_tokenizer(BASIC_WORDS, 77)
    vocab_size = len(clip_tokenizer)

    def clip(hidden: int) -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=16,
            max_position_embeddings=77,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        return CLIPTextModelWithProjection(config)

    with seeded(seed):
        return {
            "transformer": SD3Transformer2DModel(
                sample_size=16,
                patch_size=2,
                in_channels=4,
                num_layers=2,
                attention_head_dim=16,
                num_attention_heads=4,
                joint_attention_dim=128,
                caption_projection_dim=64,
                pooled_projection_dim=32,
                out_channels=4,
                pos_embed_max_size=8,
                dual_attention_layers=(0,),
                qk_norm="rms_norm",
            ),
            "vae": AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(4, 8),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=4,
                sample_size=32,
                shift_factor=0.0609,
                scaling_factor=1.5305,
            ),
            "text_encoder": clip(8),
            "text_encoder_2": clip(16),
            "text_encoder_3": T5EncoderModel(
                T5Config(
                    vocab_size=vocab_size,
                    d_model=128,
                    d_ff=128,
                    num_layers=2,
                    num_heads=2,
                    d_kv=64,
                    pad_token_id=0,
                    eos_token_id=3,
                    decoder_start_token_id=0,
                )
            ),
            "tokenizer": clip_tokenizer,
            "tokenizer_2": word_tokenizer(BASIC_WORDS, 77),
            "tokenizer_3": word_tokenizer(BASIC_WORDS, 512),
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        }


SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
SD35M_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def sd35m_components(seed: int) -> dict[str, object]:
    """SD3.5-Medium's transformer and VAE from their configs, with random weights and no text
    encoders (the bench feeds random prompt embeddings of the real shapes: models/synthetic.py).
    Build it under `torch.device("cuda")` to initialise directly on the GPU."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    with seeded(seed):
        return {
            "transformer": SD3Transformer2DModel(**SD35M_TRANSFORMER),
            "vae": AutoencoderKL(**SD35M_VAE),
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        }


# Model-generic presets only: a task's own architecture (e.g. fastnft/shapes/base_model.py) lives with
# its task, above this package, and is built by the code that needs it.
# FLUX.1-dev's published configs (transformer/, vae/, scheduler/ of its pipeline directory).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_VAE = {**SD35M_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def flux_dev_components(seed: int) -> dict[str, object]:
    """FLUX.1-dev's transformer (11.9 B parameters) and VAE from their configs with random
    weights and no text encoders (the bench feeds random prompt embeddings: models/synthetic.py)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    with seeded(seed):
        return {
            "transformer": FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
            "vae": AutoencoderKL(**FLUX_VAE),
            "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        }


PRESETS = {"tiny-sd3": tiny_sd3_components, "sd35m": sd35m_components, "flux-dev": flux_dev_components}
SYNTHETIC_TEXT_PRESETS = ("sd35m", "flux-dev")  # presets without text encoders


def build_preset(name: str, seed: int, device: torch.device | str = "cpu") -> dict[str, object]:
    """The preset's components, initialised on `device`."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    with torch.device(device):
        return PRESETS[name](seed)
