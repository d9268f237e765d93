"""Deterministic scorer of `shapes` images: colour segmentation, connected components, shape from
geometry. No learned model.

- A pixel belongs to a palette colour when it lies within COLOR_RADIUS of it (Euclidean, RGB in
  [0, 1]); everything else is background.
- 4-connected regions of one colour with at least MIN_AREA pixels are objects.
- Shape: the bounding box must be near square (aspect within ASPECT_RANGE) and of object size;
  the shape is the ideal circle, square or upward triangle filling that box whose mask has the
  highest IoU with the region, if that IoU is at least MIN_IOU (ideal shapes overlap each other
  with IoU <= 0.79 - circle vs square - so a clean shape is never ambiguous). Anything else is an
  unknown object.

Matching: each required group (coloured groups first) takes up to `count` matching objects; its
credit is found / count. A relation earns credit when both groups hold exactly one object and the
centres are at least RELATION_MARGIN pixels apart the named way. Unmatched objects are extras.

    score    = mean(credits) / (1 + extras)             partial credit in [0, 1], the reward
    accuracy = 1 if every credit is 1 and extras = 0    strict, GenEval-style
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastnft.shapes.task import COLORS, MAX_SIZE, MIN_AREA, MIN_SIZE

COLOR_RADIUS = 0.4
ASPECT_RANGE = (0.6, 1 / 0.6)
MIN_IOU = 0.7
RELATION_MARGIN = 2.0
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # [C, 3]
_COLOR_NAMES = list(COLORS)


@dataclass(frozen=True)
class Detection:
    shape: str  # circle | square | triangle | unknown
    color: str
    cx: float
    cy: float


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask, each as an [N, 2] array of (y, x)."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    components = []
    for start_y, start_x in zip(*np.nonzero(mask), strict=True):
        if seen[start_y, start_x]:
            continue
        stack, pixels = [(start_y, start_x)], []
        seen[start_y, start_x] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        components.append(np.array(pixels))
    return components


def _template(shape: str, height: int, width: int) -> np.ndarray:
    """The ideal mask of `shape` filling a height x width box (what the renderer draws)."""
    y = (np.arange(height) - (height - 1) / 2)[:, None] / (height / 2)
    x = (np.arange(width) - (width - 1) / 2)[None, :] / (width / 2)
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return x**2 + y**2 <= 1.0
    row = np.arange(height)[:, None]
    return np.abs(x) <= (row + 0.5) / height  # upward triangle


def _classify(pixels: np.ndarray) -> str:
    """The template (circle, square, triangle) with the highest IoU over the component's box,
    if the box is near square, of object size, and the IoU at least MIN_IOU."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    top, left = ys.min(), xs.min()
    height, width = ys.max() - top + 1, xs.max() - left + 1
    if not (ASPECT_RANGE[0] <= width / height <= ASPECT_RANGE[1]):
        return "unknown"
    if not (MIN_SIZE - 2 <= max(width, height) <= MAX_SIZE + 2):
        return "unknown"
    mask = np.zeros((height, width), dtype=bool)
    mask[ys - top, xs - left] = True
    best, best_iou = "unknown", MIN_IOU
    for shape in ("circle", "square", "triangle"):
        template = _template(shape, height, width)
        iou = (mask & template).sum() / (mask | template).sum()
        if iou >= best_iou:
            best, best_iou = shape, iou
    return best


def detect(image: Tensor) -> list[Detection]:
    """Objects in one image [3, H, W] in [0, 1]."""
    pixels = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # [H, W, 3]
    distances = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)  # [H, W, C]
    nearest = distances.argmin(-1)
    labels = np.where(distances.min(-1) < COLOR_RADIUS, nearest, -1)
    found = []
    for index, name in enumerate(_COLOR_NAMES):
        for component in _components(labels == index):
            if len(component) >= MIN_AREA:
                cy, cx = component.mean(0)
                found.append(Detection(_classify(component), name, float(cx), float(cy)))
    return found


def _relation_holds(relation: str, first: Detection, second: Detection) -> bool:
    return {
        "left_of": first.cx + RELATION_MARGIN <= second.cx,
        "right_of": first.cx >= second.cx + RELATION_MARGIN,
        "above": first.cy + RELATION_MARGIN <= second.cy,
        "below": first.cy >= second.cy + RELATION_MARGIN,
    }[relation]


def judge(detections: list[Detection], metadata: dict[str, Any]) -> tuple[float, bool]:
    """(partial credit in [0, 1], strict pass) of one image's detections against its prompt."""
    remaining = list(detections)
    groups = metadata["objects"]
    order = sorted(range(len(groups)), key=lambda i: groups[i]["color"] is None)  # coloured groups first
    assigned: dict[int, list[Detection]] = {}
    for index in order:
        group = groups[index]
        matches = [d for d in remaining if d.shape == group["shape"] and group["color"] in (None, d.color)][
            : group["count"]
        ]
        for detection in matches:
            remaining.remove(detection)
        assigned[index] = matches
    credits = [len(assigned[i]) / groups[i]["count"] for i in range(len(groups))]
    relation = (metadata.get("relation") or {}).get("type")
    if relation is not None:
        pair = (assigned[0], assigned[1])
        holds = all(len(p) == 1 for p in pair) and _relation_holds(relation, pair[0][0], pair[1][0])
        credits.append(1.0 if holds else 0.0)
    extras = len(remaining)
    score = sum(credits) / len(credits) / (1 + extras)
    return score, all(c == 1.0 for c in credits) and extras == 0


def score_images(images: Tensor, metadata: list[dict[str, Any]]) -> tuple[Tensor, Tensor]:
    """images [B, 3, H, W] in [0, 1] -> (partial credit [B], strict accuracy [B] as 0./1.)."""
    results = [judge(detect(image), meta) for image, meta in zip(images, metadata, strict=True)]
    return torch.tensor([r[0] for r in results]), torch.tensor([float(r[1]) for r in results])
