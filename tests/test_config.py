"""Config loading: YAML plus overrides, types, and errors that name the field."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from fastnft.config import Config, ConfigError, load_config


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog\n")
    return path


def write_config(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_reference_recipe(prompt_file):
    config = load_config(None, ["model.preset=tiny-sd3", f"prompts.train={prompt_file}"])
    assert (config.rollout.groups, config.rollout.group_size, config.rollout.steps) == (48, 24, 10)
    assert (config.nft.beta, config.nft.kl_coef, config.nft.adv_clip_max, config.nft.eps) == (1.0, 1e-4, 5.0, 1e-5)
    assert (config.lora.rank, config.lora.alpha, config.lora.target_modules) == (32, 64, [])  # the model's own
    assert (config.optim.lr, config.optim.weight_decay, config.optim.grad_clip) == (3e-4, 1e-4, 1.0)
    assert config.old_policy.schedule == 1 and config.ema.max_decay == 0.9


def test_yaml_and_overrides_combine_and_paths_resolve_next_to_the_config(tmp_path, prompt_file):
    path = write_config(tmp_path, "model:\n  preset: tiny-sd3\nprompts:\n  train: prompts.txt\nnft:\n  beta: 0.5\n")
    overrides = ["nft.beta=0.1", "rollout.group_size=4", "rollout.groups=3", "nft.micro_batch_size=6"]
    overrides += ["rollout.batch_size=4", "rewards=[{name: jpeg_compressibility, weight: 2}]"]
    config = load_config(path, overrides)
    assert config.nft.beta == 0.1 and config.rollout.group_size == 4
    assert config.prompts.train == str(prompt_file.resolve())
    assert config.rewards[0].name == "jpeg_compressibility" and config.rewards[0].weight == 2.0


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("nft.betta=1", "nft.betta: unknown key"),
        ("nft.beta=abc", "nft.beta: expected float"),
        ("nft.beta=0", "nft.beta: must be > 0"),
        ("rollout.group_size=1", "rollout.group_size: must be >= 2"),
        ("nft.micro_batch_size=7", "nft.micro_batch_size: must divide"),
        ("rollout.sampler=heun", "rollout.sampler: must be one of"),
        ("model.path=/no/such/dir", "model.path: no such directory"),
        ("prompts.train=/no/such/file.txt", "prompts.train: no such file"),
        ("lora.enabled=maybe", "lora.enabled: expected bool"),
        ("nft=3", "nft: expected a mapping"),
        ("novalue", "novalue: overrides are written key=value"),
        ("old_policy.eta_max=1", "old_policy.eta_max: must be in [0, 1)"),
        ("old_policy.eta_rate=-0.1", "old_policy.eta_rate: must be >= 0"),
    ],
)
def test_bad_values_name_their_field(prompt_file, override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(None, ["model.preset=tiny-sd3", f"prompts.train={prompt_file}", override])


def test_missing_config_file_and_missing_model(tmp_path, prompt_file):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"model\.path: set a local pipeline directory"):
        load_config(None, [f"prompts.train={prompt_file}"])


def test_docs_name_every_field():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()

    def fields(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[item.name]):
                yield from fields(hints[item.name], f"{prefix}{item.name}.")
            else:
                yield prefix, item.name

    missing = [f"{p}{n}" for p, n in fields(Config) if f"`{n}`" not in docs and f"`{p}{n}`" not in docs]
    assert not missing, f"docs/config.md does not document {missing}"
