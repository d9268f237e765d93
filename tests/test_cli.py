"""The command line: config errors as one line with exit 2, resume rules, sample and eval."""

import json
import sys

import yaml

from fastnft.cli import main
from fastnft.config import load_config
from fastnft.run import train
from tests.helpers import TINY_CONFIG, tiny_config

QUIET = ["logging.progress=false", "logging.tensorboard=false"]


def test_a_config_error_exits_2_with_one_line(tmp_path, capsys):
    # test_config.py holds the table of errors; this checks the CLI's way of reporting one.
    code = main(["train", str(TINY_CONFIG), "--out", str(tmp_path), "nft.beta=-1"])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and "nft.beta: must be > 0" in error and "Traceback" not in error
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_resume_refuses_a_different_config(tmp_path, capsys):
    train(tiny_config(iterations=1), tmp_path)
    code = main(["train", str(TINY_CONFIG), "--resume", str(tmp_path), "nft.beta=0.5", *QUIET])
    error = capsys.readouterr().err
    assert code == 2 and "differs from the run's in nft.beta" in error and "logging" not in error
    assert load_config(tmp_path / "config.yaml").nft.beta == 1.0


def test_missing_optional_optimizer_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    code = main(["train", str(TINY_CONFIG), "--out", str(tmp_path), "optim.name=adamw8bit-bnb", *QUIET])
    assert code == 2 and "optim.name: adamw8bit-bnb needs bitsandbytes" in capsys.readouterr().err


def test_sample_needs_no_reward_model_and_eval_scores_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(["eval.every=0"], iterations=1), run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["rewards"] = [{"name": "pickscore", "weight": 1.0, "options": {"path": str(tmp_path / "gone")}}]
    (run / "config.yaml").write_text(yaml.safe_dump(config))  # the reward model's directory is gone
    assert main(["sample", str(run), "--prompts", "a red circle", "--out", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "0000.png").is_file() and (tmp_path / "samples" / "grid.png").is_file()
    assert main(["eval", str(run)]) == 2
    assert "rewards:" in capsys.readouterr().err

    config["rewards"] = [{"name": "jpeg_incompressibility", "weight": 1.0, "options": {}}]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", str(run), "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["iteration"] == 1 and result["eval_reward_mean"] > 0
