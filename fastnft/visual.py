"""Pictures people would rather look at: sample grids with their prompts."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] or [3, H, W] in [0, 1] -> [B, H, W, 3] or [H, W, 3] uint8, rounded to nearest, the
    pixels every saved or encoded image (PNG, JPEG) holds."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.movedim(-3, -1).cpu().numpy()


def to_pil(image: Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL image."""
    return Image.fromarray(to_uint8(image))


def save_grid(
    images: Tensor, captions: list[str], path: str | Path, *, columns: int | None = None, cell: int = 160
) -> Path:
    """A grid of images [B, 3, H, W] in [0, 1], each scaled to `cell` pixels with its caption below."""
    count = images.shape[0]
    columns = columns or min(count, max(1, math.ceil(math.sqrt(count))))
    rows = math.ceil(count / columns)
    font = ImageFont.load_default()
    caption_height = 36
    sheet = Image.new("RGB", (columns * cell, rows * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index in range(count):
        row, column = divmod(index, columns)
        x, y = column * cell, row * (cell + caption_height)
        sheet.paste(to_pil(images[index]).resize((cell, cell), Image.NEAREST), (x, y))
        lines = textwrap.wrap(captions[index], width=cell // 6)[:3]
        draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines), fill="black", font=font, spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
