"""Qwen-Image (and fine-tunes saved in diffusers' QwenImagePipeline layout) through diffusers.
What differs from FLUX, each matched to what QwenImagePipeline does so that an exported LoRA
reproduces `fastnft sample` in the pipeline:

- text: Qwen2.5-VL's last hidden states of the prompt inside the pipeline's chat template, the
  template's system prefix (its first 34 tokens) dropped, padding removed and each prompt's
  tokens re-padded to the batch's longest (QwenImagePipeline.encode_prompt). Prompts differ in
  length, so the embedding carries a mask (TextEmbedding.mask), which the transformer takes as
  encoder_hidden_states_mask; there is no pooled embedding (an empty [B, 0]);
- samples: latents of a 3-D (video) VAE with one frame, normalised per channel by the VAE
  config's latents_mean and latents_std; the trainer keeps [C, H, W]; the transformer takes them
  packed into 2x2 patches as FLUX does, with img_shapes [(1, H/2, W/2)] for its RoPE, packed
  inside `velocity` and unpacked after;
- time: t in [0, 1] (the transformer multiplies by 1000), as FLUX;
- CFG (rollout.guidance_scale > 1): the pipeline's true CFG against the negative prompt " "
  (the blank prompt its documentation names), the guided velocity of each token rescaled to the
  norm of the conditional one (`guided_velocity`);
- grid: the scheduler config's dynamic shift, mu from the image token count, as FLUX
  (fastnft.models.scheduler_grid).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fastnft.config import ConfigError, ModelConfig
from fastnft.models.adapter import ModelAdapter, ModelTraits, TextEmbedding, present, to_unit_range, weight_dtype
from fastnft.models.flux import PACK, component_paths, pack, unpack
from fastnft.models.scheduler_grid import scheduler_grid
from fastnft.models.sd3 import JOINT_ATTENTION_PROJECTIONS

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# a block's projections that only make the text stream's own output (its queries, its output
# projection): in the last block that output is discarded
TEXT_ONLY = ("attn.add_q_proj", "attn.to_add_out")
MAX_SEQUENCE_LENGTH = 1024  # QwenImagePipeline.check_inputs refuses longer text sequences


def qwen_component_paths(config: ModelConfig) -> dict[str, Path]:
    return component_paths(config, COMPONENTS, "Qwen-Image")


def _load_component(name: str, path: Path, weight_dtype: torch.dtype):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    if name == "tokenizer":
        return AutoTokenizer.from_pretrained(path)
    if name == "scheduler":
        return FlowMatchEulerDiscreteScheduler.from_pretrained(path)
    loaders = {
        "transformer": QwenImageTransformer2DModel,
        "vae": AutoencoderKLQwenImage,
        "text_encoder": Qwen2_5_VLForConditionalGeneration,
    }
    if name not in loaders:
        raise ConfigError(f"model.component_paths.{name}: unknown component; known: {', '.join(COMPONENTS)}")
    return loaders[name].from_pretrained(path, torch_dtype=weight_dtype)


def load_qwen_image_pipeline(config: ModelConfig, seed: int, device: torch.device, weight_dtype: torch.dtype):
    """A QwenImagePipeline from model.path, components replaced by model.component_paths; or a
    preset's random-init components, built on the device (the transformer in weight_dtype)."""
    from diffusers import QwenImagePipeline

    if config.preset is not None:  # a bench preset: random weights, no text encoder
        from fastnft.models.presets import build_preset

        components = build_preset(config.preset, seed, device, weight_dtype)
        return QwenImagePipeline(**components, text_encoder=None, tokenizer=None).to(dtype=weight_dtype)
    qwen_component_paths(config)  # every component is there before anything loads
    overrides = {name: _load_component(name, Path(path), weight_dtype) for name, path in config.component_paths.items()}
    return QwenImagePipeline.from_pretrained(config.path, torch_dtype=weight_dtype, **overrides)


def lora_targets(transformer: nn.Module) -> tuple[str, ...]:
    """The attention projections of every block: the image stream's to_q, to_k, to_v, to_out.0
    and the text stream's add_q_proj, add_k_proj, add_v_proj, to_add_out; but not the last
    block's add_q_proj and to_add_out, which only make the text stream's output of the last
    block, which the transformer discards (its keys and values do reach the image): they would
    learn nothing, add_q_proj from a zero gradient and to_add_out from none at all, which DDP
    refuses. Those two are named per block, as FLUX names its single blocks' proj_out."""
    shared = tuple(name for name in JOINT_ATTENTION_PROJECTIONS if name not in TEXT_ONLY)
    blocks = len(transformer.transformer_blocks)
    return (*shared, *(f"transformer_blocks.{i}.{name}" for i in range(blocks - 1) for name in TEXT_ONLY))


def true_cfg(conditional: Tensor, negative: Tensor, scale: float) -> Tensor:
    """QwenImagePipeline's true CFG on packed tokens [B, N, F]: n + s (c - n), each token then
    rescaled to the norm of its conditional prediction (over the token's features)."""
    combined = negative + scale * (conditional - negative)
    return combined * (conditional.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


class QwenImageAdapter(ModelAdapter):
    negative_prompt = " "  # the blank negative prompt of QwenImagePipeline's documentation and Qwen's examples

    def __init__(
        self,
        pipeline,
        *,
        resolution: int,
        max_sequence_length: int,
        device: torch.device,
    ) -> None:
        self.pipeline = pipeline.to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.max_sequence_length = max_sequence_length
        self.device = device
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        channels = self.vae.config.z_dim
        config = self.transformer.config
        out_channels = config.out_channels or config.in_channels
        if config.in_channels != PACK * PACK * channels or out_channels * config.patch_size**2 != config.in_channels:
            raise ConfigError(
                f"model.path: the transformer's in_channels {config.in_channels} (out_channels {out_channels}, "
                f"patch_size {config.patch_size}) do not take the VAE's {channels}-channel latents in 2x2 patches"
            )
        stride = pipeline.vae_scale_factor * PACK
        if resolution % stride:
            raise ConfigError(
                f"model.resolution: {resolution} is not a multiple of {stride} "
                f"(the VAE's {pipeline.vae_scale_factor}x downsampling times the 2x2 latent packing)"
            )
        latent = resolution // pipeline.vae_scale_factor
        self._sample_shape = (channels, latent, latent)
        self.default_lora_targets = lora_targets(self.transformer)
        # [1, C, 1, 1, 1], as the pipeline shapes them for the VAE's [B, C, frames, H, W]
        self.latents_mean = torch.tensor(self.vae.config.latents_mean, device=device).view(1, channels, 1, 1, 1)
        self.latents_std = torch.tensor(self.vae.config.latents_std, device=device).view(1, channels, 1, 1, 1)

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int, device: torch.device, weight_dtype: torch.dtype):
        return cls(
            load_qwen_image_pipeline(config, seed, device, weight_dtype),
            resolution=config.resolution,
            max_sequence_length=config.t5_max_length,
            device=device,
        )

    @classmethod
    def traits(cls, kind: str, config: ModelConfig) -> ModelTraits:
        """From scheduler/scheduler_config.json (use_dynamic_shifting: Qwen-Image's is) and
        transformer/config.json (a guidance input, which no Qwen-Image checkpoint has and the
        pipeline cannot feed its timestep embedding, is refused); and the settings Qwen-Image
        cannot take, refused here, before anything loads."""
        from fastnft.models import read_json

        if config.t5_max_length > MAX_SEQUENCE_LENGTH:
            raise ConfigError(
                f"model.t5_max_length: Qwen-Image encodes at most {MAX_SEQUENCE_LENGTH} text tokens "
                f"(QwenImagePipeline's max_sequence_length); got {config.t5_max_length}"
            )
        if config.vae_channels_last:
            raise ConfigError("model.vae_channels_last: the Qwen-Image VAE is 3-D (a frame axis); leave it false")
        if config.preset is not None:  # the bench preset is Qwen-Image's published config
            from fastnft.models.presets import QWEN_IMAGE_SCHEDULER

            return ModelTraits(kind, dynamic_shift=QWEN_IMAGE_SCHEDULER["use_dynamic_shifting"])
        paths = qwen_component_paths(config)
        scheduler = read_json(paths["scheduler"] / "scheduler_config.json", "model.path")
        transformer = read_json(paths["transformer"] / "config.json", "model.path")
        if transformer.get("guidance_embeds", False):
            raise ConfigError(
                f"model.path: {paths['transformer']} takes a guidance input (guidance_embeds), which fastnft does "
                "not support for Qwen-Image"
            )
        return ModelTraits(kind, dynamic_shift=bool(scheduler.get("use_dynamic_shifting", False)))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._sample_shape

    def timestep_grid(self, steps: int, shift: float | None) -> Tensor:
        """QwenImagePipeline's grid: as FLUX's, mu from the packed token count (its scheduler
        config also sets shift_terminal, which the scheduler applies)."""
        _, height, width = self._sample_shape
        tokens = (height // PACK) * (width // PACK)
        return scheduler_grid(self.pipeline.scheduler.config, steps, shift, tokens, "Qwen-Image")

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        """The pipeline's own encode_prompt: its mask is None when no prompt of the batch is
        padded, as the pipeline then passes none to the transformer."""
        sequence, mask = self.pipeline.encode_prompt(
            prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return TextEmbedding(sequence, sequence.new_zeros(len(prompts), 0), mask)

    def _tokens(self, transformer: nn.Module, x: Tensor, t: Tensor, text: TextEmbedding) -> Tensor:
        """The transformer's packed prediction [B, (H/2)(W/2), 4C] for latents x [B, C, H, W]."""
        dtype = weight_dtype(transformer)
        batch, _, height, width = x.shape
        return transformer(
            hidden_states=pack(x.to(dtype)),
            timestep=t,
            encoder_hidden_states=text.sequence.to(dtype),
            encoder_hidden_states_mask=text.mask,
            img_shapes=[[(1, height // PACK, width // PACK)]] * batch,
            return_dict=False,
        )[0]

    def velocity(self, transformer: nn.Module, x: Tensor, t: Tensor, text: TextEmbedding) -> Tensor:
        _, _, height, width = x.shape
        return unpack(self._tokens(transformer, x, t, text), height, width)

    def guided_velocity(
        self, transformer: nn.Module, x: Tensor, t: Tensor, text: TextEmbedding, empty: TextEmbedding, scale: float
    ) -> Tensor:
        """True CFG against `empty` (the negative prompt " "), both halves in one batched call:
        TextEmbedding.cat pads the shorter text and masks the padding, which the pipeline's two
        separate calls do not see; the rescale is per packed token, as the pipeline's."""
        _, _, height, width = x.shape
        both = TextEmbedding.cat([text, empty.repeat_interleave(len(text))])
        tokens = self._tokens(transformer, torch.cat([x, x]), torch.cat([t, t]), both).float()
        conditional, negative = tokens.chunk(2)
        return unpack(true_cfg(conditional, negative, scale), height, width)

    @torch.no_grad()
    def decode(self, samples: Tensor) -> Tensor:
        dtype = self.vae.dtype
        # the pipeline's arithmetic: divided by 1 / std in the VAE's dtype, then the mean added
        inverse_std = (1.0 / self.latents_std).to(dtype)
        latents = samples.unsqueeze(2).to(dtype) / inverse_std + self.latents_mean.to(dtype)
        return to_unit_range(self.vae.decode(latents, return_dict=False)[0][:, :, 0])

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        pixels = (images * 2 - 1).unsqueeze(2).to(self.vae.dtype)  # one frame
        latents = self.vae.encode(pixels).latent_dist.mode().float()
        return ((latents - self.latents_mean) / self.latents_std)[:, :, 0]

    def frozen_modules(self) -> dict[str, nn.Module]:
        return present({"vae": self.vae, "text_encoder": self.pipeline.text_encoder})
