"""Deterministic renderer of `shapes` training images: random sizes and placements that satisfy
the prompt's metadata exactly (task.py states the geometry)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastnft.shapes.task import COLORS, GRID, MAX_SIZE, MIN_SIZE, POSITION_GAP, RESOLUTION

MAX_TRIES = 200


def shape_mask(shape: str, size: int) -> Tensor:
    """[size, size] bool mask of a circle, square or upward triangle filling the box."""
    coordinates = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    if shape == "square":
        return torch.ones(size, size, dtype=torch.bool)
    if shape == "circle":
        return x.square() + y.square() <= (size / 2) ** 2
    if shape == "triangle":
        row = torch.arange(size, dtype=torch.float32).view(-1, 1).expand(size, size)
        return x.abs() <= (row + 0.5) / size * (size / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _relation_holds(relation: str, first: tuple[int, int, int], second: tuple[int, int, int]) -> bool:
    """first/second: (left, top, size); compares box centres with a clear gap."""
    (ax, ay, asize), (bx, by, bsize) = first, second
    acx, acy = ax + asize / 2, ay + asize / 2
    bcx, bcy = bx + bsize / 2, by + bsize / 2
    return {
        "left_of": acx + POSITION_GAP <= bcx,
        "right_of": acx >= bcx + POSITION_GAP,
        "above": acy + POSITION_GAP <= bcy,
        "below": acy >= bcy + POSITION_GAP,
    }[relation]


def _separated(box: tuple[int, int, int], others: list[tuple[int, int, int]]) -> bool:
    """Boxes (left, top, size) at least one empty pixel apart."""
    x, y, size = box
    return all(x + size < ox or ox + osize < x or y + size < oy or oy + osize < y for ox, oy, osize in others)


def render(metadata: dict[str, Any], generator: torch.Generator) -> Tensor:
    """[3, RESOLUTION, RESOLUTION] in [0, 1]: the prompt's objects on black, nothing else."""

    def randint(low: int, high: int) -> int:  # inclusive
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    palette = list(COLORS)
    objects = [
        (spec["shape"], spec["color"] or palette[randint(0, len(palette) - 1)])
        for spec in metadata["objects"]
        for _ in range(spec["count"])
    ]
    relation = (metadata.get("relation") or {}).get("type")
    for _ in range(MAX_TRIES):
        boxes: list[tuple[int, int, int]] = []
        for _ in objects:
            for _ in range(MAX_TRIES):
                size = GRID * randint(MIN_SIZE // GRID, MAX_SIZE // GRID)
                last = (RESOLUTION - size) // GRID
                box = (GRID * randint(0, last), GRID * randint(0, last), size)
                if _separated(box, boxes):
                    boxes.append(box)
                    break
        if len(boxes) == len(objects) and (relation is None or _relation_holds(relation, boxes[0], boxes[1])):
            break
    else:
        raise RuntimeError(f"could not place {metadata}")
    image = torch.zeros(3, RESOLUTION, RESOLUTION)
    for (shape, color), (x, y, size) in zip(objects, boxes, strict=True):
        mask = shape_mask(shape, size)
        region = image[:, y : y + size, x : x + size]
        region[:, mask] = torch.tensor(COLORS[color]).view(3, 1)
    return image
