"""A quantized frozen base under LoRA (model.quantize, model.quantize_text): the selection rule,
the exact resident bytes, training and exact resume on an nf4 or int8 base, exports that load
into the unquantized diffusers pipeline, and the config rules."""

import importlib.util
import json
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastnft.models import build_model
from fastnft.models.presets import build_preset
from fastnft.quantize import quantize_frozen_base, quantize_module, quantized_linears, quantized_weight_bytes
from fastnft.run import train
from tests.helpers import assert_resume_is_bit_exact, tiny_config, train_fails

# configs/tiny.yaml made cheaper (one group of 4 images, no evaluation, no grids, 2 sampler steps)
# and with a learning rate that moves the LoRA visibly in one step (for the export check)
SMALL = [
    "rollout.groups=1",
    "rollout.batch_size=4",
    "eval.every=0",
    "logging.sample_grid_every=0",
    "rollout.steps=2",
    "optim.lr=0.05",
]

# The step-0 loss of a quantized base against the unquantized one. That loss averages the NFT
# objective over a batch whose images the (quantized) old policy sampled, so the gap carries the
# quantization error of every velocity of the rollout and of the loss itself. Measured on the tiny
# SD3 (fp32, relative): nf4 8e-5 here (1.1e-4 with 8 images and 2-4 steps), int8 3e-7 (up to 2e-6).
# nf4 rounds each weight to one of 16 levels of its block's absmax (about 10 % error on a
# layer's output), int8 to 255 levels of its row's (about 0.6 %): the tolerances leave about 10x
# over the largest measurement, and still catch a broken base (a layer zeroed, unscaled or
# transposed moves this loss by whole percents).
STEP0_RELATIVE_TOLERANCE = {"nf4": 1e-3, "int8": 2e-5}


def storage_bytes(tensor: torch.Tensor, seen: set[int]) -> int:
    """The bytes of the storages behind tensor (a torchao subclass: those of its inner tensors;
    a Params4bit: its packed data), each storage counted once."""
    if hasattr(tensor, "__tensor_flatten__"):
        return sum(storage_bytes(getattr(tensor, name), seen) for name in tensor.__tensor_flatten__()[0])
    storage = tensor.untyped_storage()
    if storage.data_ptr() in seen:
        return 0
    seen.add(storage.data_ptr())
    return storage.nbytes()


def quant_state_bytes(state, seen: set[int]) -> int:
    """Every tensor of a bitsandbytes QuantState, its nested state included."""
    own = sum(storage_bytes(value, seen) for value in vars(state).values() if isinstance(value, torch.Tensor))
    return own + (quant_state_bytes(state.state2, seen) if state.state2 is not None else 0)


def resident_bytes(weight: torch.Tensor) -> int:
    seen: set[int] = set()
    state = getattr(weight, "quant_state", None)
    return storage_bytes(weight, seen) + (quant_state_bytes(state, seen) if state is not None else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["nf4", "int8", "fp8"])  # torchao's fp8 quantizes on a CPU too
def test_quantized_weight_bytes_is_the_real_storage(method, dtype):
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Linear(128, 48), nn.Linear(192, 40, bias=False), nn.Linear(64 * 33, 7)])
    module = nn.Sequential(blocks).to(dtype)
    predicted = {name: quantized_weight_bytes(linear, method) for name, linear in quantized_linears(module)}
    assert len(predicted) == 3
    quantize_module(module, method, dtype)
    for name, expected in predicted.items():
        weight = module.get_submodule(name).weight
        assert type(weight) is not nn.Parameter  # really quantized
        assert resident_bytes(weight) == expected, name


def test_selection_rule_keeps_embedders_projections_and_t5_wo_in_full_precision():
    components = build_preset("tiny-sd3", seed=0)
    selected = dict(quantized_linears(components["transformer"]))
    assert "transformer_blocks.0.attn.to_q" in selected and "transformer_blocks.1.ff.net.2" in selected
    linears = [name for name, m in components["transformer"].named_modules() if type(m) is nn.Linear]
    assert sorted(set(linears) - set(selected)) == [
        "context_embedder",
        "norm_out.linear",
        "proj_out",
        "time_text_embed.text_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2",
    ]
    t5 = [name for name, _ in quantized_linears(components["text_encoder_3"])]
    assert "encoder.block.0.layer.0.SelfAttention.q" in t5 and not any(name.endswith(".wo") for name in t5)
    # CLIP's tiny widths (8, 16) are no multiple of the 64-weight block: nothing to quantize
    assert quantized_linears(components["text_encoder"]) == []


@pytest.fixture(scope="module")
def unquantized_run(tmp_path_factory):
    """One iteration on the unquantized base: its first training row and its export."""
    run = tmp_path_factory.mktemp("none") / "run"
    train(tiny_config(SMALL, iterations=1), run)
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0]), run / "export"


def lora_layer_class(method: str) -> str:
    # peft's bitsandbytes 4-bit layer (its generic one would merge the packed bytes), its torchao one
    return {"nf4": "Linear4bit", "int8": "TorchaoLoraLinear"}[method]


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_a_quantized_base_trains_resumes_exactly_and_exports_for_the_unquantized_pipeline(
    method, unquantized_run, tmp_path
):
    from diffusers import StableDiffusion3Pipeline

    started = time.perf_counter()
    straight = assert_resume_is_bit_exact([*SMALL, f"model.quantize={method}"], tmp_path)
    layer = straight.model.transformer.transformer_blocks[0].attn.to_q
    assert type(layer).__name__ == lora_layer_class(method) and type(layer).__module__.startswith("peft.")
    base_row, base_export = unquantized_run
    row = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[0])
    gap = abs(row["loss"] - base_row["loss"]) / abs(base_row["loss"])
    print(f"{method}: step-0 loss {row['loss']:.7f} vs {base_row['loss']:.7f} (relative gap {gap:.2e})")
    assert 0 < gap < STEP0_RELATIVE_TOLERANCE[method]

    # the export names the same peft keys as an unquantized run's, and loads into the plain pipeline
    export = tmp_path / "straight" / "export"
    exported = load_file(export / "pytorch_lora_weights.safetensors")
    assert exported.keys() == load_file(base_export / "pytorch_lora_weights.safetensors").keys()
    pipeline = StableDiffusion3Pipeline(**build_preset("tiny-sd3", seed=0))

    def generate() -> torch.Tensor:
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        arguments = dict(guidance_scale=1.0, num_inference_steps=2, height=32, width=32, max_sequence_length=16)
        return pipeline(prompt="a red circle", latents=latents, output_type="pt", **arguments).images[0]

    base = generate()
    pipeline.load_lora_weights(export)
    assert type(pipeline.transformer.transformer_blocks[0].attn.to_q.base_layer) is nn.Linear
    assert not torch.allclose(generate(), base, atol=1e-3)
    print(f"{method}: {time.perf_counter() - started:.1f} s")


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantize_text_quantizes_the_text_encoders_and_they_still_encode(method):
    config = tiny_config([f"model.quantize_text={method}"])
    model = build_model(config.model, config.seed, torch.device("cpu"), torch.float32)
    for encoder in model.text_encoders().values():
        encoder.eval()  # as the trainer freezes them: T5's dropout off
    prompts = ["a red circle", "a blue square next to a cat"]
    with torch.no_grad():
        before = model.encode_text(prompts)
    quantize_frozen_base(model.transformer, model.text_encoders(), config.model, torch.float32)
    t5 = model.text_encoders()["text_encoder_3"]
    query = t5.encoder.block[0].layer[0].SelfAttention.q
    assert type(query).__name__ == "Linear4bit" if method == "nf4" else type(query.weight).__name__ == "Int8Tensor"
    assert type(model.transformer.transformer_blocks[0].attn.to_q) is nn.Linear  # model.quantize is none
    with torch.no_grad():
        after = model.encode_text(prompts)
    assert after.sequence.shape == before.sequence.shape and torch.isfinite(after.sequence).all()
    # T5's share of the sequence (CLIP's tiny encoders keep full precision): measured 11 % relative
    # error for nf4 (about 10 % a layer on random-init weights), 0.8 % for int8
    error = (after.sequence - before.sequence).norm() / before.sequence.norm()
    assert 0 < error < {"nf4": 0.2, "int8": 0.02}[method], error


# the other impossible settings are cases of the bad-input matrix (tests/test_bad_inputs.py)
@pytest.mark.parametrize(
    ("field", "method", "package"),
    [("model.quantize", "nf4", "bitsandbytes"), ("model.quantize_text", "int8", "torchao")],
)
def test_a_missing_quantization_package_is_named(field, method, package, monkeypatch, capsys, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    error = train_fails(capsys, tmp_path, f"{field}={method}")
    assert f"{field}: {method} needs {package}, not installed" in error
