"""Wan text-to-video (Wan 2.1 T2V 1.3B and 14B, Wan 2.2 TI2V-5B, fine-tunes saved in diffusers'
WanPipeline layout) through diffusers. What differs from the image families, each matched to what
WanPipeline does so that an exported LoRA reproduces `fastnft sample` in the pipeline:

- samples are video latents [C, F', H', W'] with F' = (frames - 1) / t + 1 for the VAE's temporal
  stride t; the trainer, samplers, keyed noise and the loss kernel take any sample shape;
- text: UMT5's last hidden states, zeroed past each prompt's length (WanPipeline.encode_prompt);
  no pooled embedding;
- time: the transformer takes t * 1000 (the scheduler's timesteps); Wan 2.2 TI2V
  (expand_timesteps) takes one time per latent token, all equal for text-to-video;
- codec: the 3-D VAE AutoencoderKLWan, its latents normalised per channel by latents_mean and
  latents_std; `decode` returns videos [B, 3, F, H, W] (rewards score frames of them,
  fastnft.rewards.frames);
- grid: a static shift read from the directory's scheduler (FlowMatchEulerDiscreteScheduler's
  `shift`, or the `flow_shift` of the UniPCMultistepScheduler Wan's directories ship); fastnft's
  own samplers step on it.

Wan 2.2 A14B (two experts switched at boundary_ratio) does not fit the one-transformer policies
and is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastnft.config import ConfigError, ModelConfig
from fastnft.models.adapter import ModelAdapter, ModelTraits, TextEmbedding, present, to_unit_range
from fastnft.models.flux import component_paths

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_FRAMES = 81  # WanPipeline's num_frames default
# The attention projections of every block: attn1 (self-attention over the video tokens) and attn2
# (cross-attention to the text); attn2's add_k_proj / add_v_proj exist only in image-conditioned
# transformers (added_kv_proj_dim) and are added when present.
ATTENTION_PROJECTIONS = tuple(
    f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
)
IMAGE_PROJECTIONS = ("attn2.add_k_proj", "attn2.add_v_proj")


def lora_targets(transformer: nn.Module) -> tuple[str, ...]:
    if transformer.config.get("added_kv_proj_dim") is not None:
        return (*ATTENTION_PROJECTIONS, *IMAGE_PROJECTIONS)
    return ATTENTION_PROJECTIONS


def input_dtype(transformer: nn.Module) -> torch.dtype:
    """The dtype the transformer takes its inputs in: its patch embedding's. Not its first
    parameter's (adapter.weight_dtype): loading in bf16, diffusers keeps Wan's modulation tables
    (scale_shift_table, its first parameter), time embedding and norms in float32
    (WanTransformer3DModel._keep_in_fp32_modules). A DDP wrapper holds it in .module."""
    return getattr(transformer, "module", transformer).patch_embedding.weight.dtype


def video_shape(vae: Any, transformer: Any, resolution: int, frames: int) -> tuple[int, int, int, int]:
    """[C, F', H', W'] of a video of `frames` frames at `resolution`, from the VAE's and the
    transformer's configs (dicts or diffusers configs); a ConfigError names the field the strides
    refuse. The VAE's scale factors are read from its config, as WanPipeline reads them."""
    temporal = int(vae.get("scale_factor_temporal", 4))
    spatial = int(vae.get("scale_factor_spatial", 8))
    patch_t, patch_h, patch_w = transformer.get("patch_size", (1, 2, 2))
    if (frames - 1) % temporal:
        below = (frames - 1) // temporal * temporal + 1
        raise ConfigError(
            f"model.frames: {frames} frames do not fit the VAE's {temporal}x temporal stride "
            f"(frames - 1 must be a multiple of {temporal}: e.g. {below} or {below + temporal})"
        )
    latent_frames = (frames - 1) // temporal + 1
    if latent_frames % patch_t:
        raise ConfigError(
            f"model.frames: {frames} frames make {latent_frames} latent frames, not a multiple of the "
            f"transformer's temporal patch {patch_t}"
        )
    stride = spatial * max(patch_h, patch_w)
    if resolution % stride:
        raise ConfigError(
            f"model.resolution: {resolution} is not a multiple of {stride} (the VAE's {spatial}x downsampling "
            f"times the transformer's {patch_h}x{patch_w} patches)"
        )
    channels = int(vae.get("z_dim", 16))
    if transformer.get("in_channels") != channels:
        raise ConfigError(
            f"model.path: the transformer takes {transformer.get('in_channels')} channels, the VAE's latents have "
            f"{channels} (a text-to-video transformer takes the latents alone; image-to-video ones are not supported)"
        )
    return channels, latent_frames, resolution // spatial, resolution // spatial


def scheduler_shift(config: Any, field: str = "model.path") -> float:
    """The static shift of the directory's scheduler: FlowMatchEulerDiscreteScheduler's `shift` or
    UniPCMultistepScheduler's `flow_shift` (Wan's directories ship UniPC with flow sigmas)."""
    name = config.get("_class_name")
    if name == "FlowMatchEulerDiscreteScheduler":
        if config.get("use_dynamic_shifting", False):
            raise ConfigError(
                f"{field}: the scheduler shifts by the image size (use_dynamic_shifting), which WanPipeline does not"
            )
        return float(config.get("shift", 1.0))
    if name == "UniPCMultistepScheduler" and config.get("use_flow_sigmas", False):
        return float(config.get("flow_shift", 1.0))
    raise ConfigError(
        f"{field}: the scheduler is a {name}; a Wan directory's is a FlowMatchEulerDiscreteScheduler or a "
        "UniPCMultistepScheduler with use_flow_sigmas"
    )


def _refuse_two_experts(index: Any, where: str) -> None:
    """Wan 2.2 A14B: a high-noise `transformer` and a low-noise `transformer_2` switched at
    boundary_ratio. The policies (trained, old, EMA, reference) each hold one transformer."""
    second = index.get("transformer_2")
    has_second = second is not None and not (isinstance(second, (list, tuple)) and second[0] is None)
    if has_second or index.get("boundary_ratio") is not None:
        raise ConfigError(
            f"model.path: {where} holds two experts (transformer_2, switched at boundary_ratio: Wan 2.2 A14B); "
            "fastnft trains one transformer: use a one-transformer Wan (2.1 T2V, 2.2 TI2V-5B)"
        )


def _preset_configs(preset: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The VAE and transformer configs of a Wan bench preset (models/presets.py)."""
    from fastnft.models.presets import WAN21_TRANSFORMERS, WAN21_VAE

    return WAN21_VAE, WAN21_TRANSFORMERS[preset]


def _load_component(name: str, path: Path, weight_dtype: torch.dtype):
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanTransformer3DModel,
    )
    from transformers import AutoTokenizer, UMT5EncoderModel

    if name == "tokenizer":
        return AutoTokenizer.from_pretrained(path)
    if name == "scheduler":
        from fastnft.models import read_json

        config = read_json(path / "scheduler_config.json", f"model.component_paths.{name}")
        unipc = config.get("_class_name") == "UniPCMultistepScheduler"
        return (UniPCMultistepScheduler if unipc else FlowMatchEulerDiscreteScheduler).from_pretrained(path)
    if name == "vae":  # in float32, as diffusers' Wan examples load it
        return AutoencoderKLWan.from_pretrained(path, torch_dtype=torch.float32)
    loaders = {"transformer": WanTransformer3DModel, "text_encoder": UMT5EncoderModel}
    if name not in loaders:
        raise ConfigError(f"model.component_paths.{name}: unknown component; known: {', '.join(COMPONENTS)}")
    return loaders[name].from_pretrained(path, torch_dtype=weight_dtype)


def load_wan_pipeline(config: ModelConfig, seed: int, device: torch.device, weight_dtype: torch.dtype):
    """A WanPipeline from model.path, components replaced by model.component_paths; or a preset's
    random-init components, built on the device. The VAE in float32 whatever the frozen weights'
    dtype."""
    from diffusers import WanPipeline

    if config.preset is not None:  # a bench preset: random weights, no text encoder
        from fastnft.models.presets import build_preset

        components = build_preset(config.preset, seed, device, weight_dtype)
        return WanPipeline(**components, text_encoder=None, tokenizer=None)
    paths = component_paths(config, COMPONENTS, "Wan")  # every component is there before anything loads
    overrides = {name: _load_component(name, Path(path), weight_dtype) for name, path in config.component_paths.items()}
    overrides.setdefault("vae", _load_component("vae", paths["vae"], weight_dtype))
    return WanPipeline.from_pretrained(config.path, torch_dtype=weight_dtype, **overrides)


class WanAdapter(ModelAdapter):
    def __init__(
        self,
        pipeline,
        *,
        resolution: int,
        frames: int,
        t5_max_length: int,
        device: torch.device,
    ) -> None:
        _refuse_two_experts({**pipeline.config, "transformer_2": pipeline.transformer_2}, "the pipeline")
        self.pipeline = pipeline.to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.t5_max_length = t5_max_length
        self.device = device
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self._sample_shape = video_shape(self.vae.config, self.transformer.config, resolution, frames)
        self.frames = frames
        # the class name from the object: a scheduler built in memory (a preset's) has none in its config
        scheduler = pipeline.scheduler
        self.default_shift = scheduler_shift({**scheduler.config, "_class_name": type(scheduler).__name__})
        self.default_lora_targets = lora_targets(self.transformer)
        # Wan 2.2 TI2V takes a time per latent token (its image-conditioned tokens get time 0);
        # in text-to-video every token has the step's time, as WanPipeline's all-ones mask gives.
        self.expand_timesteps = bool(pipeline.config.get("expand_timesteps", False))
        _, latent_frames, height, width = self._sample_shape
        patch_t, patch_h, patch_w = self.transformer.config.patch_size
        self.tokens = (latent_frames // patch_t) * (height // patch_h) * (width // patch_w)
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        self.latents_mean = torch.tensor(config.latents_mean).view(shape).to(device, self.vae.dtype)
        self.latents_inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(device, self.vae.dtype)

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int, device: torch.device, weight_dtype: torch.dtype):
        return cls(
            load_wan_pipeline(config, seed, device, weight_dtype),
            resolution=config.resolution,
            frames=DEFAULT_FRAMES if config.frames is None else config.frames,
            t5_max_length=config.t5_max_length,
            device=device,
        )

    @classmethod
    def traits(cls, kind: str, config: ModelConfig) -> ModelTraits:
        """From model_index.json (two experts are refused), the scheduler's config (its shift)
        and the VAE's and transformer's configs (model.frames and model.resolution against their
        strides), before anything loads."""
        from fastnft.models import INDEX, read_json

        if config.vae_channels_last:  # its 3-D VAE mixes 2-D and 3-D convolutions: no one layout fits
            raise ConfigError("model.vae_channels_last: applies to 2-D VAEs; Wan's is 3-D, leave it false")
        frames = DEFAULT_FRAMES if config.frames is None else config.frames
        if config.preset is not None:  # a bench preset: its components' published configs
            vae, transformer = _preset_configs(config.preset)
            video_shape(vae, transformer, config.resolution, frames)
            return ModelTraits(kind, video=True, frames=frames)
        paths = component_paths(config, COMPONENTS, "Wan")
        if config.path is not None and (Path(config.path) / INDEX).is_file():
            _refuse_two_experts(read_json(Path(config.path) / INDEX, "model.path"), str(Path(config.path) / INDEX))
        scheduler_shift(read_json(paths["scheduler"] / "scheduler_config.json", "model.path"))
        vae = read_json(paths["vae"] / "config.json", "model.path")
        transformer = read_json(paths["transformer"] / "config.json", "model.path")
        video_shape(vae, transformer, config.resolution, frames)
        return ModelTraits(kind, video=True, frames=frames)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._sample_shape

    def timestep_grid(self, steps: int, shift: float | None) -> Tensor:
        """WanPipeline's sigmas after scheduler.set_timesteps(steps) on a FlowMatchEulerDiscrete
        scheduler with the directory's config (rollout.shift rebuilds it with that shift, as
        diffusers' Wan examples rebuild theirs with another flow_shift). A UniPC directory's
        flow_shift makes the same static grid as every other family (fastnft.sampling)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(self.pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
            return super().timestep_grid(steps, shift)
        config = self.pipeline.scheduler.config
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, **({} if shift is None else {"shift": shift}))
        scheduler.set_timesteps(steps)
        return scheduler.sigmas.to(torch.float32).cpu()

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        sequence, _ = self.pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=self.t5_max_length, device=self.device
        )
        return TextEmbedding(sequence, sequence.new_zeros(len(prompts), 0))  # Wan has no pooled embedding

    def velocity(self, transformer: nn.Module, x: Tensor, t: Tensor, text: TextEmbedding) -> Tensor:
        dtype = input_dtype(transformer)
        timestep = t * 1000.0
        if self.expand_timesteps:
            timestep = timestep[:, None].expand(-1, self.tokens)
        return transformer(
            hidden_states=x.to(dtype),
            timestep=timestep,
            encoder_hidden_states=text.sequence.to(dtype),
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, samples: Tensor) -> Tensor:
        """[B, C, F', H', W'] -> videos [B, 3, F, H, W] in [0, 1], one video at a time (the 3-D
        VAE's activations over every frame are the memory peak)."""
        videos = []
        for latents in samples.split(1):
            latents = latents.to(self.vae.dtype) / self.latents_inverse_std + self.latents_mean
            videos.append(self.vae.decode(latents, return_dict=False)[0].float())
        return to_unit_range(torch.cat(videos))

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """videos [B, 3, F, H, W] (or images [B, 3, H, W], one frame) in [0, 1] -> latents."""
        videos = images[:, :, None] if images.ndim == 4 else images
        latents = self.vae.encode((videos * 2 - 1).to(self.vae.dtype)).latent_dist.mode()
        return ((latents - self.latents_mean) * self.latents_inverse_std).float()

    def frozen_modules(self) -> dict[str, nn.Module]:
        return present({"vae": self.vae, "text_encoder": self.pipeline.text_encoder})
