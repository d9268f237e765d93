"""`imagenet_class`: the shipped EfficientNet-Lite0 (extra `imagenet`, installed by CI)."""

import pytest
import torch

from fastnft.rewards import build_reward
from fastnft.rewards.imagenet import class_index, imagenet_labels

pytest.importorskip("efficientnet_lite_pytorch", reason="the imagenet extra (CI installs it)")


def test_the_label_list_has_the_thousand_classes_in_order():
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[1] == "goldfish" and labels[3] == "tiger shark"


def test_the_class_comes_from_metadata_or_the_longest_label_in_the_prompt():
    assert class_index("a photo of a goldfish in a bowl", {}) == 1
    assert class_index("a tiger shark underwater", {}) == 3  # not "tiger" (292)
    assert class_index("anything", {"class_index": 7}) == 7
    assert class_index("a goldfish", {"class": "Tench"}) == 0
    with pytest.raises(ValueError, match="no ImageNet class named in the prompt 'a blurry thing'"):
        class_index("a blurry thing", {})
    with pytest.raises(ValueError, match="'unicorn' is not an ImageNet label"):
        class_index("x", {"class": "unicorn"})


def test_the_score_is_the_classifiers_probability_of_that_class():
    reward = build_reward("imagenet_class")
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    prompts = ["a goldfish", "a tiger shark", "a tench"]
    score = reward(images, prompts, [{}] * 3).score
    with torch.no_grad():
        logits = reward.model(reward.preprocess(images))
    expected = logits.softmax(-1)[torch.arange(3), torch.tensor([1, 3, 0])]
    torch.testing.assert_close(score, expected)
    assert bool(((score > 0) & (score < 1)).all())
    assert reward.preprocess(images).shape == (3, 3, 224, 224)
