"""A pixel-space member of the SD3 family: diffusers' SD3Transformer2DModel on RGB pixels in
[-1, 1] (identity codec), conditioned by one CLIP-style text encoder (transformers'
CLIPTextModelWithProjection: sequence = last hidden states, pooled = projected embedding).
The embedded `shapes` task uses it; it runs through exactly the trainer code path of SD3.5-M.

Directory layout (as diffusers / transformers save them): transformer/, text_encoder/, tokenizer/.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fastnft.config import ConfigError, ModelConfig
from fastnft.models.adapter import ModelAdapter, TextEmbedding, to_unit_range
from fastnft.models.presets import build_preset
from fastnft.models.sd3 import JOINT_ATTENTION_PROJECTIONS


def load_pixel_components(config: ModelConfig, seed: int, weight_dtype: torch.dtype) -> dict[str, object]:
    from diffusers import SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    if config.preset is not None:
        components = build_preset(config.preset, seed)
    else:
        root = Path(config.path)
        paths = {
            name: Path(config.component_paths.get(name, root / name))
            for name in ("transformer", "text_encoder", "tokenizer")
        }
        for name, path in paths.items():
            if not path.is_dir():
                raise ConfigError(
                    f"model.path: {root} has no {name}/ directory (an sd3-pixel model needs "
                    "transformer/, text_encoder/ and tokenizer/)"
                )
        components = {
            "transformer": SD3Transformer2DModel.from_pretrained(paths["transformer"]),
            "text_encoder": CLIPTextModelWithProjection.from_pretrained(paths["text_encoder"]),
            "tokenizer": AutoTokenizer.from_pretrained(paths["tokenizer"]),
        }
    for name in ("transformer", "text_encoder"):
        components[name] = components[name].to(weight_dtype)
    return components


class SD3PixelAdapter(ModelAdapter):
    default_lora_targets = JOINT_ATTENTION_PROJECTIONS
    default_shift = 3.0  # the SD3 family's; every shapes run in docs/shapes-experiments.md sampled on it

    def __init__(
        self, transformer, text_encoder, tokenizer, *, resolution: int, max_length: int, device: torch.device
    ) -> None:
        self.transformer = transformer.to(device)
        self.text_encoder = text_encoder.to(device)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = device
        channels = transformer.config.in_channels
        if resolution % transformer.config.patch_size:
            raise ConfigError(f"model.resolution: {resolution} is not a multiple of the patch size")
        self._sample_shape = (channels, resolution, resolution)

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int, device: torch.device, weight_dtype: torch.dtype):
        components = load_pixel_components(config, seed, weight_dtype)
        return cls(
            components["transformer"],
            components["text_encoder"],
            components["tokenizer"],
            resolution=config.resolution,
            max_length=config.clip_max_length,
            device=device,
        )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._sample_shape

    def tokenize(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return tokens.input_ids.to(self.device)

    def encode_tokens(self, input_ids: Tensor) -> TextEmbedding:
        """With gradient when the text encoder trains (pretraining); the trainer calls encode_text."""
        output = self.text_encoder(input_ids)
        return TextEmbedding(output.last_hidden_state, output.text_embeds)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        return self.encode_tokens(self.tokenize(prompts))

    @torch.no_grad()
    def decode(self, samples: Tensor) -> Tensor:
        return to_unit_range(samples)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        return images.float() * 2 - 1

    def save_lora(self, directory: Path, lora: dict[str, Tensor], metadata: dict) -> Path:
        """No diffusers pipeline exists for this model: the LoRA is saved in diffusers' naming
        (`transformer.` prefix, peft metadata), which peft and diffusers' loaders read."""
        import json

        from safetensors.torch import save_file

        path = Path(directory) / "pytorch_lora_weights.safetensors"
        tensors = {f"transformer.{name}": tensor for name, tensor in lora.items()}
        save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata, default=list)})
        return path

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}
