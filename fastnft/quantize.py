"""A quantized frozen base under LoRA (model.quantize, model.quantize_text).

Which layers: `quantized_linears` is the one selection rule, shared by the swap and by memory
planning. What they cost: `quantized_weight_bytes` is the resident size of one quantized weight,
exact for the tensors the swap below creates (tests/test_quantize.py sums their real storage).
"""

import math

import torch
from torch import nn

from fastnft.config import ModelConfig

# nf4 (bitsandbytes): absmax per BLOCK_SIZE weights; torchao's int8/fp8 scale per output row
BLOCK_SIZE = 64
# bitsandbytes' double quantization ("compress_statistics"): the fp32 absmax of each block is
# itself quantized to 8 bits, in blocks of NESTED_BLOCK_SIZE absmaxes (bnb's fixed 256)
NESTED_BLOCK_SIZE = 256
NF4_CODE_BYTES = 16 * 4  # each Linear4bit's QuantState holds its own fp32 nf4 code table (16 values)
NESTED_CODE_BYTES = 256 * 4  # and its nested state the fp32 8-bit dynamic code table (256 values)
FP32_BYTES = 4

METHODS = ("nf4", "int8", "fp8")
# the package each method needs (config.py checks it before anything loads)
PACKAGES = {"nf4": "bitsandbytes", "int8": "torchao", "fp8": "torchao"}


def _in_repeated_block(name: str) -> bool:
    """Whether a module's dotted name passes through a ModuleList index (transformer_blocks.3.…,
    encoder.layers.0.…): the repeated blocks that hold nearly all of a model's weights."""
    return any(part.isdigit() for part in name.split("."))


def _kept_high_precision(module: nn.Module) -> set[str]:
    """Name fragments the model class asks to keep in full precision (transformers' and diffusers'
    `_keep_in_fp32_modules`, e.g. T5's feed-forward output `wo`, whose activations overflow)."""
    return set(getattr(module, "_keep_in_fp32_modules", None) or ())


def quantized_linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers of a transformer or text encoder that model.quantize(_text) replaces,
    with their dotted names, in module order.

    The rule: every plain nn.Linear inside a repeated block (its name has a ModuleList index) whose
    in_features is a multiple of BLOCK_SIZE, except those the model class keeps in fp32
    (`_keep_in_fp32_modules`). Everything outside the blocks stays in the compute dtype: the patch,
    timestep and caption embedders, the final norm and output projection, text projections. They
    are small, and they set the scale of everything else, so quantization error there costs most.
    """
    kept = _kept_high_precision(module)
    selected = []
    for name, child in module.named_modules():
        if type(child) is not nn.Linear or not _in_repeated_block(name):
            continue
        if child.in_features % BLOCK_SIZE or kept.intersection(name.split(".")):
            continue
        selected.append((name, child))
    return selected


def quantized_weight_bytes(linear: nn.Linear, method: str) -> int:
    """The resident bytes of linear's weight once quantized by method (the bias is not
    quantized and not counted).

    nf4: bitsandbytes' Params4bit with double quantization, as Linear4bit stores it: the packed
    4-bit data (two weights a byte) plus its QuantState: one uint8 absmax a block of BLOCK_SIZE
    weights, the nf4 code table, the fp32 offset, and the nested state (an fp32 absmax a
    NESTED_BLOCK_SIZE absmaxes plus its code table). int8: torchao's weight-only Int8Tensor: int8
    data plus an fp32 scale and an int8 zero point a row. fp8: torchao's weight-only Float8Tensor:
    float8_e4m3 data plus an fp32 scale a row.
    """
    rows, numel = linear.out_features, linear.out_features * linear.in_features
    if method == "nf4":
        blocks = math.ceil(numel / BLOCK_SIZE)
        nested_blocks = math.ceil(blocks / NESTED_BLOCK_SIZE)
        statistics = blocks + NF4_CODE_BYTES + FP32_BYTES
        nested = nested_blocks * FP32_BYTES + NESTED_CODE_BYTES
        return (numel + 1) // 2 + statistics + nested
    if method == "int8":
        return numel + rows * (FP32_BYTES + 1)
    if method == "fp8":
        return numel + rows * FP32_BYTES
    raise ValueError(f"unknown quantization method {method!r} (known: {', '.join(METHODS)})")


def _swap_nf4(module: nn.Module, selected: list[tuple[str, nn.Linear]], compute_dtype: torch.dtype) -> None:
    """Each selected nn.Linear becomes a bitsandbytes Linear4bit (nf4, double quantization) that
    computes in compute_dtype. Done here rather than through diffusers' BitsAndBytesConfig, which
    refuses to load on a CPU: one path for CPU and GPU."""
    import bitsandbytes as bnb

    for name, linear in selected:
        with torch.device("meta"):  # the layer's own fp weight is replaced at once: never allocate it
            quantized = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=quantized
        )
        quantized.bias = linear.bias
        quantized.to(linear.weight.device)  # Params4bit quantizes as it moves to a device
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, quantized)


def _torchao_config(method: str) -> object:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if method == "int8" else Float8WeightOnlyConfig()


def quantize_module(module: nn.Module, method: str, compute_dtype: torch.dtype) -> int:
    """Quantizes module's `quantized_linears` in place by method (none, nf4, int8 or fp8), for a
    frozen module: the quantized weights take no gradient. Returns how many layers changed.

    nf4 marks the module `is_loaded_in_4bit`, the flag by which peft picks its bitsandbytes 4-bit
    LoRA layer (its generic layer would treat the packed bytes as weights). torchao's int8 and fp8
    weights are tensor subclasses, which peft recognises itself (its torchao LoRA layer)."""
    if method == "none":
        return 0
    selected = quantized_linears(module)
    if method == "nf4":
        _swap_nf4(module, selected, compute_dtype)
        module.is_loaded_in_4bit = True
    elif method in ("int8", "fp8"):
        from torchao.quantization import quantize_

        names = {name for name, _ in selected}
        quantize_(module, _torchao_config(method), filter_fn=lambda _, name: name in names)
    else:
        raise ValueError(f"unknown quantization method {method!r} (known: none, {', '.join(METHODS)})")
    return len(selected)


def quantize_frozen_base(
    transformer: nn.Module, text_encoders: dict[str, nn.Module], config: ModelConfig, compute_dtype: torch.dtype
) -> None:
    """model.quantize on the transformer (before LoRA goes on it), model.quantize_text on each
    text encoder (computing in its own dtype). Quantization is deterministic: a resumed run
    rebuilds the same frozen base, so checkpoints hold the LoRA weights alone."""
    quantize_module(transformer, config.quantize, compute_dtype)
    for encoder in text_encoders.values():
        quantize_module(encoder, config.quantize_text, next(encoder.parameters()).dtype)


def is_quantized(parameter: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit weight (it carries its QuantState) or a torchao tensor subclass."""
    return hasattr(parameter, "quant_state") or hasattr(parameter, "__tensor_flatten__")


def keep_quantized_weights_out_of_ddp(module: nn.Module) -> None:
    """DDP broadcasts every parameter from rank 0 as it wraps a module, and torchao's weight
    tensors cannot be viewed flat for that. Every rank quantizes the same base deterministically,
    and frozen weights take no gradient: DDP need not see them."""
    from torch.nn.parallel import DistributedDataParallel

    names = [name for name, parameter in module.named_parameters() if is_quantized(parameter)]
    if names:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
