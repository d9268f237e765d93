"""Config loading: YAML plus overrides, types, and errors that name the field."""

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest
import torch

from fastnft.config import Config, ConfigError, Length, Range, check_recipe, load_config
from fastnft.models import check_model_rules


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
        ("model.precision=fp16", "model.precision: must be one of bf16, fp32, reference; got 'fp16'"),
        ("old_policy.schedule=3", "old_policy.schedule: must be one of 0, 1, 2; got 3"),
        ("old_policy.schedule=true", "old_policy.schedule: must be one of 0, 1, 2; got True"),
        ("eval.sampler=heun", "eval.sampler: must be one of dpm2m, euler, sde; got 'heun'"),
        ("optim.lr=.inf", "optim.lr: must be a finite number; got inf"),
        ("nft.beta=.nan", "nft.beta: must be a finite number; got nan"),
        ("nft.kl_coef=-.inf", "nft.kl_coef: must be a finite number; got -inf"),
        ("rollout.shift=inf", "rollout.shift: must be a finite number; got inf"),
        ("rollout.shift=0", "rollout.shift: must be > 0; got 0.0"),
        ("model.kind=sdxl", "model.kind: must be one of auto, sd3, sd3-pixel, flux, qwen-image"),
        ("model.kind=flux", "model.kind: preset tiny-sd3 is a sd3 model, not flux"),
        ("model.guidance=-1", "model.guidance: must be >= 0; got -1.0"),
        ("model.guidance=3.5", "model.guidance: this sd3 transformer takes no guidance input"),
        ("model.preset=tiny-sdxl", "model.preset: unknown preset 'tiny-sdxl'; known: tiny-sd3, sd35m"),
        ("rollout.sde_noise_level=.nan", "rollout.sde_noise_level: must be a finite number; got nan"),
        ("ema.max_decay=2", "ema.max_decay: must be in [0, 1]; got 2.0"),
        ("ema.max_decay=.nan", "ema.max_decay: must be a finite number; got nan"),
        ("optim.betas=[0.9, 1.0]", "optim.betas[1]: must be in [0, 1); got 1.0"),
        ("optim.betas=[0.9, .inf]", "optim.betas[1]: must be a finite number; got inf"),
        ("optim.betas=[0.9]", "optim.betas: must hold exactly 2 items; got [0.9]"),
        ("optim.eps=0", "optim.eps: must be > 0; got 0.0"),
        ("eval.cfg_scales=[1.5, 1]", "eval.cfg_scales[1]: must be > 1; got 1.0"),
        ("eval.cfg_scales=[.inf]", "eval.cfg_scales[0]: must be a finite number; got inf"),
        ("rewards=[{name: jpeg_compressibility, weight: .nan}]", "rewards[0].weight: must be a finite number; got nan"),
        ("rewards=[{name: ''}]", "rewards[0].name: must not be empty"),
        ("rewards=[]", "rewards: must not be empty"),
        ("nft.timestep_fraction=0", "nft.timestep_fraction: must be in (0, 1]; got 0.0"),
        ("rollout.guidance_scale=0.5", "rollout.guidance_scale: must be >= 1 (1 = no guidance); got 0.5"),
        ("checkpoint.every=-1", "checkpoint.every: must be >= 0; got -1"),
        ("optim.steps_per_iteration=5", "optim.steps_per_iteration: must divide the 128 micro-batches"),
    ],
)
def test_bad_values_name_their_field(prompt_file, override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):  # the config's own rules, then the family's
        check_model_rules(load_config(None, ["model.preset=tiny-sd3", f"prompts.train={prompt_file}", override]))


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


def _rules(hint, value, name=""):
    """(dotted name, rule, value) for every rule written on the tree under value, list items and
    list elements included: Range and Length objects, and the choices of a Literal as a tuple."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint, include_extras=True)
        for item in dataclasses.fields(hint):
            child = f"{name}.{item.name}" if name else item.name
            yield from _rules(hints[item.name], getattr(value, item.name), child)
    elif origin is typing.Annotated:
        inner, *rules = typing.get_args(hint)
        yield from ((name, rule, value) for rule in rules)
        yield from _rules(inner, value, name)
    elif origin is typing.Literal:
        yield name, typing.get_args(hint), value
    elif origin is list:
        (item,) = typing.get_args(hint)
        for index, element in enumerate(value):
            yield from _rules(item, element, f"{name}[{index}]")
    elif origin in (typing.Union, types.UnionType) and value is not None:
        for option in typing.get_args(hint):
            if option is not type(None):
                yield from _rules(option, value, name)


def _broken_rules(config):
    broken = []
    for name, rule, value in _rules(Config, config):
        if isinstance(rule, Length):
            try:
                rule.check(value, name)
            except ConfigError as error:
                broken.append(str(error))
        elif value not in rule:  # a Range, or a Literal's choices
            broken.append(f"{name}: {value!r} is not {rule}")
    return broken


def test_every_default_satisfies_its_fields_rules():
    config = Config()
    kinds = {type(rule) for _, rule, _ in _rules(Config, config)}
    assert kinds == {Range, Length, tuple}  # the walk reaches every kind of rule
    assert _broken_rules(config) == []
    config.ema.max_decay, config.old_policy.schedule, config.rewards[0].name = 1.5, 3, ""
    assert len(_broken_rules(config)) == 3  # and it would see a default that breaks one


def test_an_optional_literal_takes_none_or_a_choice():
    from fastnft.config import _convert

    annotation = typing.Literal["a", "b"] | None
    assert _convert(None, annotation, "x") is None and _convert("b", annotation, "x") == "b"
    with pytest.raises(ConfigError, match=re.escape("x: must be one of a, b; got 'c'")):
        _convert("c", annotation, "x")


def test_recipe_rule_counts_processes():
    config = Config()  # 48 x 24 = 1152 images, micro-batch 9: 128 micro-batches
    check_recipe(config, 1)
    check_recipe(config, 2)
    with pytest.raises(ConfigError, match=r"rollout.groups \* rollout.group_size: 1152 images .* 5 processes"):
        check_recipe(config, 5)


def test_model_kind_auto_takes_the_presets_family_and_the_grid_its_default_shift(prompt_file):
    from fastnft.models import PRESET_KINDS, adapter_class, resolve_kind
    from fastnft.models.presets import PRESETS
    from fastnft.sampling import timestep_grid

    assert PRESET_KINDS.keys() == PRESETS.keys()  # every preset names its family
    config = load_config(None, ["model.preset=tiny-sd3", f"prompts.train={prompt_file}"])
    assert config.model.kind == "auto" and resolve_kind(config.model) == "sd3"
    assert config.rollout.shift is None  # the family's: SD3's 3.0, the grid of docs/algorithm.md
    sd3 = adapter_class("sd3")
    grid = sd3.timestep_grid(object.__new__(sd3), 10, config.rollout.shift)  # the grid needs no weights
    assert torch.equal(grid, timestep_grid(10, 3.0))
    expected = [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
    assert torch.allclose(grid, torch.tensor(expected), atol=1e-4)


def test_model_kind_auto_needs_a_model_index(tmp_path, prompt_file):
    """A pixel-space shapes directory has no model_index.json: auto names the file, the explicit
    kind loads it."""
    shapes = ["model.path=pkg:fastnft/assets/shapes-base", f"prompts.train={prompt_file}"]
    with pytest.raises(ConfigError, match=r"model\.path: .*shapes-base/model_index\.json not found .* sd3-pixel"):
        check_model_rules(load_config(None, shapes))
    explicit = load_config(None, [*shapes, "model.kind=sd3-pixel"])
    check_model_rules(explicit)
    assert explicit.model.kind == "sd3-pixel"
