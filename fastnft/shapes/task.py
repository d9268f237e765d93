"""The `shapes` task: a GenEval-like compositional benchmark small enough to learn on a CPU.

Images are 32 x 32 pixels, coloured shapes on black. Every object's bounding box is 8 or 12 pixels
wide and starts on a multiple of GRID = 4 pixels, the base model's patch size, so object edges
fall on patch edges (the scorer accepts 6 to 14 and ignores connected regions under MIN_AREA
pixels); objects never touch, and positions are unambiguous (centres at least POSITION_GAP pixels
apart along the named axis).

Categories, as GenEval's: single_object ("a circle"), two_object ("a circle and a square"),
counting ("three triangles", 1 to 4), colors ("a red circle"), position ("a circle left of a
square"; left of, right of, above, below) and color_attr ("a red circle and a blue square").
Each prompt carries metadata naming its requirements:

    {"category": ..., "objects": [{"shape": "circle", "color": "red" | null, "count": 1}, ...],
     "relation": null | {"type": "left_of" | "right_of" | "above" | "below"}}

(a relation is between objects[0] and objects[1]). An image satisfies a prompt when it holds
exactly the required objects and nothing else, and the relation holds.
"""

from __future__ import annotations

import itertools
from typing import Any

RESOLUTION = 32
MIN_SIZE, MAX_SIZE = 8, 12  # bounding-box side of an object, pixels
GRID = 4  # rendered boxes start on multiples of GRID and their sides are multiples of it
MIN_AREA = 12  # connected regions smaller than this are noise
POSITION_GAP = 4  # pixels between centres along the axis a relation names
SHAPES = ("circle", "square", "triangle")
COLORS = {  # name -> RGB in [0, 1], far apart so that segmentation is unambiguous
    "red": (0.95, 0.1, 0.1),
    "green": (0.1, 0.85, 0.1),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (0.95, 0.9, 0.1),
}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = {"left_of": "left of", "right_of": "right of", "above": "above", "below": "below"}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _noun(shape: str, count: int = 1) -> str:
    return shape if count == 1 else shape + "s"


def _article(color: str | None, shape: str) -> str:
    return f"a {color} {shape}" if color else f"a {shape}"


def _entry(category: str, objects: list[dict[str, Any]], relation: str | None, prompt: str) -> dict[str, Any]:
    relation_field = {"type": relation} if relation else None
    return {"prompt": prompt, "metadata": {"category": category, "objects": objects, "relation": relation_field}}


def all_prompts() -> list[dict[str, Any]]:
    """Every prompt of the task with its metadata, in a fixed order."""
    entries = []
    for shape in SHAPES:
        entries.append(_entry("single_object", [{"shape": shape, "color": None, "count": 1}], None, f"a {shape}"))
    for first, second in itertools.combinations(SHAPES, 2):
        objects = [{"shape": first, "color": None, "count": 1}, {"shape": second, "color": None, "count": 1}]
        entries.append(_entry("two_object", objects, None, f"a {first} and a {second}"))
    for shape, count in itertools.product(SHAPES, NUMBERS):
        objects = [{"shape": shape, "color": None, "count": count}]
        entries.append(_entry("counting", objects, None, f"{NUMBERS[count]} {_noun(shape, count)}"))
    for color, shape in itertools.product(COLORS, SHAPES):
        entries.append(_entry("colors", [{"shape": shape, "color": color, "count": 1}], None, f"a {color} {shape}"))
    for (first, second), relation in itertools.product(itertools.permutations(SHAPES, 2), RELATIONS):
        objects = [{"shape": first, "color": None, "count": 1}, {"shape": second, "color": None, "count": 1}]
        entries.append(_entry("position", objects, relation, f"a {first} {RELATIONS[relation]} a {second}"))
    for (first, second), (color_a, color_b) in itertools.product(
        itertools.permutations(SHAPES, 2), itertools.permutations(COLORS, 2)
    ):
        objects = [{"shape": first, "color": color_a, "count": 1}, {"shape": second, "color": color_b, "count": 1}]
        prompt = f"{_article(color_a, first)} and {_article(color_b, second)}"
        entries.append(_entry("color_attr", objects, None, prompt))
    return entries


def split_prompts(held_out_every: int = 4) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out): every `held_out_every`-th prompt of each category is held out, so every
    category appears in both and the two sets are disjoint."""
    train, held_out = [], []
    for category in CATEGORIES:
        entries = [e for e in all_prompts() if e["metadata"]["category"] == category]
        for index, entry in enumerate(entries):
            (held_out if index % held_out_every == held_out_every // 2 else train).append(entry)
    return train, held_out


def vocabulary() -> list[str]:
    """Every word a prompt of the task can use (for the offline tokenizer)."""
    words = ["a", "and", *SHAPES, *(s + "s" for s in SHAPES), *COLORS, *NUMBERS.values()]
    words += [w for phrase in RELATIONS.values() for w in phrase.split()]
    return list(dict.fromkeys(words))
