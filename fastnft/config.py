"""The configuration: one typed dataclass tree, loaded from YAML plus dotted `key=value` overrides
and validated before anything is loaded. Defaults are the reference recipe (docs/config.md).

The rules of a single field live on the field itself, so each is written once: its allowed values
as `Literal[...]`, its bounds as `Annotated[..., Range(...)]`; the converter checks both (and that
every float is finite). `validate` keeps the rules that span fields or look at the filesystem.

Every error is a ConfigError whose message names the field (`nft.beta`), so the CLI can print
one line and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


# ---------------------------------------------------------------- rules written on the fields


@dataclass(frozen=True)
class Range:
    """Where a number may lie (None: no limit on that side), written on the field as
    `Annotated[float, Range(...)]` so that the bound sits next to what it bounds; `note` says why."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"

    def check(self, value: float, path: str) -> None:
        if value not in self:
            note = f" ({self.note})" if self.note else ""
            raise ConfigError(f"{path}: must be {self}{note}; got {value!r}")


@dataclass(frozen=True)
class Length:
    """How many items a list (or characters a string) must hold: `exactly` that many, or (None)
    at least one."""

    exactly: int | None = None

    def check(self, value: typing.Sized, path: str) -> None:
        if self.exactly is None and not value:
            raise ConfigError(f"{path}: must not be empty")
        if self.exactly is not None and len(value) != self.exactly:
            raise ConfigError(f"{path}: must hold exactly {self.exactly} items; got {value!r}")


Positive = Annotated[int, Range(0, low_open=True)]
NonNegative = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Guidance = Annotated[float, Range(1, note="1 = no guidance")]
Sampler = Literal["dpm2m", "euler", "sde"]


@dataclass
class ModelConfig:
    # the model adapter; auto: a preset's family, else the pipeline class in model.path's model_index.json
    # (sd3-pixel, pixel space with one text encoder, has no index: name it)
    kind: Literal["auto", "sd3", "sd3-pixel", "flux", "qwen-image", "wan"] = "auto"
    path: str | None = None  # a local pipeline directory (model_index.json, transformer/, vae/, ...)
    component_paths: dict[str, str] = field(default_factory=dict)  # per-component overrides, e.g. {"vae": DIR}
    preset: str | None = None  # build random-init components from a named preset instead of loading
    resolution: Positive = 512
    # frames of each sample: None = the family's (1 for image families, which take nothing else;
    # Wan: 81, WanPipeline's num_frames); a video model needs (frames - 1) % its VAE's temporal stride == 0
    frames: Positive | None = None
    clip_max_length: Positive = 77
    t5_max_length: Positive = 128
    # FLUX.1-dev's guidance input (guidance-distilled; not classifier-free guidance, which is
    # rollout.guidance_scale): None = 3.5 when the transformer takes one
    guidance: NonNegativeFloat | None = None
    precision: Literal["bf16", "fp32", "reference"] = "bf16"  # frozen weights; reference: fp32 + fp16 autocast
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "flash-attn"] = "sdpa"
    init_lora: str | None = None  # warm start from a LoRA safetensors file (not a resume)
    text_encoding: Literal["per_image", "per_prompt", "cached"] = "per_prompt"  # per_image: the reference code's
    offload_text_encoders: bool = False  # with text_encoding cached: text encoders leave the GPU after caching
    vae_channels_last: bool = False  # the VAE in channels_last memory format
    # the frozen transformer's weights under LoRA: nf4 (bitsandbytes 4-bit, QLoRA-style), int8 or fp8
    # weight-only (torchao; fp8 needs a GPU); quantize_text: the text encoders likewise
    quantize: Literal["none", "nf4", "int8", "fp8"] = "none"
    quantize_text: Literal["none", "nf4", "int8", "fp8"] = "none"


@dataclass
class LoraConfig:
    enabled: bool = True  # false: full fine-tuning with frozen old (and reference) copies
    rank: Positive = 32
    alpha: Positive = 64
    init: Literal["gaussian", "default"] = "gaussian"  # default: peft's
    target_modules: list[str] = field(default_factory=list)  # empty: the model family's default targets


@dataclass
class PromptsConfig:
    train: str | None = None  # .txt (one prompt a line) or .jsonl ({"prompt": ..., "metadata": {...}})
    eval: str | None = None


@dataclass
class RolloutConfig:
    groups: Positive = 48  # prompts per iteration
    group_size: Annotated[int, Range(2, note="advantages compare within a group")] = 24  # images per prompt (K)
    batch_size: Positive = 24  # images per sampler call
    sampler: Sampler = "dpm2m"
    steps: Positive = 10
    shift: PositiveFloat | None = None  # the grid's static shift (eval's too); None: the model family's (SD3: 3.0)
    sde_noise_level: NonNegativeFloat = 0.7
    guidance_scale: Guidance = 1.0  # guidance only ever applies to rollouts and eval
    overlap_reward: bool = False  # decode and score each batch on a worker while the next one samples
    cuda_graphs: bool = False  # GPU: the sampler's transformer forwards replayed as CUDA graphs


@dataclass
class NFTConfig:
    beta: PositiveFloat = 1.0
    kl_coef: NonNegativeFloat = 1e-4
    # adaptive KL (fastnft's addition, docs/algorithm.md): after each iteration kl_coef is scaled to hold the
    # mean KL term near this budget; None: kl_coef stays fixed (the reference's behaviour)
    kl_target: PositiveFloat | None = None
    adv_clip_max: PositiveFloat = 5.0
    loss_space: Literal["x0", "velocity"] = "x0"  # x0: the reference code's; velocity: the paper's
    eps: PositiveFloat = 1e-5
    # train on int(fraction * steps) grid timesteps per image
    timestep_fraction: Annotated[float, Range(0, 1, low_open=True)] = 0.99
    micro_batch_size: Positive = 9  # per device; the recipe above is global
    std_scope: Literal["global", "group"] = "global"  # the std that normalises advantages
    batch_old_ref: bool = False  # LoRA: the no-grad old and reference forwards as one call of 2n rows
    # the kernel (fastnft_kernels.nft_loss) backend; reference: the torch path with fp64 weights
    loss_backend: Literal["auto", "triton", "torch", "reference"] = "auto"


@dataclass
class OldPolicyConfig:
    # 0: eta = 0; 1: min(eta_rate i, eta_max); 2: 0 for i < 75, then min(0.0075 (i - 75), 0.999)
    schedule: Literal[0, 1, 2] = 1
    eta_rate: NonNegativeFloat = 0.001  # schedule 1: eta's growth per optimizer step
    eta_max: Annotated[float, Range(0, 1, high_open=True)] = 0.5  # schedule 1: eta's ceiling


@dataclass
class EMAConfig:
    enabled: bool = True
    max_decay: Annotated[float, Range(0, 1)] = 0.9  # decay min((1 + i) / (10 + i), max_decay)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit-bnb", "adamw8bit-torchao"] = "adamw"
    lr: NonNegativeFloat = 3e-4  # 0 is a legitimate control run
    betas: Annotated[list[Annotated[float, Range(0, 1, high_open=True)]], Length(2)] = field(
        default_factory=lambda: [0.9, 0.999]
    )
    weight_decay: NonNegativeFloat = 1e-4
    eps: PositiveFloat = 1e-8
    grad_clip: NonNegativeFloat = 1.0  # 0: no clipping
    steps_per_iteration: Positive = 1
    # the learning rate over the run (fastnft's addition): constant (the reference's), or cosine from lr
    # at the first iteration down to lr_final_fraction * lr at the run's last iteration
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_final_fraction: Annotated[float, Range(0, 1)] = 0.1
    bf16_stochastic_round: bool = False  # full fine-tuning: bf16 trained weights, updates rounded stochastically
    fused: bool = False  # torch AdamW's fused implementation (adamw only)
    # optimizer steps in a row with a non-finite loss or grad norm (each one skipped) that stop the run
    max_skipped_steps: Positive = 3


@dataclass
class RewardConfig:
    name: Annotated[str, Length()] = "jpeg_incompressibility"
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    # video models: score this many evenly spaced frames of each video and average; None: every frame
    frames: Positive | None = None


@dataclass
class EvalConfig:
    every: NonNegative = 10  # iterations; 0 disables
    at_start: bool = False
    sampler: Sampler = "euler"
    steps: Positive = 40
    guidance_scale: Guidance = 1.0
    images_per_prompt: Positive = 1
    batch_size: Positive = 16
    seed: int = 1234
    # base model with CFG, evaluated once at the start
    cfg_scales: list[Annotated[float, Range(1, low_open=True)]] = field(default_factory=list)
    # a key of the evaluation rows (e.g. eval_accuracy): export/best keeps the EMA weights of the
    # evaluation with its highest value; None: no best export
    select: str | None = None
    patience: NonNegative = 0  # with select: stop after this many evaluations without a new best; 0: never


@dataclass
class CheckpointConfig:
    every: NonNegative = 50  # iterations; a checkpoint is always written when a run stops
    keep_last: Positive = 2


@dataclass
class CompileConfig:
    enabled: bool = False  # regional torch.compile of the transformer blocks
    backend: str = "inductor"
    mode: str | None = None
    recompile_limit: Positive = 16  # dynamo's limit, raised to cover the roles (rollout, trained, ref, eval)


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, gloo on CPU
    strategy: Literal["ddp", "fsdp2"] = "ddp"  # fsdp2: every policy copy (LoRA: the base and adapters) sharded


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    sample_grid_every: NonNegative = 10  # iterations; 0 disables


@dataclass
class Config:
    seed: int = 0
    iterations: Positive = 1000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    old_policy: OldPolicyConfig = field(default_factory=OldPolicyConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rewards: Annotated[list[RewardConfig], Length()] = field(default_factory=lambda: [RewardConfig()])
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------- building from plain data


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value: Any, annotation: Any, path: str) -> Any:
    """value (from YAML) as an instance of annotation, or a ConfigError naming path: the one place
    where a field's type, its Literal choices, its Annotated rules and float finiteness are checked."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        inner, *rules = typing.get_args(annotation)
        value = _convert(value, inner, path)
        for rule in rules:
            rule.check(value, path)
        return value
    if origin is Literal:
        choices = typing.get_args(annotation)
        for choice in choices:  # type too: True must not pass for 1, nor 1.0 for 1
            if value == choice and type(value) is type(choice):
                return choice
        raise ConfigError(f"{path}: must be one of {', '.join(map(str, choices))}; got {value!r}")
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
        key_type, value_type = typing.get_args(annotation)  # each entry checked: a path must be a str
        return {_convert(k, key_type, path): _convert(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is float:
        return _finite(value, path)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {_type_name(annotation)}, got {value!r}")
    return value


def _finite(value: Any, path: str) -> float:
    """A float field's value as a finite float: .inf or .nan would pass most bounds unnoticed
    (nan compares false both ways) and poison the run many steps later."""
    number = value
    if isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"{path}: expected float, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{path}: must be a finite number; got {number!r}")
    return float(number)


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
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
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"config: {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
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


def check_recipe(config: Config, world_size: int) -> None:
    """The one divisibility rule of the global recipe on `world_size` processes: an iteration's
    rollout.groups x rollout.group_size images run in whole sampler batches and split into
    optim.steps_per_iteration x world_size equal shares of whole micro-batches
    (fastnft.distributed.image_shard), so every optimizer step trains on the same images whatever
    the number of processes. The single-process parts are checked first to name their own field."""
    images = config.rollout.groups * config.rollout.group_size
    micro_batch, steps = config.nft.micro_batch_size, config.optim.steps_per_iteration
    divide_images = f"must divide rollout.groups * rollout.group_size = {images}"
    _require(images % config.rollout.batch_size == 0, "rollout.batch_size", divide_images)
    _require(images % micro_batch == 0, "nft.micro_batch_size", divide_images)
    _require(
        (images // micro_batch) % steps == 0,
        "optim.steps_per_iteration",
        f"must divide the {images // micro_batch} micro-batches of an iteration",
    )
    _require(
        images % (steps * world_size * micro_batch) == 0,
        "rollout.groups * rollout.group_size",
        f"{images} images per iteration do not split into optim.steps_per_iteration ({steps}) x "
        f"{world_size} processes x nft.micro_batch_size ({micro_batch})",
    )


def _check_prompt_file(path: Path, field_name: str) -> None:
    """Parses the prompt file now, so that a bad line stops the run before anything loads."""
    from fastnft.prompts import PromptFileError, read_prompt_file

    try:
        read_prompt_file(path)
    except PromptFileError as error:
        raise ConfigError(f"{field_name}: {error}") from None


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a safetensors file, or None. Reads the header only: 8 bytes of little-endian
    length, then that many bytes of a JSON object (safetensors caps it at 100 MB)."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return "shorter than a header"
        length = int.from_bytes(prefix, "little")
        if length > min(path.stat().st_size - 8, 100_000_000):
            return f"its header length ({length} bytes) does not fit the file"
        try:
            header = json.loads(handle.read(length))
        except ValueError:  # not UTF-8 or not JSON
            return "its header is not JSON"
    return None if isinstance(header, dict) else "its header is not a JSON object"


def validate(config: Config, base: Path) -> None:
    """Raises ConfigError naming the first impossible field; relative paths are tried against base.
    The rules of single fields were checked as the config was built (_convert); these span fields
    or look at the filesystem."""
    _require(
        int(config.nft.timestep_fraction * config.rollout.steps) >= 1,
        "nft.timestep_fraction",
        f"int({config.nft.timestep_fraction} * rollout.steps) trains on no timestep",
    )
    check_recipe(config, world_size=1)
    if config.eval.select is not None:
        _require(bool(config.eval.select), "eval.select", "name a key of the evaluation rows, e.g. eval_accuracy")
        _require(config.prompts.eval is not None, "eval.select", "needs prompts.eval (held-out prompts to evaluate)")
        _require(config.eval.every > 0, "eval.select", "needs eval.every > 0 (evaluations to select from)")
    _require(config.eval.patience == 0 or config.eval.select is not None, "eval.patience", "needs eval.select")
    _require(
        config.model.path is not None or config.model.preset is not None,
        "model.path",
        "set a local pipeline directory (or model.preset for random-init components)",
    )
    if config.model.path is not None:
        path = resolve_path(config.model.path, base)
        _require(path.is_dir(), "model.path", f"no such directory {path}")
        _require(any(path.iterdir()), "model.path", f"{path} is empty")
    for component, value in config.model.component_paths.items():
        path = resolve_path(value, base)
        _require(path.is_dir(), f"model.component_paths.{component}", f"no such directory {path}")
        _require(any(path.iterdir()), f"model.component_paths.{component}", f"{path} is empty")
    if config.model.init_lora is not None:
        path = resolve_path(config.model.init_lora, base)
        _require(path.is_file(), "model.init_lora", f"no such file {path}")
        problem = _safetensors_problem(path)
        _require(problem is None, "model.init_lora", f"{path} is not a safetensors file: {problem}")
    _require(config.prompts.train is not None, "prompts.train", "set a .txt or .jsonl prompt file")
    for name, value in (("prompts.train", config.prompts.train), ("prompts.eval", config.prompts.eval)):
        if value is not None:
            path = resolve_path(value, base)
            _require(path.suffix in (".txt", ".jsonl"), name, f"must be a .txt or .jsonl file; got {path.name}")
            _require(path.is_file(), name, f"no such file {path}")
            _check_prompt_file(path, name)
    _require(
        config.nft.kl_target is None or config.nft.kl_coef > 0,
        "nft.kl_target",
        "needs nft.kl_coef > 0 (the coefficient it starts from and adapts)",
    )
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
        not config.rollout.cuda_graphs or config.dist.strategy != "fsdp2",
        "rollout.cuda_graphs",
        "cannot capture FSDP2's all-gathers: use dist.strategy ddp or turn the graphs off",
    )
    if config.compile.backend != "inductor":  # importing dynamo takes seconds: only for another backend
        import torch._dynamo

        known = torch._dynamo.list_backends()
        _require(
            config.compile.backend in torch._dynamo.list_backends(exclude_tags=()),
            "compile.backend",
            f"unknown backend {config.compile.backend!r}; known: {', '.join(known)}",
        )
    _require(not config.optim.fused or config.optim.name == "adamw", "optim.fused", "applies to optim.name adamw only")
    _require(
        not config.optim.bf16_stochastic_round or config.optim.name == "adamw8bit-torchao",
        "optim.bf16_stochastic_round",
        "needs optim.name = adamw8bit-torchao",
    )
    _require(
        not config.optim.bf16_stochastic_round or not config.lora.enabled,
        "optim.bf16_stochastic_round",
        "trains bf16 weights, which full fine-tuning has (lora.enabled: false); LoRA adapters train in fp32",
    )
    _check_quantization(config)


# why each method's weights cannot be sharded by FSDP2's fully_shard (checked on 2 gloo ranks)
FSDP2_REFUSALS = {
    "nf4": "bitsandbytes' 4-bit weights do not survive FSDP2 sharding",
    "int8": "torchao's int8 weight tensors do not survive FSDP2 sharding (no aten.split)",
    "fp8": "torchao's float8 weight tensors do not survive FSDP2 sharding (no aten.new_zeros)",
}


def _check_quantization(config: Config) -> None:
    """model.quantize and model.quantize_text: a frozen base under LoRA, replicated (not FSDP2),
    with its package installed, fp8 on a GPU only."""
    import importlib.util

    import torch

    from fastnft.quantize import PACKAGES

    method = config.model.quantize
    if method != "none":
        _require(
            config.lora.enabled,
            "model.quantize",
            f"{method} quantization needs LoRA (lora.enabled: true): full fine-tuning trains the weights",
        )
        _require(
            config.dist.strategy != "fsdp2",
            "model.quantize",
            f"{method} with dist.strategy fsdp2: {FSDP2_REFUSALS[method]}; use dist.strategy ddp",
        )
    for name, chosen in (("model.quantize", method), ("model.quantize_text", config.model.quantize_text)):
        if chosen == "none":
            continue
        package = PACKAGES[chosen]
        _require(importlib.util.find_spec(package) is not None, name, f"{chosen} needs {package}, not installed")
        _require(
            chosen != "fp8" or (config.device != "cpu" and torch.cuda.is_available()),
            name,
            "fp8 (torchao float8 weight-only) needs a CUDA device; use nf4 or int8 on a CPU",
        )
