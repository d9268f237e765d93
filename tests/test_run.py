"""A run on disk (configs/tiny.yaml): records, grids, exports and evaluations."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fastnft.checkpoint import latest_checkpoint
from fastnft.cli import main
from fastnft.config import ConfigError
from fastnft.run import train
from fastnft.selection import BestEvaluation
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


def eval_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "eval_reward_mean" in row]


def test_export_best_keeps_the_ema_weights_of_the_best_evaluation_across_a_resume(tmp_path):
    select = ["eval.every=1", "eval.select=eval_reward_mean", "optim.lr=0.05"]
    train(tiny_config(select, iterations=4), tmp_path / "straight")
    rows = eval_rows(tmp_path / "straight")
    best_row = max(rows, key=lambda row: row["eval_reward_mean"])  # max keeps the first of equals
    recorded = json.loads((tmp_path / "straight" / "run.json").read_text())["best"]
    value = best_row["eval_reward_mean"]
    assert recorded == {"iteration": best_row["iteration"], "metric": "eval_reward_mean", "value": value}
    assert len({row["eval_reward_mean"] for row in rows}) > 1  # the selection had a choice

    # the same run stopped at the best iteration exports the same weights as export/best
    train(tiny_config(select, iterations=best_row["iteration"]), tmp_path / "short")
    name = "pytorch_lora_weights.safetensors"
    best, short = (load_file(tmp_path / run / name) for run in ("straight/export/best", "short/export"))
    assert best.keys() == short.keys() and all(torch.equal(best[k], short[k]) for k in best)

    train(tiny_config(select, iterations=2), tmp_path / "split")
    assert main(["train", "--resume", str(tmp_path / "split"), "--iterations", "4", "logging.progress=false"]) == 0
    assert json.loads((tmp_path / "split" / "run.json").read_text())["best"] == recorded


def test_an_equal_later_value_does_not_replace_the_best_and_patience_counts_evaluations():
    best = BestEvaluation("eval_accuracy", patience=2)
    assert best.update(1, {"eval_accuracy": 0.5}) and not best.update(2, {"eval_accuracy": 0.5})
    assert best.record() == {"iteration": 1, "metric": "eval_accuracy", "value": 0.5} and not best.out_of_patience
    assert not best.update(3, {"eval_accuracy": 0.25}) and best.out_of_patience
    with pytest.raises(ConfigError, match=r"eval.select: the evaluation rows have no key 'eval_accuracy'"):
        best.update(4, {"eval_reward_mean": 1.0})


def test_patience_stops_a_run_whose_evaluation_stops_improving(tmp_path):
    # lr 0: every evaluation equals the first, so none after it is better
    overrides = ["eval.every=1", "eval.select=eval_reward_mean", "eval.patience=1", "optim.lr=0"]
    trainer = train(tiny_config(overrides, iterations=5), tmp_path)
    assert trainer.iteration == 2
    assert [row["iteration"] for row in eval_rows(tmp_path)] == [1, 2]
    assert (tmp_path / "export" / "best" / "pytorch_lora_weights.safetensors").is_file()
