"""The configuration: one typed dataclass tree, loaded from YAML plus dotted `key=value` overrides
and validated before anything is loaded. Defaults are the reference recipe (docs/config.md).

Every error is a ConfigError whose message names the field (`nft.beta`), so the CLI can print
one line and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


# The default LoRA targets of the SD3 family: its eight joint-attention projections.
JOINT_ATTENTION_PROJECTIONS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


@dataclass
class ModelConfig:
    kind: str = "sd3"  # the model adapter: sd3 (latent, CLIP-L + CLIP-G + T5) or sd3-pixel (one encoder)
    path: str | None = None  # a local pipeline directory (model_index.json, transformer/, vae/, ...)
    component_paths: dict[str, str] = field(default_factory=dict)  # per-component overrides, e.g. {"vae": DIR}
    preset: str | None = None  # build random-init components from a named preset instead of loading
    resolution: int = 512
    clip_max_length: int = 77
    t5_max_length: int = 128
    precision: str = "bf16"  # frozen weights: bf16 | fp32 | reference (fp32, + fp16 autocast on GPU)
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa | sdpa-cudnn | sdpa-flash | sdpa-efficient | sdpa-math | flash-attn
    init_lora: str | None = None  # warm start from a LoRA safetensors file (not a resume)
    text_encoding: str = "per_prompt"  # per_image (reference code) | per_prompt (once per iteration) | cached
    offload_text_encoders: bool = False  # with text_encoding cached: text encoders leave the GPU after caching
    vae_channels_last: bool = False  # the VAE in channels_last memory format


@dataclass
class LoraConfig:
    enabled: bool = True  # false: full fine-tuning with frozen old (and reference) copies
    rank: int = 32
    alpha: int = 64
    init: str = "gaussian"
    target_modules: list[str] = field(default_factory=list)  # empty: the model family's default targets


@dataclass
class PromptsConfig:
    train: str | None = None  # .txt (one prompt a line) or .jsonl ({"prompt": ..., "metadata": {...}})
    eval: str | None = None


@dataclass
class RolloutConfig:
    groups: int = 48  # prompts per iteration
    group_size: int = 24  # images per prompt (K)
    batch_size: int = 24  # images per sampler call
    sampler: str = "dpm2m"  # dpm2m | euler | sde
    steps: int = 10
    shift: float = 3.0
    sde_noise_level: float = 0.7
    guidance_scale: float = 1.0  # 1.0 = CFG-free; guidance only ever applies to rollouts and eval
    overlap_reward: bool = False  # decode and score each batch on a worker while the next one samples
    cuda_graphs: bool = False  # GPU: the sampler's transformer forwards replayed as CUDA graphs


@dataclass
class NFTConfig:
    beta: float = 1.0
    kl_coef: float = 1e-4
    adv_clip_max: float = 5.0
    loss_space: str = "x0"  # x0 (reference code) | velocity (paper)
    eps: float = 1e-5
    timestep_fraction: float = 0.99  # train on int(fraction * steps) grid timesteps per image
    micro_batch_size: int = 9  # per device; the recipe above is global
    std_scope: str = "global"  # global | group: the std that normalises advantages
    batch_old_ref: bool = False  # LoRA: the no-grad old and reference forwards as one call of 2n rows
    loss_backend: str = "auto"  # auto | triton | torch (fastnft_kernels.nft_loss) | reference (torch, fp64 weights)


@dataclass
class OldPolicyConfig:
    schedule: int = 1  # 0: eta = 0; 1: min(eta_rate i, eta_max); 2: 0 for i < 75, then min(0.0075 (i - 75), 0.999)
    eta_rate: float = 0.001  # schedule 1: eta's growth per optimizer step
    eta_max: float = 0.5  # schedule 1: eta's ceiling


@dataclass
class EMAConfig:
    enabled: bool = True
    max_decay: float = 0.9  # decay min((1 + i) / (10 + i), max_decay)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit-bnb | adamw8bit-torchao
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    grad_clip: float = 1.0
    steps_per_iteration: int = 1
    bf16_stochastic_round: bool = False  # torchao only
    fused: bool = False  # torch AdamW's fused implementation (adamw only)


@dataclass
class RewardConfig:
    name: str = "jpeg_incompressibility"
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    every: int = 10  # iterations; 0 disables
    at_start: bool = False
    sampler: str = "euler"
    steps: int = 40
    guidance_scale: float = 1.0
    images_per_prompt: int = 1
    batch_size: int = 16
    seed: int = 1234
    cfg_scales: list[float] = field(default_factory=list)  # base model with CFG, evaluated once at the start


@dataclass
class CheckpointConfig:
    every: int = 50  # iterations; a checkpoint is always written when a run stops
    keep_last: int = 2


@dataclass
class CompileConfig:
    enabled: bool = False  # regional torch.compile of the transformer blocks
    backend: str = "inductor"
    mode: str | None = None
    recompile_limit: int = 16  # dynamo's limit, raised to cover the roles (rollout, trained, ref, eval)


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    strategy: str = "ddp"  # ddp | fsdp2 (full fine-tuning)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    sample_grid_every: int = 10  # iterations; 0 disables


@dataclass
class Config:
    seed: int = 0
    iterations: int = 1000
    device: str = "auto"  # auto | cpu | cuda
    deterministic: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    old_policy: OldPolicyConfig = field(default_factory=OldPolicyConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------- building from plain data


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value: Any, annotation: Any, path: str) -> Any:
    """value (from YAML) as an instance of annotation, or a ConfigError naming path."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(annotation, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {_type_name(annotation)}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{'.' if prefix else ''}{key}: unknown key (known: {', '.join(sorted(known))})")
    values = {key: _convert(value, hints[key], f"{prefix}{'.' if prefix else ''}{key}") for key, value in data.items()}
    return cls(**values)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[: depth + 1])}: cannot override inside a non-mapping value")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'nft.beta=0.1' -> ('nft.beta', 0.1); the value is read as YAML."""
    key, separator, raw = text.partition("=")
    if not separator or not key:
        raise ConfigError(f"{text}: overrides are written key=value, e.g. nft.beta=0.1")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {error}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config: {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The Config from a YAML file (or the defaults) plus key=value overrides, validated."""
    data = read_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    config = _build(Config, data)
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    validate(config, base)
    _make_paths_absolute(config, base)
    return config


def _make_paths_absolute(config: Config, base: Path) -> None:
    """So that the resolved config (saved with every run) works from any directory."""

    def absolute(value: str | None) -> str | None:
        return None if value is None else str(resolve_path(value, base).resolve())

    config.model.path = absolute(config.model.path)
    config.model.init_lora = absolute(config.model.init_lora)
    config.model.component_paths = {k: absolute(v) for k, v in config.model.component_paths.items()}
    config.prompts.train = absolute(config.prompts.train)
    config.prompts.eval = absolute(config.prompts.eval)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ---------------------------------------------------------------- validation


CHOICES = {
    "model.kind": ("sd3", "sd3-pixel"),
    "model.precision": ("bf16", "fp32", "reference"),
    "model.text_encoding": ("per_image", "per_prompt", "cached"),
    "model.attention": ("sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "flash-attn"),
    "lora.init": ("gaussian", "default"),
    "rollout.sampler": ("dpm2m", "euler", "sde"),
    "eval.sampler": ("dpm2m", "euler", "sde"),
    "nft.loss_space": ("x0", "velocity"),
    "nft.std_scope": ("global", "group"),
    "nft.loss_backend": ("auto", "triton", "torch", "reference"),
    "old_policy.schedule": (0, 1, 2),
    "optim.name": ("adamw", "adamw8bit-bnb", "adamw8bit-torchao"),
    "device": ("auto", "cpu", "cuda"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "dist.strategy": ("ddp", "fsdp2"),
}


def _get(config: Config, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


PACKAGE_PREFIX = "pkg:"


def resolve_path(value: str, base: Path) -> Path:
    """A config path: `pkg:fastnft/assets/...` (inside the installed package), absolute, or
    relative to the working directory, else to the config file."""
    if value.startswith(PACKAGE_PREFIX):
        from importlib.resources import files

        package, _, inner = value.removeprefix(PACKAGE_PREFIX).partition("/")
        return Path(str(files(package) / inner))
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return base / path


def validate(config: Config, base: Path) -> None:
    """Raises ConfigError naming the first impossible field; relative paths are tried against base."""
    for name, allowed in CHOICES.items():
        value = _get(config, name)
        _require(value in allowed, name, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")
    positive = [
        "iterations",
        "model.resolution",
        "model.clip_max_length",
        "model.t5_max_length",
        "lora.rank",
        "lora.alpha",
        "rollout.groups",
        "rollout.batch_size",
        "rollout.steps",
        "rollout.shift",
        "nft.beta",
        "nft.adv_clip_max",
        "nft.eps",
        "nft.micro_batch_size",
        "optim.steps_per_iteration",
        "eval.steps",
        "eval.batch_size",
        "eval.images_per_prompt",
        "checkpoint.keep_last",
        "compile.recompile_limit",
    ]
    for name in positive:
        _require(_get(config, name) > 0, name, f"must be > 0; got {_get(config, name)!r}")
    for name in [
        "nft.kl_coef",
        "optim.lr",  # 0 is a legitimate control run
        "optim.weight_decay",
        "optim.grad_clip",
        "eval.every",
        "checkpoint.every",
        "rollout.sde_noise_level",
        "logging.sample_grid_every",
        "old_policy.eta_rate",
    ]:
        _require(_get(config, name) >= 0, name, f"must be >= 0; got {_get(config, name)!r}")
    _require(
        0 <= config.old_policy.eta_max < 1,
        "old_policy.eta_max",
        f"must be in [0, 1); got {config.old_policy.eta_max!r}",
    )
    _require(config.rollout.group_size >= 2, "rollout.group_size", "must be >= 2 (advantages compare within a group)")
    _require(0 < config.nft.timestep_fraction <= 1, "nft.timestep_fraction", "must be in (0, 1]")
    _require(
        int(config.nft.timestep_fraction * config.rollout.steps) >= 1,
        "nft.timestep_fraction",
        f"int({config.nft.timestep_fraction} * rollout.steps) trains on no timestep",
    )
    _require(config.rollout.guidance_scale >= 1, "rollout.guidance_scale", "must be >= 1 (1 = no guidance)")
    _require(config.eval.guidance_scale >= 1, "eval.guidance_scale", "must be >= 1 (1 = no guidance)")
    _require(all(s > 1 for s in config.eval.cfg_scales), "eval.cfg_scales", "every scale must be > 1")
    _require(len(config.optim.betas) == 2, "optim.betas", "must be two numbers")
    _require(config.optim.eps > 0, "optim.eps", "must be > 0")
    images = config.rollout.groups * config.rollout.group_size
    _require(
        images % config.nft.micro_batch_size == 0,
        "nft.micro_batch_size",
        f"must divide rollout.groups * rollout.group_size = {images}",
    )
    _require(
        images % config.rollout.batch_size == 0,
        "rollout.batch_size",
        f"must divide rollout.groups * rollout.group_size = {images}",
    )
    _require(
        (images // config.nft.micro_batch_size) % config.optim.steps_per_iteration == 0,
        "optim.steps_per_iteration",
        f"must divide the {images // config.nft.micro_batch_size} micro-batches of an iteration",
    )
    _require(bool(config.rewards), "rewards", "name at least one reward")
    for index, reward in enumerate(config.rewards):
        _require(bool(reward.name), f"rewards[{index}].name", "must not be empty")
    _require(
        config.model.path is not None or config.model.preset is not None,
        "model.path",
        "set a local pipeline directory (or model.preset for random-init components)",
    )
    if config.model.path is not None:
        path = resolve_path(config.model.path, base)
        _require(path.is_dir(), "model.path", f"no such directory {path}")
    for component, value in config.model.component_paths.items():
        path = resolve_path(value, base)
        _require(path.is_dir(), f"model.component_paths.{component}", f"no such directory {path}")
    if config.model.init_lora is not None:
        path = resolve_path(config.model.init_lora, base)
        _require(path.is_file(), "model.init_lora", f"no such file {path}")
    _require(config.prompts.train is not None, "prompts.train", "set a .txt or .jsonl prompt file")
    for name in ("prompts.train", "prompts.eval"):
        value = _get(config, name)
        if value is not None:
            path = resolve_path(value, base)
            _require(path.suffix in (".txt", ".jsonl"), name, f"must be a .txt or .jsonl file; got {path.name}")
            _require(path.is_file(), name, f"no such file {path}")
    _require(
        config.optim.name != "adamw8bit-bnb" or config.dist.strategy != "fsdp2",
        "optim.name",
        "bitsandbytes' 8-bit AdamW rejects FSDP2-sharded (DTensor) parameters: use adamw8bit-torchao",
    )
    _require(
        config.model.text_encoding == "cached" or not config.model.offload_text_encoders,
        "model.offload_text_encoders",
        "needs model.text_encoding: cached (the encoders are offloaded once every prompt is cached)",
    )
    _require(
        config.lora.enabled or not config.nft.batch_old_ref,
        "nft.batch_old_ref",
        "needs LoRA (lora.enabled: true): full fine-tuning keeps the old and reference policies in separate copies",
    )
    _require(
        config.dist.strategy != "fsdp2" or not config.lora.enabled,
        "dist.strategy",
        "fsdp2 shards full fine-tuning (lora.enabled: false); LoRA trains with ddp",
    )
    _require(
        not config.rollout.cuda_graphs or config.dist.strategy != "fsdp2",
        "rollout.cuda_graphs",
        "cannot capture FSDP2's all-gathers: use dist.strategy ddp or turn the graphs off",
    )
    _require(not config.optim.fused or config.optim.name == "adamw", "optim.fused", "applies to optim.name adamw only")
    _require(
        not config.optim.bf16_stochastic_round or config.optim.name == "adamw8bit-torchao",
        "optim.bf16_stochastic_round",
        "needs optim.name = adamw8bit-torchao",
    )
