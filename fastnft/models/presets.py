"""Random-init components ("presets"): models built from config dicts with random weights, for
tests and benchmarks. Weights are seeded from the run's seed, so every process (resumed ones
too) rebuilds identical components. Tokenizers are word-level and built offline."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn
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


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are created in `dtype`. Buffers the diffusers models create with an
    explicit dtype (RoPE frequencies) keep it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(cls: type[nn.Module], config: dict, dtype: torch.dtype) -> nn.Module:
    """cls(**config) created in `dtype` (a 20 B transformer built in bf16 never holds its 80 GB
    float32 copy), with the parameters a diffusers class keeps in float32 when from_pretrained
    loads it in another dtype (its _keep_in_fp32_modules, matched against the parts of each name
    as diffusers' loader matches them: Wan's time embedding, norms and modulation tables) in
    float32, as loaded models have them."""
    with default_dtype(dtype):
        model = cls(**config)
    keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    for name, parameter in model.named_parameters():
        if keep & set(name.split(".")):
            parameter.data = parameter.data.float()
    return model


def tiny_sd3_components(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """SD3.5-Medium's layout in miniature: MMDiT-X with a dual-attention block and QK RMS-norm,
    a 2x VAE with shift and scaling factors, CLIP-L, CLIP-G and T5 with their tokenizers. Sized so
    that an iteration's FLOP shares (text, rollout, decode + reward, training) stay within 2x of
    SD3.5-Medium's (`fastnft bench --preset tiny` reports them; a test checks). The transformer
    is built in `dtype`, as every preset's (build_preset)."""
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
        transformer = build_transformer(
            SD3Transformer2DModel,
            dict(
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
            dtype,
        )
        return {
            "transformer": transformer,
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


def sd35m_components(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """SD3.5-Medium's transformer (in `dtype`) and VAE from their configs, with random weights and
    no text encoders (the bench feeds random prompt embeddings of the real shapes:
    models/synthetic.py). Build it under `torch.device("cuda")` to initialise directly on the GPU."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    with seeded(seed):
        transformer = build_transformer(SD3Transformer2DModel, SD35M_TRANSFORMER, dtype)
        return {
            "transformer": transformer,
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


def flux_dev_components(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """FLUX.1-dev's transformer (11.9 B parameters, in `dtype`) and VAE from their configs with
    random weights and no text encoders (the bench feeds random prompt embeddings:
    models/synthetic.py)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    with seeded(seed):
        transformer = build_transformer(FluxTransformer2DModel, FLUX_DEV_TRANSFORMER, dtype)
        return {
            "transformer": transformer,
            "vae": AutoencoderKL(**FLUX_VAE),
            "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        }


# Qwen-Image's published configs (Qwen/Qwen-Image: transformer/config.json, vae/config.json,
# scheduler/scheduler_config.json; the VAE's values are also AutoencoderKLQwenImage's defaults in
# diffusers 0.42). 20.4 B transformer parameters.
QWEN_IMAGE_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,  # Qwen2.5-VL-7B's hidden size
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
# Wan 2.1's VAE statistics, which Qwen-Image's VAE (derived from it) shares
WAN_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip
QWEN_IMAGE_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],  # 8x spatial; one frame for images
    dropout=0.0,
    latents_mean=WAN_LATENTS_MEAN,
    latents_std=WAN_LATENTS_STD,
)
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)


def qwen_image_components(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """Qwen-Image's transformer (20.4 B parameters, in `dtype`) and VAE from their configs with
    random weights and no text encoder (the bench feeds random Qwen2.5-VL embeddings:
    models/synthetic.py)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    with seeded(seed):
        transformer = build_transformer(QwenImageTransformer2DModel, QWEN_IMAGE_TRANSFORMER, dtype)
        return {
            "transformer": transformer,
            "vae": AutoencoderKLQwenImage(**QWEN_IMAGE_VAE),
            "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        }


# Wan 2.1 T2V's published configs (Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers:
# transformer/config.json, as diffusers' scripts/convert_wan_to_diffusers.py writes them; vae/ is
# AutoencoderKLWan's defaults; scheduler/ is UniPC with flow sigmas at flow_shift 3.0, the 480p
# setting). 1.42 B and 14.3 B transformer parameters.
WAN21_1_3B_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,  # UMT5-XXL's hidden size
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,  # text-to-video: no image conditioning
    rope_max_seq_len=1024,
)
WAN21_14B_TRANSFORMER = {**WAN21_1_3B_TRANSFORMER, "num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824}
WAN21_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=WAN_LATENTS_MEAN,
    latents_std=WAN_LATENTS_STD,
    scale_factor_temporal=4,
    scale_factor_spatial=8,
)
WAN21_SCHEDULER = dict(  # the fields of its scheduler_config.json that are not UniPC's defaults
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
)


def wan21_components(transformer_config: dict, seed: int, dtype: torch.dtype) -> dict[str, object]:
    """A Wan 2.1 T2V transformer (in `dtype`) and its VAE (float32, as WanAdapter keeps it) with
    random weights and no text encoder (the bench feeds random UMT5 embeddings: models/synthetic.py)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    with torch.device("cpu"):  # UniPC moves its sigmas to the CPU, which a meta tensor cannot
        scheduler = UniPCMultistepScheduler(**WAN21_SCHEDULER)
    with seeded(seed):
        transformer = build_transformer(WanTransformer3DModel, transformer_config, dtype)
        return {
            "transformer": transformer,
            "vae": AutoencoderKLWan(**WAN21_VAE),
            "scheduler": scheduler,
        }


WAN21_TRANSFORMERS = {"wan2.1-1.3b": WAN21_1_3B_TRANSFORMER, "wan2.1-14b": WAN21_14B_TRANSFORMER}


def wan21_1_3b_components(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    return wan21_components(WAN21_TRANSFORMERS["wan2.1-1.3b"], seed, dtype)


def wan21_14b_components(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    return wan21_components(WAN21_TRANSFORMERS["wan2.1-14b"], seed, dtype)


PRESETS = {
    "tiny-sd3": tiny_sd3_components,
    "sd35m": sd35m_components,
    "flux-dev": flux_dev_components,
    "qwen-image": qwen_image_components,
    "wan2.1-1.3b": wan21_1_3b_components,
    "wan2.1-14b": wan21_14b_components,
}
# presets without text encoders: models/synthetic.py feeds random embeddings of the real shapes
SYNTHETIC_TEXT_PRESETS = ("sd35m", "flux-dev", "qwen-image", "wan2.1-1.3b", "wan2.1-14b")


def build_preset(
    name: str, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, object]:
    """The preset's components, initialised on `device`; the transformer in `dtype` (the frozen
    weights' dtype, so that a large one is never built in float32), the rest in float32."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    with torch.device(device):
        return PRESETS[name](seed, dtype)
