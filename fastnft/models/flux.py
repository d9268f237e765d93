"""FLUX.1 (dev, schnell and fine-tunes saved in diffusers' FluxPipeline layout) through diffusers.
What differs from SD3, each matched to what FluxPipeline does so that an exported LoRA reproduces
`fastnft sample` in the pipeline:

- text: CLIP-L's pooled output + T5's sequence (FluxPipeline.encode_prompt);
- samples: the trainer keeps latents [C, H, W]; the transformer takes them packed into 2x2
  patches, [(H/2)(W/2), 4C] tokens with (0, row, column) RoPE positions (text tokens at 0),
  packed inside `velocity` and unpacked after;
- time: the transformer takes t in [0, 1] (it multiplies by 1000 itself), not t * 1000;
- guidance: FLUX.1-dev is guidance-distilled: the guidance scale is a transformer input
  (`model.guidance`, 3.5 by default as in the pipeline), the same in rollouts and training; it
  is not classifier-free guidance, which stays rollout.guidance_scale (the base class's);
- grid: a dynamic shift, mu from the image token count (the scheduler's use_dynamic_shifting).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fastnft.config import ConfigError, ModelConfig
from fastnft.models.adapter import (
    ModelAdapter,
    ModelTraits,
    TextEmbedding,
    decode_scaled_latents,
    encode_scaled_latents,
    present,
    weight_dtype,
)
from fastnft.models.scheduler_grid import scheduler_grid
from fastnft.models.sd3 import JOINT_ATTENTION_PROJECTIONS

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
MAX_T5_LENGTH = 512  # FluxPipeline.check_inputs refuses longer T5 sequences
PACK = 2  # latents go to the transformer as 2x2 patches


def pack(latents: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] tokens, row-major over the patches, each patch's
    features ordered (channel, row in patch, column in patch) as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of pack: [B, (H/2)(W/2), 4C] -> [B, C, H, W]."""
    b, _, features = tokens.shape
    c = features // (PACK * PACK)
    patches = tokens.reshape(b, height // PACK, width // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def image_ids(rows: int, columns: int, device: torch.device) -> Tensor:
    """[rows * columns, 3] RoPE positions of the packed tokens: (0, row, column)."""
    grid = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
    ids = torch.stack([torch.zeros(rows, columns), grid[0].float(), grid[1].float()], dim=-1)
    return ids.reshape(rows * columns, 3).to(device)


def lora_targets(transformer: nn.Module) -> tuple[str, ...]:
    """The attention projections of both block kinds: the eight joint-attention projections of
    the double blocks (the names also match the single blocks' to_q, to_k, to_v) and each single
    block's proj_out, where the attention output is projected (fused with the MLP's). Named per
    block: a bare "proj_out" would also match the transformer's final output layer."""
    singles = len(getattr(transformer, "single_transformer_blocks", []))
    return (*JOINT_ATTENTION_PROJECTIONS, *(f"single_transformer_blocks.{i}.proj_out" for i in range(singles)))


def component_paths(
    config: ModelConfig, components: tuple[str, ...] = COMPONENTS, family: str = "FLUX"
) -> dict[str, Path]:
    """Each component's directory (model.component_paths over model.path/<name>); a ConfigError
    names the first one missing. Qwen-Image passes its own components and name."""
    root = Path(config.path) if config.path is not None else None
    paths = {}
    for name in components:
        override = config.component_paths.get(name)
        path = Path(override) if override is not None else (root / name if root is not None else None)
        if path is None or not path.is_dir():
            raise ConfigError(
                f"model.path: {root} has no {name}/ directory (a {family} pipeline directory holds "
                f"{', '.join(c + '/' for c in components)}; model.component_paths.{name} can name another)"
            )
        paths[name] = path
    return paths


def _load_component(name: str, path: Path, weight_dtype: torch.dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    if name.startswith("tokenizer"):
        return AutoTokenizer.from_pretrained(path)
    if name == "scheduler":
        return FlowMatchEulerDiscreteScheduler.from_pretrained(path)
    loaders = {
        "transformer": FluxTransformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel,
    }
    if name not in loaders:
        raise ConfigError(f"model.component_paths.{name}: unknown component; known: {', '.join(COMPONENTS)}")
    return loaders[name].from_pretrained(path, torch_dtype=weight_dtype)


def load_flux_pipeline(config: ModelConfig, seed: int, device: torch.device, weight_dtype: torch.dtype):
    """A FluxPipeline from model.path, components replaced by model.component_paths; or a
    preset's random-init components, built on the device (the transformer in weight_dtype)."""
    from diffusers import FluxPipeline

    if config.preset is not None:  # a bench preset: random weights, no text encoders
        from fastnft.models.presets import build_preset

        components = build_preset(config.preset, seed, device, weight_dtype)
        encoders = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        return FluxPipeline(**components, **encoders).to(dtype=weight_dtype)
    component_paths(config)  # every component is there before anything loads
    overrides = {name: _load_component(name, Path(path), weight_dtype) for name, path in config.component_paths.items()}
    return FluxPipeline.from_pretrained(config.path, torch_dtype=weight_dtype, **overrides)


class FluxAdapter(ModelAdapter):
    def __init__(
        self,
        pipeline,
        *,
        resolution: int,
        clip_max_length: int,
        t5_max_length: int,
        guidance: float | None,
        device: torch.device,
        channels_last: bool = False,
    ) -> None:
        self.pipeline = pipeline.to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.pipeline.tokenizer_max_length = clip_max_length  # CLIP's length, as the SD3 adapter sets it
        if t5_max_length > MAX_T5_LENGTH:
            raise ConfigError(
                f"model.t5_max_length: FLUX encodes at most {MAX_T5_LENGTH} T5 tokens; got {t5_max_length}"
            )
        self.t5_max_length = t5_max_length
        self.device = device
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.channels_last = channels_last
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        config = self.transformer.config
        if config.patch_size != 1 or config.in_channels != PACK * PACK * self.vae.config.latent_channels:
            raise ConfigError(
                f"model.path: the transformer's in_channels {config.in_channels} (patch_size {config.patch_size}) "
                f"do not take the VAE's {self.vae.config.latent_channels}-channel latents in 2x2 patches"
            )
        stride = pipeline.vae_scale_factor * PACK
        if resolution % stride:
            raise ConfigError(
                f"model.resolution: {resolution} is not a multiple of {stride} "
                f"(the VAE's {pipeline.vae_scale_factor}x downsampling times the 2x2 latent packing)"
            )
        latent = resolution // pipeline.vae_scale_factor
        self._sample_shape = (self.vae.config.latent_channels, latent, latent)
        if guidance is not None and not config.guidance_embeds:
            raise ConfigError("model.guidance: this FLUX transformer takes no guidance input (guidance_embeds false)")
        self.guidance = (DEFAULT_GUIDANCE if guidance is None else guidance) if config.guidance_embeds else None
        self.default_lora_targets = lora_targets(self.transformer)
        self.image_ids = image_ids(latent // PACK, latent // PACK, device)

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int, device: torch.device, weight_dtype: torch.dtype):
        return cls(
            load_flux_pipeline(config, seed, device, weight_dtype),
            resolution=config.resolution,
            clip_max_length=config.clip_max_length,
            t5_max_length=config.t5_max_length,
            guidance=config.guidance,
            device=device,
            channels_last=config.vae_channels_last,
        )

    @classmethod
    def traits(cls, kind: str, config: ModelConfig) -> ModelTraits:
        """From scheduler/scheduler_config.json (use_dynamic_shifting: FLUX.1-dev yes, schnell no)
        and transformer/config.json (guidance_embeds: dev yes, schnell no)."""
        from fastnft.models import read_json

        if config.preset is not None:  # the bench presets are FLUX.1-dev
            from fastnft.models.presets import FLUX_DEV_SCHEDULER, FLUX_DEV_TRANSFORMER

            return ModelTraits(
                kind,
                dynamic_shift=FLUX_DEV_SCHEDULER["use_dynamic_shifting"],
                embedded_guidance=FLUX_DEV_TRANSFORMER["guidance_embeds"],
            )
        paths = component_paths(config)
        scheduler = read_json(paths["scheduler"] / "scheduler_config.json", "model.path")
        transformer = read_json(paths["transformer"] / "config.json", "model.path")
        return ModelTraits(
            kind,
            dynamic_shift=bool(scheduler.get("use_dynamic_shifting", False)),
            embedded_guidance=bool(transformer.get("guidance_embeds", False)),
        )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._sample_shape

    def timestep_grid(self, steps: int, shift: float | None) -> Tensor:
        """FluxPipeline's grid: its sigmas linspace(1, 1/steps, steps) through the model's own
        scheduler config, shifted by mu from the image token count (calculate_shift between the
        config's base and max shift) when use_dynamic_shifting, else statically by its shift (or
        rollout.shift); then the final 0 (fastnft.models.scheduler_grid, shared with Qwen-Image)."""
        _, height, width = self._sample_shape
        tokens = (height // PACK) * (width // PACK)
        return scheduler_grid(self.pipeline.scheduler.config, steps, shift, tokens, "FLUX")

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        sequence, pooled, _ = self.pipeline.encode_prompt(
            prompts, device=self.device, max_sequence_length=self.t5_max_length
        )
        return TextEmbedding(sequence, pooled)

    def velocity(self, transformer: nn.Module, x: Tensor, t: Tensor, text: TextEmbedding) -> Tensor:
        dtype = weight_dtype(transformer)
        batch, _, height, width = x.shape
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((batch,), self.guidance, device=x.device, dtype=torch.float32)
        tokens = transformer(
            hidden_states=pack(x.to(dtype)),
            timestep=t,
            guidance=guidance,
            pooled_projections=text.pooled.to(dtype),
            encoder_hidden_states=text.sequence.to(dtype),
            txt_ids=x.new_zeros(text.sequence.shape[1], 3, dtype=torch.float32),
            img_ids=self.image_ids,
            return_dict=False,
        )[0]
        return unpack(tokens, height, width)

    def decode(self, samples: Tensor) -> Tensor:
        return decode_scaled_latents(self.vae, samples, self.channels_last)

    def encode_images(self, images: Tensor) -> Tensor:
        return encode_scaled_latents(self.vae, images)

    def frozen_modules(self) -> dict[str, nn.Module]:
        encoders = {"text_encoder": self.pipeline.text_encoder, "text_encoder_2": self.pipeline.text_encoder_2}
        return present({"vae": self.vae, **encoders})
