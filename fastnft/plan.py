"""`fastnft plan`: the memory a run needs on each process, estimated without allocating it
(docs/plan.md).

The run's own Trainer is built on the meta device (weights have shapes but no data) and one
steady-state iteration runs through its components: a warm-up optimizer step (so the optimizer
states exist, as in every iteration after the first), this rank's rollout with its decode, then
two training (micro-batch, timestep) pairs of one optimizer step (the second with the first's
gradients live) and the step with its EMA and old-policy updates. `LiveStorages`, a dispatch mode,
counts the bytes of every storage an op creates until it is freed; the peaks of the phases are
what the plan reports. What the meta run cannot show is added from the parameters' shapes:
FSDP2 shards and all-gathers, DDP's gradient buckets, quantized weights and 8-bit optimizer states.

Every figure is an estimate: fragmentation of the CUDA caching allocator, kernels' workspaces
(cuBLAS, cuDNN), NCCL buffers and the CUDA context are not counted.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from fastnft.config import Config, ConfigError, check_recipe
from fastnft.distributed import World
from fastnft.models.adapter import repeated_blocks

GIB = 2**30
META = torch.device("meta")
# 8-bit AdamW (bitsandbytes, torchao): per state one byte per value and an fp32 scale per block of
# 256 values; tensors under 4096 values keep fp32 states (both libraries' thresholds).
EIGHT_BIT_BLOCK = 256
EIGHT_BIT_MIN_SIZE = 4096


# ---------------------------------------------------------------- counting live storages


class LiveStorages(TorchDispatchMode):
    """Bytes of live tensor storages: each storage an op returns is counted once, from the op
    that creates it until the storage is freed (a finalizer); `peak` is the most ever live.
    Storages that exist before the mode starts are added with `add`."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, Tensor):
                self.add(value)
        return out

    def add(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[storage] = size
        weakref.finalize(storage, self._release, size)
        self.live += size
        self.peak = max(self.peak, self.live)

    def forget(self, tensor: Tensor) -> None:
        """Stops counting a storage that lives elsewhere in a real run (host memory)."""
        storage = tensor.untyped_storage()
        size = self._sizes.get(storage)
        if size:
            self._sizes[storage] = 0
            self.live -= size

    def _release(self, size: int) -> None:
        self.live -= size

    def start_phase(self) -> None:
        self.peak = self.live


def storage_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and aliases counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen.setdefault(id(storage), storage.nbytes())
    return sum(seen.values())


# ---------------------------------------------------------------- the meta run


def _flash_attention(original: Callable) -> Callable:
    """SDPA as a GPU runs it (flash, or memory-efficient with a mask): on the meta device
    PyTorch would pick the math kernel, which materialises every attention matrix."""

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta" or enable_gqa:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, return_debug_mask=False, scale=scale
            )[0]
        bias = attn_mask if attn_mask.dtype != torch.bool else torch.zeros_like(attn_mask, dtype=query.dtype)
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, True, dropout_p, is_causal, scale=scale
        )[0]

    return attention


def _meta_keyed_randn(shape, seed, iteration, indices, purpose, *extra, device="cpu", dtype=torch.float32) -> Tensor:
    """keyed_randn's shape and dtype on any device, no numbers (meta has no generator)."""
    return torch.empty((len(indices), *shape), device=device, dtype=dtype)


def _meta_diffusers_model(cls, path, *args, **kwargs):
    """A diffusers model from its config.json alone, on the meta device."""
    config = cls.load_config(path, subfolder=kwargs.get("subfolder"))
    with torch.device(META):
        model = cls.from_config(config)
    dtype = kwargs.get("torch_dtype")
    return (model.to(dtype) if dtype is not None else model).eval()


def _meta_transformers_model(cls, path, *args, **kwargs):
    """A transformers model from its config.json alone, on the meta device."""
    config = kwargs.get("config") or cls.config_class.from_pretrained(path, subfolder=kwargs.get("subfolder", ""))
    with torch.device(META):
        model = cls(config)
    dtype = kwargs.get("torch_dtype") or kwargs.get("dtype")
    return (model.to(dtype) if isinstance(dtype, torch.dtype) else model).eval()


@contextlib.contextmanager
def _patched(target: object, name: str, value: object) -> Iterator[None]:
    """target.name = value for the length of the block; the original restored as it was stored
    (a classmethod as its descriptor, not bound to `target`)."""
    original = vars(target)[name]
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, original)


@contextlib.contextmanager
def meta_run(processes: int) -> Iterator[None]:
    """The trainer's module-level seams pointed at the meta device for the length of a plan:
    the device, the world (rank 0 of `processes`, its policies left undistributed: the plan adds
    sharding from the shapes), models built from their configs without reading weights, keyed
    noise without a generator, the text cache kept where it is encoded, and GPU attention."""
    import diffusers
    import transformers

    import fastnft.rollout
    import fastnft.text_cache
    import fastnft.trainer
    import fastnft.update

    build = fastnft.trainer.build_policy_model

    def undistributed(config, world, device):
        with torch.device(META):  # peft leaves adapters on the CPU beside a meta base layer
            return build(config, World(), device)

    def keep_in_place(self, table) -> None:
        self.table = table

    seams = [
        (fastnft.trainer, "resolve_device", lambda *args, **kwargs: META),
        (fastnft.trainer, "init_world", lambda config: World(0, processes)),
        (fastnft.trainer, "build_policy_model", undistributed),
        (fastnft.trainer, "build_optimizer", _plain_adamw),
        (fastnft.rollout, "keyed_randn", _meta_keyed_randn),
        (fastnft.update, "keyed_randn", _meta_keyed_randn),
        (fastnft.text_cache.PromptEmbeddings, "_keep", keep_in_place),
        (
            torch.nn.functional,
            "scaled_dot_product_attention",
            _flash_attention(torch.nn.functional.scaled_dot_product_attention),
        ),
        (diffusers.ModelMixin, "from_pretrained", classmethod(_meta_diffusers_model)),
        (transformers.PreTrainedModel, "from_pretrained", classmethod(_meta_transformers_model)),
    ]
    with contextlib.ExitStack() as stack:
        for target, name, value in seams:
            stack.enter_context(_patched(target, name, value))
        yield


def _plain_adamw(config, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    """torch AdamW (foreach) in the meta run: 8-bit optimizers have no meta kernels, and their
    states are sized from the shapes instead (`optimizer_state_bytes`)."""
    options = dict(lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay, eps=config.eps)
    return torch.optim.AdamW(parameters, **options)


def trace_config(config: Config) -> Config:
    """The config the meta run builds: what only changes where weights live or how they are
    stored is planned from the shapes (quantization, text-encoder offload, the 8-bit optimizer
    names), what needs a GPU or a compiler is off (they change speed, not what is allocated,
    except that compilation may fuse away some activations)."""
    traced = copy.deepcopy(config)
    traced.device = "cpu"
    traced.deterministic = False
    traced.model.attention = "sdpa"
    traced.model.offload_text_encoders = False
    traced.model.quantize = traced.model.quantize_text = "none"
    traced.rollout.steps = min(traced.rollout.steps, 2)  # a multistep sampler's state, at its most
    traced.compile.enabled = False
    traced.rollout.cuda_graphs = False
    traced.rollout.overlap_reward = False
    traced.logging.progress = False
    traced.logging.tensorboard = False
    if traced.nft.loss_backend == "triton":
        traced.nft.loss_backend = "auto"
    return traced


# ---------------------------------------------------------------- one steady-state iteration


def steady_iteration(trainer: Any, on_phase: Callable[[str], None] = lambda name: None) -> None:
    """The phases the plan measures, through the trainer's own components, as an iteration after
    the first runs them: the optimizer states exist (a step on zero gradients makes them), this
    rank's conditioning and its other rollout batches' samples are live while one rollout batch
    samples (Rollout.sample) and decodes (the Scorer's decode: the rewards need real images),
    then one training pair (NFTUpdate.pair_loss) runs with the gradients of earlier pairs of its
    optimizer step live, and the step follows with its EMA and old-policy updates.
    `on_phase(name)` is called as "rollout", "decode" and "train" begin. The same function drives
    the real CPU runs the tests compare the plan with."""
    config = trainer.config
    _zero_gradients(trainer)
    _optimizer_step(trainer)
    batch = trainer.rollout.batch(0)
    size = min(config.rollout.batch_size, len(batch.mine))
    text = trainer.rollout.conditioning.for_images(batch.prompts, batch.my_groups)
    shape = trainer.update.sample_shape
    others = torch.zeros(len(batch.mine) - size, *shape, device=trainer.device)
    on_phase("rollout")
    first = trainer.rollout.sample(dataclasses.replace(batch, mine=batch.mine[:size]))
    x0 = torch.cat([first.x0, others])
    del first, others
    on_phase("decode")
    images = trainer.model.decode(x0[:size])
    del images
    on_phase("train")
    rows = torch.arange(config.nft.micro_batch_size, device=trainer.device)
    _zero_gradients(trainer)
    _pair(trainer, x0[rows], text.index(rows))
    _optimizer_step(trainer)
    trainer.policies.update_old_policy(0.5)


def _zero_gradients(trainer: Any) -> None:
    for parameter in trainer.policies.trained_parameters().values():
        parameter.grad = torch.zeros_like(parameter)


def _pair(trainer: Any, x0: Tensor, text: Any) -> None:
    """One (micro-batch, timestep) pair with its backward, gradients synchronised (the last pair
    of an optimizer step), as NFTUpdate runs it."""
    from fastnft.distributed import gradient_sync

    update = trainer.update
    grid = update.grid
    t = grid[torch.arange(len(x0)) % (len(grid) - 1)].to(trainer.device)
    r = torch.full((len(x0),), 0.5, device=trainer.device)
    noise = torch.zeros_like(x0)
    with gradient_sync(trainer.policies.grad_module, True):
        update.pair_loss(x0, noise, t, r, text).loss.backward()


def _optimizer_step(trainer: Any) -> None:
    """NFTUpdate.optimizer_step without its finiteness check (it reads numbers): clip, step,
    zero_grad, EMA."""
    policies, optimizer = trainer.policies, trainer.update.optimizer
    clip = trainer.config.optim.grad_clip
    torch.nn.utils.clip_grad_norm_(list(policies.trained_parameters().values()), clip if clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if trainer.config.ema.enabled:
        policies.update_ema(0.9)


# ---------------------------------------------------------------- what the trace found


@dataclass
class Shapes:
    """Tensors of one kind as (shape, bytes per value), enough to size them sharded."""

    entries: list[tuple[tuple[int, ...], int]] = field(default_factory=list)

    @classmethod
    def of(cls, tensors: list[Tensor]) -> Shapes:
        unique = {id(t.untyped_storage()): t for t in tensors}
        return cls([(tuple(t.shape), t.element_size()) for t in unique.values()])

    def bytes(self, processes: int = 1) -> int:
        """Per process, each tensor's dim 0 split into `processes` equal padded chunks (FSDP2)."""
        total = 0
        for shape, size in self.entries:
            if not shape:
                total += size
                continue
            rest = math.prod(shape[1:])
            total += math.ceil(shape[0] / processes) * rest * size
        return total

    def numel(self) -> int:
        return sum(math.prod(shape) for shape, _ in self.entries)


@dataclass
class Trace:
    """One traced steady-state iteration of rank 0 of `processes`, its policies undistributed."""

    phase_peaks: dict[str, int]  # rollout, decode, train: the most bytes live in each
    kinds: dict[str, Shapes]  # the resident state by kind (see `resident_state`)
    trained: Shapes  # the trained parameters (their gradients and optimizer states follow them)
    optimizer_bytes: int  # the traced AdamW's states
    cached_text: int  # the text cache (host memory on a GPU)
    largest_block: int  # bytes of the largest repeated block of the policy modules (compute dtype)
    root_bytes: int  # bytes outside the repeated blocks of one policy module (compute dtype)
    largest_trained_block: int  # values of the largest block's trained parameters
    quantization_savings: dict[str, dict[str, int]]  # "denoiser", "text" -> method -> bytes it saves
    images: int  # this rank's images
    image_bytes: int  # what each of them holds live from its rollout to its training (sample, text)


def resident_state(trainer: Any) -> dict[str, list[Tensor]]:
    """The tensors that stay on the device across iterations, by kind: `denoiser` the
    transformer (base and trained weights), `codec` the VAE, `text` the text encoders, `reward` the reward
    models, `old` and `ref` the old and reference policies' own copies (LoRA: the old adapter;
    the reference is the base itself), `ema` the EMA."""
    model, policies = trainer.model, trainer.policies
    old = list(policies.old_parameters().values())
    old_ids = {id(t) for t in old}
    denoiser = [t for t in _tensors(policies.transformer) if id(t) not in old_ids]
    frozen = model.frozen_modules()
    text_names = set(model.text_encoders()) & set(frozen)
    codec = [t for name, m in frozen.items() if name not in text_names for t in _tensors(m)]
    reference = getattr(policies, "reference", None)
    old_module = getattr(policies, "old", None)
    rewards = [t for reward, _ in trainer.rollout.scorer.rewards.rewards for t in _reward_tensors(reward)]
    return {  # frozen modules a preset does not have are None
        "denoiser": denoiser,
        "codec": codec,
        "text": [t for name in text_names for t in _tensors(frozen[name])],
        "reward": rewards,
        "old": _tensors(old_module) if isinstance(old_module, nn.Module) else old,
        "ref": _tensors(reference) if reference is not None else [],
        "ema": list(policies.ema.values()),
    }


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _reward_tensors(reward: object) -> list[Tensor]:
    return [t for value in vars(reward).values() if isinstance(value, nn.Module) for t in _tensors(value)]


def _block_sizes(trainer: Any, compute_dtype: torch.dtype) -> tuple[int, int, int]:
    """(largest block's bytes, bytes outside the blocks, largest block's trained values) over the
    policy modules, each value at the compute dtype FSDP2 all-gathers in."""
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    largest = root = trained = 0
    for module in trainer.policies.modules():
        blocks = repeated_blocks(module)
        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        root = max(root, sum(p.numel() for p in module.parameters() if id(p) not in in_blocks) * itemsize)
        for block in blocks:
            largest = max(largest, sum(p.numel() for p in block.parameters()) * itemsize)
            trained = max(trained, sum(p.numel() for p in block.parameters() if p.requires_grad))
    return largest, root, trained


def _quantization_savings(modules: list[nn.Module]) -> dict[str, int]:
    """Bytes each quantization method would save on the modules' linear layers (fastnft.quantize's
    selection rule and sizes): the plan sizes any model.quantize from one trace."""
    from fastnft.quantize import METHODS, quantized_linears, quantized_weight_bytes

    savings = dict.fromkeys(("none", *METHODS), 0)
    for module in modules:
        for _, linear in quantized_linears(module):
            weight = linear.weight
            for method in METHODS:
                savings[method] += weight.numel() * weight.element_size() - quantized_weight_bytes(linear, method)
    return savings


def trace(config: Config, processes: int, progress: Callable[[str], None] | None = None) -> Trace:
    """Builds the run's Trainer on the meta device as rank 0 of `processes` and traces one
    steady-state iteration (`steady_iteration`)."""
    from fastnft.policy import frozen_weight_dtype
    from fastnft.trainer import Trainer

    traced = trace_config(config)
    counter = LiveStorages()
    peaks: dict[str, int] = {}
    current: list[str] = []

    def on_phase(name: str) -> None:
        if current:
            peaks[current[-1]] = counter.peak
        current.append(name)
        counter.start_phase()

    with meta_run(processes), counter:
        if progress:
            progress("building the model on the meta device")
        trainer = Trainer(traced, progress=False)
        cache = trainer.rollout.conditioning.cache
        cached = storage_bytes([cache.table.sequence, cache.table.pooled]) if cache is not None else 0
        if cache is not None:  # host memory on a GPU: counted apart
            for tensor in (cache.table.sequence, cache.table.pooled):
                counter.forget(tensor)
        if progress:
            progress("tracing a rollout and a training step")
        steady_iteration(trainer, on_phase)
        peaks[current[-1]] = counter.peak
        state = trainer.update.optimizer.state
        optimizer_bytes = storage_bytes([v for s in state.values() for v in s.values() if v.device.type == "meta"])
        batch = trainer.rollout.batch(0)
        one = trainer.rollout.conditioning.for_images(batch.prompts, batch.my_groups[:1])
        text_row = storage_bytes([t for t in (one.sequence, one.pooled, one.mask) if t is not None])
    model = trainer.model
    encoders = [m for m in model.text_encoders().values() if m is not None]
    largest, root, trained_block = _block_sizes(trainer, frozen_weight_dtype(config))
    return Trace(
        phase_peaks=peaks,
        kinds={kind: Shapes.of(tensors) for kind, tensors in resident_state(trainer).items()},
        trained=Shapes.of(list(trainer.policies.trained_parameters().values())),
        optimizer_bytes=optimizer_bytes,
        cached_text=cached,
        largest_block=largest,
        root_bytes=root,
        largest_trained_block=trained_block,
        quantization_savings={
            "denoiser": _quantization_savings([model.transformer]),
            "text": _quantization_savings(encoders),
        },
        images=len(batch.mine),
        image_bytes=4 * math.prod(trainer.update.sample_shape) + text_row,
    )


# ---------------------------------------------------------------- the plan


def optimizer_state_bytes(name: str, trained: Shapes, processes: int) -> int:
    """AdamW's two states per trained value: fp32 (adamw), or 8-bit with a scale per block."""
    total = 0
    for shape, _ in trained.entries:
        values = Shapes([(shape, 1)]).bytes(processes)
        if name == "adamw" or math.prod(shape) < EIGHT_BIT_MIN_SIZE:
            total += 2 * 4 * values
        else:
            total += 2 * (values + 4 * math.ceil(values / EIGHT_BIT_BLOCK))
    return total


@dataclass
class MemoryPlan:
    """Per process, in bytes (`gib` converts); every figure an estimate."""

    processes: int
    strategy: str
    device: str
    parts: dict[str, int]  # resident state by kind, gradients, optimizer states, transients
    activations: dict[str, int]  # rollout, decode, train: the phase's peak above the resident state
    phase_peaks: dict[str, int]
    host: dict[str, int]  # host memory the plan knows of (the text cache on a GPU)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phase_peaks.values())

    def as_json(self) -> dict[str, Any]:
        figures = {f"{name}_gib": gib(value) for name, value in self.parts.items()}
        figures |= {f"{name}_activations_gib": gib(value) for name, value in self.activations.items()}
        figures |= {f"{name}_peak_gib": gib(value) for name, value in self.phase_peaks.items()}
        figures |= {f"host_{name}_gib": gib(value) for name, value in self.host.items()}
        return {
            "estimate": True,
            "processes": self.processes,
            "strategy": self.strategy,
            "device": self.device,
            "peak_gib": gib(self.peak),
            **figures,
            "notes": self.notes,
        }


def gib(value: int) -> float:
    return round(value / GIB, 4)


def assemble(config: Config, processes: int, traced: Trace) -> MemoryPlan:
    """The plan of `config` on `processes` processes from its trace: the traced peaks, with the
    resident state replaced by its size under the run's sharding, quantization, optimizer and
    text-encoder placement, plus FSDP2's all-gathers and DDP's gradient buckets."""
    fsdp = processes > 1 and config.dist.strategy == "fsdp2"
    gathered = 0
    shards = processes if fsdp else 1
    kinds = traced.kinds
    saving = {
        "denoiser": traced.quantization_savings["denoiser"][config.model.quantize],
        "text": traced.quantization_savings["text"][config.model.quantize_text],
    }
    device = "cpu" if config.device == "cpu" else "cuda"
    # under FSDP2 every policy copy is sharded; the VAE, text encoders and rewards are replicated
    sharded = {"old", "ref", "ema"}
    parts = {
        "weights": kinds["codec"].bytes() + (kinds["denoiser"].bytes() - saving["denoiser"]) // shards,
        "text": 0 if config.model.offload_text_encoders else kinds["text"].bytes() - saving["text"],
        "reward": kinds["reward"].bytes(),
        **{kind: kinds[kind].bytes(shards if kind in sharded else 1) for kind in ("old", "ref", "ema")},
        "gradients": traced.trained.bytes(shards),
        "optimizer": optimizer_state_bytes(config.optim.name, traced.trained, shards),
        "cached_text": traced.cached_text if device == "cpu" else 0,
    }
    if fsdp:
        # a block all-gathered and the next one prefetched, the root's own weights, and a
        # block's gradients reduce-scattered in fp32
        gathered = 2 * traced.largest_block + traced.root_bytes
        parts["fsdp_gather"] = gathered + 4 * traced.largest_trained_block
    elif processes > 1:
        parts["ddp_buckets"] = traced.trained.bytes()
    # FSDP2's gathered blocks exist only while a phase runs the transformer (not while the VAE
    # decodes); the reduce buffers only in training
    transient = {"rollout": gathered, "decode": 0, "train": parts.get("fsdp_gather", 0)}
    # a trace of another process count held another share of the images' samples and text
    images = config.rollout.groups * config.rollout.group_size // processes
    held = (images - traced.images) * traced.image_bytes
    traced_state = _traced_state(traced)
    resident = sum(v for k, v in parts.items() if k not in ("gradients", "fsdp_gather"))
    activations, peaks = {}, {}
    for phase, peak in traced.phase_peaks.items():
        gradients = traced.trained.bytes() if phase == "train" else 0
        activations[phase] = max(0, peak - traced_state - gradients + held)
        peaks[phase] = resident + activations[phase] + transient[phase]
        peaks[phase] += parts["gradients"] if phase == "train" else 0
    strategy = config.dist.strategy if processes > 1 else "single process"
    host = {"cached_text": traced.cached_text} if device == "cuda" else {}
    return MemoryPlan(processes, strategy, device, parts, activations, peaks, host, _notes(config))


def _traced_state(traced: Trace) -> int:
    """What was resident in the meta run, live through every phase."""
    kinds = traced.kinds
    return (
        sum(kinds[k].bytes() for k in ("denoiser", "codec", "text", "reward", "old", "ref", "ema"))
        + traced.optimizer_bytes
    )


def _notes(config: Config) -> list[str]:
    notes = []
    if config.model.precision == "reference":
        notes.append("model.precision reference: activations planned in fp32 (a GPU's fp16 autocast halves many)")
    if config.compile.enabled:
        notes.append("compile.enabled: planned eager (compiled blocks may keep fewer activations)")
    if any(_reward_tensors_possible(r.name) for r in config.rewards):
        notes.append("reward models: their weights are counted, their activations are not")
    return notes


def _reward_tensors_possible(name: str) -> bool:
    return name in ("pickscore", "clipscore", "hpsv2", "aesthetic", "imagenet_class")


# ---------------------------------------------------------------- planning, switches, output

TRACE_FIELDS = ("model.quantize", "model.quantize_text", "model.offload_text_encoders", "dist.strategy", "optim.name")


def _trace_key(config: Config) -> str:
    """What a trace depends on: the config without the fields `assemble` sizes from shapes."""
    plain = copy.deepcopy(config)
    for dotted in TRACE_FIELDS:
        _set(plain, dotted, None)
    return repr(plain)


def _set(config: Config, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    node = config
    for parent in parents:
        node = getattr(node, parent)
    setattr(node, name, value)


class Planner:
    """Plans configs, tracing each distinct one once (the switches that only change sizes reuse
    a trace); `progress` gets a line as a long trace begins."""

    def __init__(self, progress: Callable[[str], None] | None = None) -> None:
        self.progress = progress
        self._traces: dict[str, Trace] = {}

    def plan(self, config: Config, processes: int) -> MemoryPlan:
        key = _trace_key(config)
        if key not in self._traces:
            self._traces[key] = trace(config, processes, self.progress)
        return assemble(config, processes, self._traces[key])


@dataclass
class Switch:
    """A change that lowers the peak: config fields set, and the process count it runs on."""

    label: str
    fields: dict[str, Any]
    processes: int | None = None

    def overrides(self) -> list[str]:
        values = [f"{key}={json.dumps(value)}" for key, value in self.fields.items()]
        return values + ([f"--processes {self.processes}"] if self.processes else [])


def candidate_switches(config: Config, processes: int, plan: MemoryPlan) -> list[Switch]:
    """The switches that apply to this run and are not on yet, cheapest to try first: gradient
    checkpointing, nf4 weights under LoRA, text encoders offloaded after caching, FSDP2 over
    this or a larger process count that the recipe divides."""
    switches = []
    if not config.model.gradient_checkpointing:
        switches.append(Switch("gradient checkpointing", {"model.gradient_checkpointing": True}))
    if config.lora.enabled and config.model.quantize == "none":
        switches.append(Switch("nf4 base weights", {"model.quantize": "nf4"}))
    if plan.parts["text"] > 0:
        offload = {"model.text_encoding": "cached", "model.offload_text_encoders": True}
        switches.append(Switch("text encoders offloaded", offload))
    if config.optim.name != "adamw8bit-bnb":
        for count in sorted({processes, 2, 4, 8}):
            already = config.dist.strategy == "fsdp2" and count == processes
            if count >= max(processes, 2) and not already and _divides(config, count):
                switches.append(Switch(f"FSDP2 over {count} processes", {"dist.strategy": "fsdp2"}, count))
                break
    return switches


def _valid(config: Config, processes: int) -> bool:
    from fastnft.config import validate

    try:
        validate(config, Path.cwd())
        check_recipe(config, processes)
    except ConfigError:
        return False
    return True


def _divides(config: Config, processes: int) -> bool:
    try:
        check_recipe(config, processes)
    except ConfigError:
        return False
    return True


def apply_switches(config: Config, processes: int, switches: list[Switch]) -> tuple[Config, int]:
    changed = copy.deepcopy(config)
    for switch in switches:
        for dotted, value in switch.fields.items():
            _set(changed, dotted, value)
        processes = switch.processes or processes
    return changed, processes


def fitting_switches(
    planner: Planner, config: Config, processes: int, plan: MemoryPlan, budget: int
) -> tuple[dict[str, int], tuple[list[Switch], MemoryPlan] | None]:
    """Each candidate switch's peak alone, and the smallest set of switches (fewest, then in
    candidate order) whose re-planned peak fits `budget` bytes, or None."""
    candidates = candidate_switches(config, processes, plan)
    alone = {}
    candidates = [s for s in candidates if _valid(*apply_switches(config, processes, [s]))]
    for switch in candidates:
        alone[switch.label] = planner.plan(*apply_switches(config, processes, [switch])).peak
    for size in range(1, len(candidates) + 1):
        for chosen in itertools.combinations(candidates, size):
            changed, count = apply_switches(config, processes, list(chosen))
            if not _valid(changed, count):  # a combination the config refuses (nf4 under FSDP2)
                continue
            replanned = planner.plan(changed, count)
            if replanned.peak <= budget:
                return alone, (list(chosen), replanned)
    return alone, None


ROWS = [
    ("weights", "weights: denoiser + VAE (after sharding, quantization)"),
    ("text", "text encoders"),
    ("reward", "reward models (weights only)"),
    ("old", "old policy copy (LoRA: its adapter)"),
    ("ref", "reference copy (LoRA: none)"),
    ("ema", "EMA (fp32)"),
    ("gradients", "gradients (training phase)"),
    ("optimizer", "optimizer states"),
    ("cached_text", "cached text"),
    ("fsdp_gather", "FSDP2 all-gathered blocks, reduce buffers"),
    ("ddp_buckets", "DDP gradient buckets"),
]


def table(plan: MemoryPlan, title: str) -> str:
    """The plan as a readable table, every figure marked as an estimate."""
    lines = [
        f"fastnft plan: {title}, {plan.processes} process(es), {plan.strategy}, on {plan.device}",
        "ESTIMATES per process in GiB (2^30 bytes), traced on the meta device; the CUDA context, allocator",
        "fragmentation and kernel workspaces are not counted.",
        "",
    ]
    shown = [(key, label) for key, label in ROWS if plan.parts.get(key) or key in ("weights", "gradients", "optimizer")]
    lines += [f"  {label:<54} {gib(plan.parts[key]):>9.3f}" for key, label in shown]
    for phase, peak in plan.phase_peaks.items():
        activations = gib(plan.activations[phase])
        lines.append(f"  {phase + ' activations':<54} {activations:>9.3f}   phase peak {gib(peak):.3f}")
    for name, value in plan.host.items():
        if value:
            lines.append(f"  {'host memory, not in the peak: ' + name.replace('_', ' '):<54} {gib(value):>9.3f}")
    phase = max(plan.phase_peaks, key=plan.phase_peaks.get)
    lines += ["", f"  {'PEAK (estimate)':<54} {gib(plan.peak):>9.3f}   in the {phase} phase"]
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)


def resolve_source(name: str) -> Path:
    """A config file, or a bench preset's name (configs/NAME.yaml)."""
    from fastnft.bench.switches import preset_path

    path = Path(name)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or "/" in name:
        raise ConfigError(f"CONFIG_OR_PRESET: no such config file {name}")
    try:
        return preset_path(name)
    except ConfigError as error:
        known = str(error).partition("known: ")[2]
        raise ConfigError(
            f"CONFIG_OR_PRESET: {name!r} is neither a config file nor a preset; presets: {known}"
        ) from None


def run_plan(
    source: str, overrides: list[str], *, processes: int = 1, gpu_memory: float | None = None, as_json: bool = False
) -> int:
    """`fastnft plan`: prints the table (and the switches that would make the run fit
    `gpu_memory` GiB); with as_json, one JSON object on the last line."""
    from fastnft.config import load_config
    from fastnft.models import check_model_rules

    if processes < 1:
        raise ConfigError(f"--processes: must be >= 1; got {processes}")
    if gpu_memory is not None and gpu_memory <= 0:
        raise ConfigError(f"--gpu-memory: must be > 0 GiB; got {gpu_memory}")
    path = resolve_source(source)
    config = load_config(path, overrides)
    check_recipe(config, processes)
    check_model_rules(config)

    def progress(message: str) -> None:
        print(f"fastnft plan: {message} ...", file=sys.stderr, flush=True)

    planner = Planner(progress)
    plan = planner.plan(config, processes)
    print(table(plan, path.stem))
    result = plan.as_json()
    result["config"] = str(path)
    if gpu_memory is not None:
        result.update(_fit_report(planner, config, processes, plan, gpu_memory))
    if as_json:
        print(json.dumps(result))
    return 0


def _fit_report(planner: Planner, config: Config, processes: int, plan: MemoryPlan, gpu_memory: float) -> dict:
    """Prints whether the plan fits and, if not, what each switch does and the first set that fits."""
    budget = int(gpu_memory * GIB)
    fits = plan.peak <= budget
    print(f"\n{'fits' if fits else 'does NOT fit'} in {gpu_memory:g} GiB (peak {gib(plan.peak):.3f} GiB, an estimate)")
    report: dict[str, Any] = {"gpu_memory_gib": gpu_memory, "fits": fits}
    if fits:
        return report
    alone, found = fitting_switches(planner, config, processes, plan, budget)
    print("switches that lower the peak, each alone:")
    for label, peak in alone.items():
        print(f"  {label:<54} peak {gib(peak):>9.3f}")
    report["switch_peaks_gib"] = {label: gib(peak) for label, peak in alone.items()}
    if found is None:
        print("no combination of them fits: fewer images per micro-batch or rollout batch, or a larger GPU")
        report["fitting_switches"] = None
        return report
    chosen, replanned = found
    overrides = [item for switch in chosen for item in switch.overrides()]
    print(
        f"fits with: {', '.join(s.label for s in chosen)} (peak {gib(replanned.peak):.3f} GiB): {' '.join(overrides)}"
    )
    report["fitting_switches"] = [s.label for s in chosen]
    report["fitting_overrides"] = overrides
    report["fitting_peak_gib"] = gib(replanned.peak)
    return report
