"""The SD3 family (SD3, SD3.5 Medium / Large) through diffusers: MMDiT transformer, VAE with
shift and scaling factors, CLIP-L + CLIP-G + T5 text conditioning encoded exactly as
StableDiffusion3Pipeline.encode_prompt does (so exported LoRAs reproduce in the pipeline)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastnft.config import ConfigError, ModelConfig
from fastnft.models.adapter import ModelAdapter, TextEmbedding, decode_scaled_latents, encode_scaled_latents, present
from fastnft.models.presets import build_preset

# The default LoRA targets of the SD3 family: its eight joint-attention projections.
JOINT_ATTENTION_PROJECTIONS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def load_sd3_pipeline(config: ModelConfig, seed: int, weight_dtype: torch.dtype, device: torch.device):
    """A StableDiffusion3Pipeline from model.path (+ component_paths) or a random-init preset
    (initialised directly on `device`; presets without text encoders leave them None)."""
    from diffusers import StableDiffusion3Pipeline

    if config.preset is not None:
        components = dict.fromkeys(("text_encoder", "text_encoder_2", "text_encoder_3"))
        components.update(dict.fromkeys(("tokenizer", "tokenizer_2", "tokenizer_3")))
        components.update(build_preset(config.preset, seed, device))
        pipeline = StableDiffusion3Pipeline(**components)
        return pipeline if weight_dtype == torch.float32 else pipeline.to(dtype=weight_dtype)
    overrides = {name: _load_component(name, path, weight_dtype) for name, path in config.component_paths.items()}
    return StableDiffusion3Pipeline.from_pretrained(config.path, torch_dtype=weight_dtype, **overrides)


def _load_component(name: str, path: str, weight_dtype: torch.dtype):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    loaders = {
        "transformer": SD3Transformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModelWithProjection,
        "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5EncoderModel,
    }
    if name.startswith("tokenizer"):
        return AutoTokenizer.from_pretrained(path)
    if name not in loaders:
        raise ConfigError(f"model.component_paths.{name}: unknown component; known: {', '.join(loaders)}, tokenizer*")
    return loaders[name].from_pretrained(path, torch_dtype=weight_dtype)


class SD3Adapter(ModelAdapter):
    default_lora_targets = JOINT_ATTENTION_PROJECTIONS
    default_shift = 3.0  # SD3.5's scheduler shift: the grid is the same at every resolution

    def __init__(
        self,
        pipeline,
        *,
        resolution: int,
        clip_max_length: int,
        t5_max_length: int,
        device: torch.device,
        channels_last: bool = False,
    ):
        self.pipeline = pipeline.to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.pipeline.tokenizer_max_length = clip_max_length
        self.clip_max_length = clip_max_length
        self.t5_max_length = t5_max_length
        self.device = device
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.channels_last = channels_last
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        scale = pipeline.vae_scale_factor
        if resolution % (scale * self.transformer.config.patch_size):
            raise ConfigError(f"model.resolution: {resolution} is not a multiple of the VAE and patch strides")
        latent = resolution // scale
        self._sample_shape = (self.transformer.config.in_channels, latent, latent)

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int, device: torch.device, weight_dtype: torch.dtype):
        pipeline = load_sd3_pipeline(config, seed, weight_dtype, device)
        return cls(
            pipeline,
            resolution=config.resolution,
            clip_max_length=config.clip_max_length,
            t5_max_length=config.t5_max_length,
            device=device,
            channels_last=config.vae_channels_last,
        )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._sample_shape

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        sequence, _, pooled, _ = self.pipeline.encode_prompt(
            prompts,
            None,
            None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.t5_max_length,
        )
        return TextEmbedding(sequence, pooled)

    def decode(self, samples: Tensor) -> Tensor:
        return decode_scaled_latents(self.vae, samples, self.channels_last)

    def encode_images(self, images: Tensor) -> Tensor:
        return encode_scaled_latents(self.vae, images)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return present({name: getattr(self.pipeline, name) for name in COMPONENTS[1:]})
