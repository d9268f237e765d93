"""The model seam: everything that differs between diffusion models sits behind ModelAdapter,
so the training loop never names a model family. FLUX or another family is one more subclass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fastnft.config import ModelConfig
from fastnft.sampling import timestep_grid


def present(modules: dict[str, nn.Module | None]) -> dict[str, nn.Module]:
    """The modules that exist: a pipeline built from a preset has None for its text encoders."""
    return {name: module for name, module in modules.items() if module is not None}


@dataclass
class TextEmbedding:
    """Conditioning of a batch: sequence [B, L, D] and pooled [B, P] embeddings (P = 0 for a
    family without one, Qwen-Image), and an optional mask [B, L] (1: a token, 0: padding) for
    sequences of different lengths (Qwen-Image); None: every token counts, as SD3 and FLUX pad
    to a fixed length and attend to all of it. `cat` pads shorter sequences with zeros and
    masks them out, so embeddings of different batches join into one table."""

    sequence: Tensor
    pooled: Tensor
    mask: Tensor | None = None

    def __len__(self) -> int:
        return self.sequence.shape[0]

    def index(self, rows: Tensor | list[int] | slice) -> TextEmbedding:
        mask = None if self.mask is None else self.mask[rows]
        return TextEmbedding(self.sequence[rows], self.pooled[rows], mask)

    def repeat_interleave(self, repeats: int) -> TextEmbedding:
        sequence, pooled = self.sequence.repeat_interleave(repeats, 0), self.pooled.repeat_interleave(repeats, 0)
        return TextEmbedding(sequence, pooled, None if self.mask is None else self.mask.repeat_interleave(repeats, 0))

    @staticmethod
    def cat(parts: list[TextEmbedding]) -> TextEmbedding:
        length = max(p.sequence.shape[1] for p in parts)
        pooled = torch.cat([p.pooled for p in parts])
        if all(p.mask is None and p.sequence.shape[1] == length for p in parts):
            return TextEmbedding(torch.cat([p.sequence for p in parts]), pooled)
        sequence = torch.cat([nn.functional.pad(p.sequence, (0, 0, 0, length - p.sequence.shape[1])) for p in parts])
        return TextEmbedding(sequence, pooled, torch.cat([p.padded_mask(length) for p in parts]))

    def padded_mask(self, length: int) -> Tensor:
        """[B, length]: the mask (all ones when None) with zeros past this embedding's length."""
        batch, own = self.sequence.shape[:2]
        mask = self.mask
        if mask is None:
            mask = torch.ones(batch, own, dtype=torch.long, device=self.sequence.device)
        return nn.functional.pad(mask, (0, length - own))

    def to(self, device: torch.device, non_blocking: bool = False) -> TextEmbedding:
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return TextEmbedding(
            self.sequence.to(device, non_blocking=non_blocking), self.pooled.to(device, non_blocking=non_blocking), mask
        )

    def cast(self, dtype: torch.dtype) -> TextEmbedding:
        return TextEmbedding(self.sequence.to(dtype), self.pooled.to(dtype), self.mask)  # the mask keeps its dtype

    def pin_memory(self) -> TextEmbedding:
        mask = None if self.mask is None else self.mask.pin_memory()
        return TextEmbedding(self.sequence.pin_memory(), self.pooled.pin_memory(), mask)


@dataclass(frozen=True)
class ModelTraits:
    """What config validation must know of a model before loading it (ModelAdapter.traits)."""

    kind: str
    dynamic_shift: bool = False  # the grid's shift follows the image size: rollout.shift must stay unset
    embedded_guidance: bool = False  # the transformer takes a distilled-guidance input (model.guidance)
    video: bool = False  # samples are videos: decode gives [B, 3, F, H, W], and model.frames applies
    frames: int = 1  # frames of each decoded sample (model.frames resolved)


def weight_dtype(transformer: nn.Module) -> torch.dtype:
    """The dtype of the transformer's first weight: diffusers' .dtype walks every module on every
    call, and a DDP or CUDA-graph wrapper holds the model in .module."""
    return next(getattr(transformer, "module", transformer).parameters()).dtype


def repeated_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's repeated blocks (the unit of regional compile and of FSDP2 sharding)."""
    blocks = [
        *getattr(transformer, "transformer_blocks", []),
        *getattr(transformer, "single_transformer_blocks", []),  # FLUX-style models
        *getattr(transformer, "blocks", []),  # Wan
    ]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no transformer_blocks")
    return blocks


class ModelAdapter(ABC):
    """A text-to-image flow-matching model as the trainer sees it.

    Conventions: x_t = (1 - t) x0 + t eps with t in [0, 1]; the transformer predicts v = eps - x0.
    """

    transformer: nn.Module
    default_lora_targets: tuple[str, ...]
    default_shift: float  # the static grid shift when rollout.shift is unset (timestep_grid)
    # the prompt whose conditioning classifier-free guidance pushes away from (TextConditioning.empty):
    # "" for SD3 and FLUX; a family whose pipeline defaults to another (Qwen-Image: " ") sets it
    negative_prompt: str = ""

    @classmethod
    @abstractmethod
    def from_config(
        cls, config: ModelConfig, seed: int, device: torch.device, weight_dtype: torch.dtype
    ) -> ModelAdapter:
        """The model of `config` (model.path and model.component_paths, or a preset) on `device`,
        frozen weights in `weight_dtype`."""

    @classmethod
    def traits(cls, kind: str, config: ModelConfig) -> ModelTraits:
        """The model's traits from its config (paths already resolved), reading at most small
        JSON files: a static grid shift and no guidance input unless a family says otherwise."""
        return ModelTraits(kind)

    def timestep_grid(self, steps: int, shift: float | None) -> Tensor:
        """[steps + 1] times from 1 to 0 on which every sampler steps and from which training
        draws its t; shift None is the family's default. Here a static shift, exactly diffusers'
        FlowMatchEulerDiscreteScheduler's (fastnft.sampling.timestep_grid)."""
        return timestep_grid(steps, self.default_shift if shift is None else shift)

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample in the transformer's space (latent [C, H, W] or pixels)."""

    @abstractmethod
    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        """Conditioning for each prompt (no grad)."""

    @abstractmethod
    def decode(self, samples: Tensor) -> Tensor:
        """[B, *sample_shape] -> images [B, 3, H, W] in [0, 1] (no grad); a video family's videos
        [B, 3, F, H, W] (ModelTraits.video), whose frames the rewards score (fastnft.rewards.frames)."""

    @abstractmethod
    def encode_images(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> [B, *sample_shape] (no grad; for pretraining)."""

    @abstractmethod
    def frozen_modules(self) -> dict[str, nn.Module]:
        """Every frozen module (text encoders, codec) the model holds, by component name (a preset
        has no text encoders: `present` leaves them out)."""

    def text_encoders(self) -> dict[str, nn.Module]:
        """The frozen modules that encode text (named text_encoder*, as diffusers pipelines do)."""
        return {name: module for name, module in self.frozen_modules().items() if name.startswith("text_encoder")}

    def save_lora(self, directory: Path, lora: dict[str, Tensor], metadata: dict) -> Path:
        """Writes a LoRA (peft names, adapter name stripped) the family's pipeline loads with
        `load_lora_weights(directory)`, through that pipeline class's own writer; returns the file.
        A family without a diffusers pipeline overrides this."""
        type(self.pipeline).save_lora_weights(
            directory, transformer_lora_layers=lora, transformer_lora_adapter_metadata=metadata
        )
        return Path(directory) / "pytorch_lora_weights.safetensors"

    def velocity(self, transformer: nn.Module, x: Tensor, t: Tensor, text: TextEmbedding) -> Tensor:
        """v(x, t) of `transformer` (the trained, old or reference policy); t [B] in [0, 1].
        The diffusers SD3 family takes timestep = t * 1000 (a float: fastnft never truncates it).
        Inputs are cast to the module's weight dtype (bf16 base weights, fp32 full fine-tuning)."""
        dtype = weight_dtype(transformer)
        return transformer(
            hidden_states=x.to(dtype),
            timestep=t * 1000.0,
            encoder_hidden_states=text.sequence.to(dtype),
            pooled_projections=text.pooled.to(dtype),
            return_dict=False,
        )[0]

    def guided_velocity(
        self, transformer: nn.Module, x: Tensor, t: Tensor, text: TextEmbedding, empty: TextEmbedding, scale: float
    ) -> Tensor:
        """Classifier-free guidance against the empty prompt `empty` (one row, broadcast): the
        conditional and unconditional halves in one batched call, u + scale * (c - u). A family
        whose pipeline combines them differently overrides this."""
        both = TextEmbedding.cat([text, empty.repeat_interleave(len(text))])
        v = self.velocity(transformer, torch.cat([x, x]), torch.cat([t, t]), both).float()
        conditional, unconditional = v.chunk(2)
        return unconditional + scale * (conditional - unconditional)


def to_unit_range(images: Tensor) -> Tensor:
    """A decoder's [-1, 1] output as float images in [0, 1]."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def decode_scaled_latents(vae: nn.Module, samples: Tensor, channels_last: bool) -> Tensor:
    """Latents normalised by the VAE's scaling and shift factors (SD3, FLUX) -> images in [0, 1]."""
    config = vae.config
    latents = samples.to(vae.dtype) / config.scaling_factor + config.shift_factor
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    return to_unit_range(vae.decode(latents, return_dict=False)[0])


@torch.no_grad()
def encode_scaled_latents(vae: nn.Module, images: Tensor) -> Tensor:
    """Images in [0, 1] -> latents normalised by the VAE's scaling and shift factors."""
    config = vae.config
    latents = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.mode()
    return ((latents - config.shift_factor) * config.scaling_factor).float()
