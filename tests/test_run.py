"""A run on disk (configs/tiny.yaml): records, grids, exports and evaluations."""

import json

from fastnft.checkpoint import latest_checkpoint
from fastnft.cli import main
from fastnft.run import train
from tests.helpers import TINY_CONFIG, tiny_config


def test_one_iteration_writes_every_metric(tmp_path):
    assert main(["train", str(TINY_CONFIG), "--out", str(tmp_path), "--iterations", "1", "logging.progress=false"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in rows if "loss" in r]
    assert len(training) == 1 and training[0]["iteration"] == 1
    expected = {
        "reward_mean",
        "reward_std",
        "reward_jpeg_incompressibility",
        "group_std_mean",
        "zero_std_ratio",
        "loss",
        "positive_loss",
        "negative_loss",
        "kl",
        "old_deviation",
        "x0_norm",
        "grad_norm",
        "eta",
        "time_rollout",
        "time_reward",
        "time_train",
        "images_per_sec",
    }
    assert expected <= training[0].keys()
    assert all(v is None or v == v for v in training[0].values())  # no NaN
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "run.json").is_file()
    assert latest_checkpoint(tmp_path).name == "iteration_000001"
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert list((tmp_path / "samples").glob("rollout_*.png"))
    assert list((tmp_path / "tensorboard").iterdir())


def test_evaluation_at_start_with_and_without_guidance(tmp_path):
    overrides = ["eval.at_start=true", "eval.cfg_scales=[1.5, 3]", "eval.images_per_prompt=2", "eval.every=0"]
    train(tiny_config(overrides, iterations=1), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    free, guided = rows[0], rows[1]
    assert free["iteration"] == guided["iteration"] == 0
    assert "eval_reward_mean" in free and not any("cfg" in key for key in free)
    assert "eval_reward_mean" not in guided
    scales = [guided["eval_reward_mean_cfg_1.5"], guided["eval_reward_mean_cfg_3"]]
    assert guided["eval_reward_mean_cfg"] == max(scales) and scales[0] != scales[1]
    assert (tmp_path / "samples" / "eval_000000_cfg_3.png").is_file()
