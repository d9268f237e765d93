"""CLIP-family rewards from LOCAL directories in transformers layout (never downloaded), with the
image preprocessing done in batch on the images' device (no torchvision, no PIL round trip).

Scales (docs/algorithm.md, section 4; they matter, since advantages divide by the std of the sum):

- `clipscore` (openai CLIP ViT-L/14): exp(logit_scale) * cos(image, text) / 100;
- `pickscore` (PickScore's CLIP-H): exp(logit_scale) * cos(image, text) / 26;
- `hpsv2` (HPSv2.1's ViT-H-14, converted by `python -m fastnft.rewards.convert_hps`): cos(image, text);
- `aesthetic` (LAION's predictor): an MLP head on the L2-normalised CLIP-L/14 image embedding.

Options: `path` (the model directory: config, weights, tokenizer and preprocessor_config.json),
`processor` (a directory with preprocessor_config.json and the tokenizer, if not in `path`),
`dtype` (float32 | bfloat16 | float16); `aesthetic` also takes `head` (the MLP weights file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnft.rewards.base import Reward, RewardOutput, register

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def local_directory(reward: str, option: str, value: str | None) -> Path:
    """A directory named by a reward option, or a ValueError naming the option."""
    if value is None:
        raise ValueError(f"reward {reward!r}: set options.{option} to a local directory (nothing is downloaded)")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ValueError(f"reward {reward!r}: options.{option} = {path} is not a directory")
    return path


class ClipPreprocess:
    """CLIPImageProcessor's steps on float images [B, 3, H, W] in [0, 1]: resize the shortest edge
    (bicubic, antialiased), center crop, normalise. Values from the directory's
    preprocessor_config.json (CLIP's defaults when it has none)."""

    def __init__(self, directory: Path) -> None:
        from transformers import CLIPImageProcessor

        if (directory / "preprocessor_config.json").is_file():
            processor = CLIPImageProcessor.from_pretrained(directory)
        else:
            processor = CLIPImageProcessor()
        size = processor.size
        self.shortest_edge = size["shortest_edge"] if "shortest_edge" in size else min(size["height"], size["width"])
        crop = processor.crop_size
        self.crop = (crop["height"], crop["width"])
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        images = images.float()
        height, width = images.shape[-2:]
        scale = self.shortest_edge / min(height, width)
        size = (max(self.shortest_edge, round(height * scale)), max(self.shortest_edge, round(width * scale)))
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        images = images[..., top : top + self.crop[0], left : left + self.crop[1]]
        return (images - self.mean.to(images.device)) / self.std.to(images.device)


class ClipModelReward(Reward):
    """A transformers CLIPModel, its tokenizer and preprocessing, moved to the images' device on
    first use. Subclasses turn (image embeddings, text embeddings, logit scale) into a score."""

    def __init__(self, path: str | None = None, processor: str | None = None, dtype: str = "float32") -> None:
        from transformers import CLIPModel

        directory = local_directory(self.name, "path", path)
        processor_directory = local_directory(self.name, "processor", processor) if processor else directory
        if dtype not in DTYPES:
            raise ValueError(f"reward {self.name!r}: options.dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        try:
            self.model = CLIPModel.from_pretrained(directory, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        except (OSError, ValueError) as error:
            raise ValueError(f"reward {self.name!r}: cannot load a CLIP model from {directory}: {error}") from None
        self.preprocess = ClipPreprocess(processor_directory)
        self.tokenizer_directory = processor_directory
        self._tokenizer = None

    @property
    def tokenizer(self):
        """Loaded on first use (the aesthetic reward never needs one)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_directory)
            except (OSError, ValueError) as error:
                raise ValueError(f"reward {self.name!r}: no tokenizer in {self.tokenizer_directory}: {error}") from None
        return self._tokenizer

    @torch.no_grad()
    def embed_images(self, pixels: Tensor) -> Tensor:
        """Normalised image embeddings of preprocessed pixels."""
        features = self.model.get_image_features(pixel_values=pixels.to(self.model.dtype))
        features = getattr(features, "pooler_output", features)
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str], device: torch.device) -> Tensor:
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        features = getattr(features, "pooler_output", features)
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        self.model.to(images.device)
        image_embeds = self.embed_images(self.preprocess(images))
        text_embeds = self.embed_texts(prompts, images.device)
        cosine = (image_embeds * text_embeds).sum(-1)
        return RewardOutput(self.score(cosine, self.model.logit_scale.exp().float()))

    def score(self, cosine: Tensor, logit_scale: Tensor) -> Tensor:
        raise NotImplementedError


@register("clipscore")
class ClipScore(ClipModelReward):
    def score(self, cosine: Tensor, logit_scale: Tensor) -> Tensor:
        return logit_scale * cosine / 100


@register("pickscore")
class PickScore(ClipModelReward):
    def score(self, cosine: Tensor, logit_scale: Tensor) -> Tensor:
        return logit_scale * cosine / 26


@register("hpsv2")
class HPSv2(ClipModelReward):
    def score(self, cosine: Tensor, logit_scale: Tensor) -> Tensor:
        return cosine


class AestheticHead(nn.Module):
    """LAION's improved aesthetic predictor: an MLP from a 768-d CLIP-L/14 embedding to a score
    (about 1-10). Layer names match its released weights (layers.0, .2, .4, .6, .7)."""

    def __init__(self, width: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings).squeeze(-1)


@register("aesthetic")
class Aesthetic(ClipModelReward):
    def __init__(self, head: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        if head is None or not Path(head).expanduser().is_file():
            raise ValueError(f"reward 'aesthetic': options.head = {head} is not a file (the MLP weights, .pth)")
        path = Path(head).expanduser()
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.head = AestheticHead(state["layers.0.weight"].shape[1])
        self.head.load_state_dict(state)
        self.head.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        self.model.to(images.device)
        self.head.to(images.device)
        return RewardOutput(self.head(self.embed_images(self.preprocess(images))))
