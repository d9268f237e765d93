"""The embedded `shapes` task: prompts, renderer and scorer."""

import copy
import json

import pytest
import torch

from fastnft.cli import default_config_path
from fastnft.rewards import build_reward
from fastnft.shapes.render import render
from fastnft.shapes.score import score_images
from fastnft.shapes.task import CATEGORIES, COLORS, RELATIONS, all_prompts, split_prompts

PROMPTS = default_config_path().parent / "prompts"
RENDERS_PER_CATEGORY = 500


def renders(entries, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    metadata = [entries[i % len(entries)]["metadata"] for i in range(count)]
    return torch.stack([render(m, generator) for m in metadata]), metadata


def test_prompts_cover_every_category_and_the_splits_are_disjoint():
    train, held_out = split_prompts()
    for split in (train, held_out):
        assert {e["metadata"]["category"] for e in split} == set(CATEGORIES)
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in held_out}
    assert len(train) + len(held_out) == len(all_prompts()) == len({e["prompt"] for e in all_prompts()})
    committed = [
        [json.loads(line) for line in (PROMPTS / name).read_text().splitlines()]
        for name in ("shapes_train.jsonl", "shapes_eval.jsonl")
    ]
    assert committed == [train, held_out]  # the shipped files are the split


@pytest.mark.parametrize("category", CATEGORIES)
def test_scorer_passes_rendered_images(category):
    entries = [e for e in all_prompts() if e["metadata"]["category"] == category]
    images, metadata = renders(entries, RENDERS_PER_CATEGORY, seed=CATEGORIES.index(category))
    score, accuracy = score_images(images, metadata)
    assert accuracy.mean() >= 0.99 and score.mean() >= 0.99


def test_noise_and_blank_images_fail():
    entries = all_prompts()
    metadata = [entries[i % len(entries)]["metadata"] for i in range(500)]
    noise = torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for images in (noise, torch.zeros(500, 3, 32, 32), torch.full((500, 3, 32, 32), 0.5)):
        score, accuracy = score_images(images, metadata)
        assert accuracy.mean() <= 0.02 and score.mean() <= 0.10


def rendered(prompt):
    entry = next(e for e in all_prompts() if e["prompt"] == prompt)
    image, _ = renders([entry], 1)
    return image, entry["metadata"]


def test_wrong_colour_count_and_relation_fail():
    image, metadata = rendered("a red circle and a blue square")
    swapped = copy.deepcopy(metadata)
    swapped["objects"][0]["color"], swapped["objects"][1]["color"] = "blue", "red"
    score, accuracy = score_images(image, [swapped])
    assert accuracy.item() == 0 and score.item() < 1

    image, metadata = rendered("three triangles")
    for count in (2, 4):
        wrong = copy.deepcopy(metadata)
        wrong["objects"][0]["count"] = count
        score, accuracy = score_images(image, [wrong])
        assert accuracy.item() == 0 and 0 < score.item() < 1

    image, metadata = rendered("a circle left of a square")
    opposite = copy.deepcopy(metadata)
    opposite["relation"]["type"] = "right_of"
    score, accuracy = score_images(image, [opposite])
    assert accuracy.item() == 0 and score.item() == pytest.approx(2 / 3)


def test_wrong_shape_and_extra_objects_fail():
    image, metadata = rendered("a red circle")
    as_square = copy.deepcopy(metadata)
    as_square["objects"][0]["shape"] = "square"
    assert score_images(image, [as_square])[1].item() == 0
    two, _ = rendered("a circle and a square")
    score, accuracy = score_images(two, [{"objects": [{"shape": "circle", "color": None, "count": 1}]}])
    assert accuracy.item() == 0 and score.item() == pytest.approx(0.5)  # one extra object halves the credit


def test_reward_registration_and_extras():
    reward = build_reward("shapes")
    images, metadata = renders(all_prompts(), 6)
    output = reward(images, [""] * 6, metadata)
    assert output.score.shape == (6,) and set(output.extras) == {"accuracy"}
    assert torch.equal(output.extras["accuracy"], torch.ones(6))
    with pytest.raises(ValueError, match="metadata"):
        reward(images[:1], ["a circle"], [{}])


def test_vocabulary_of_relations_and_colours():
    prompts = {e["prompt"] for e in all_prompts()}
    assert all(any(f" {phrase} " in p for p in prompts) for phrase in RELATIONS.values())
    assert all(any(color in p for p in prompts) for color in COLORS)
