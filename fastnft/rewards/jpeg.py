"""JPEG (in)compressibility, as in DDPO: the encoded size at quality 95.

incompressibility = size_kB,  compressibility = -size_kB / 500
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from fastnft.rewards.base import Reward, RewardOutput, register
from fastnft.visual import to_uint8

QUALITY = 95


def jpeg_size_kb(images: Tensor) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> [B] size in kB of each image saved as JPEG at quality 95."""
    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=QUALITY)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


@register("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return RewardOutput(jpeg_size_kb(images))


@register("jpeg_compressibility")
class JpegCompressibility(Reward):
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return RewardOutput(-jpeg_size_kb(images) / 500)
