"""Pictures people would rather look at: sample grids with their prompts; for videos
[B, 3, F, H, W], frame strips (a row of evenly spaced frames per video) and GIFs."""

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


GRID_FRAMES = 8  # frames in a grid's row per video
STRIP_FRAMES = 16  # frames in a video's own strip (fastnft sample): every frame of videos up to this long
GIF_FPS = 16  # Wan's frame rate


def even_frames(total: int, count: int) -> list[int]:
    """`count` evenly spaced frame indices of a `total`-frame video: the first and the last and
    the rest rounded to nearest between them; one frame is the middle one. The frames a reward
    scores (rewards[].frames) and a grid shows."""
    if not 1 <= count <= total:
        raise ValueError(f"cannot pick {count} frames of a {total}-frame video")
    if count == 1:
        return [(total - 1) // 2]
    return [(2 * i * (total - 1) + count - 1) // (2 * (count - 1)) for i in range(count)]


def frame_strip(video: Tensor, frames: int | None = None) -> Image.Image:
    """One row of `frames` evenly spaced frames of video [3, F, H, W] (every frame when None) at
    their own resolution, side by side: lossless as a PNG, unlike a GIF's palette."""
    total = video.shape[1]
    chosen = even_frames(total, min(frames, total)) if frames is not None else range(total)
    pixels = to_uint8(video[:, list(chosen)].movedim(1, 0))  # [n, H, W, 3]
    return Image.fromarray(np.concatenate(list(pixels), axis=1))


def save_strip(video: Tensor, path: str | Path, frames: int | None = STRIP_FRAMES) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame_strip(video, frames).save(path)
    return path


def save_gif(video: Tensor, path: str | Path, fps: int = GIF_FPS) -> Path:
    """Every frame of video [3, F, H, W] as a looping GIF (256 colours a frame: for looking, not
    for measuring)."""
    frames = [Image.fromarray(array) for array in to_uint8(video.movedim(1, 0))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path


def save_grid(
    images: Tensor, captions: list[str], path: str | Path, *, columns: int | None = None, cell: int = 160
) -> Path:
    """A grid of images [B, 3, H, W] in [0, 1], each scaled to `cell` pixels with its caption
    below; videos [B, 3, F, H, W] make one row each (a frame strip, save_video_grid)."""
    if images.ndim == 5:
        return save_video_grid(images, captions, path, cell=cell)
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


def save_video_grid(videos: Tensor, captions: list[str], path: str | Path, *, cell: int = 160) -> Path:
    """Videos [B, 3, F, H, W] in [0, 1], one row each: GRID_FRAMES evenly spaced frames (every
    frame of shorter videos), each scaled to `cell` pixels, the caption below the row."""
    count, total = videos.shape[0], videos.shape[2]
    chosen = even_frames(total, min(GRID_FRAMES, total))
    font = ImageFont.load_default()
    caption_height = 24
    sheet = Image.new("RGB", (len(chosen) * cell, count * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index in range(count):
        y = index * (cell + caption_height)
        for slot, frame in enumerate(chosen):
            sheet.paste(to_pil(videos[index, :, frame]).resize((cell, cell), Image.NEAREST), (slot * cell, y))
        caption = textwrap.shorten(captions[index], width=max(10, len(chosen) * cell // 6), placeholder="...")
        draw.text((2, y + cell + 1), caption, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
