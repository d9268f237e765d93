"""`fastnft bench` on the tiny preset (CPU, shortened, compile through aot_eager): it writes its
results, the two paths compute the same loss, and every switch is observable."""

import csv
import json

import pytest
import torch
from PIL import Image

from fastnft.bench.phases import PhaseRunner
from fastnft.bench.runner import SD35M_FLOP_SHARES
from fastnft.bench.switches import SWITCHES, applicable_switches, bench_config, observe
from fastnft.cli import main
from fastnft.trainer import Trainer

CPU = torch.device("cpu")
SHORT = ["compile.backend=aot_eager"]
FLIPPED = ("compile", "text_cache")  # every switch is flipped by the tests below; here, two of them


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    arguments = ["bench", "--preset", "tiny", "--out", str(out), "--warmup", "1", "--repeats", "1"]
    arguments += ["--flip", ",".join(FLIPPED)]
    assert main([*arguments, "--ledger", str(out / "ledger.csv"), *SHORT]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_the_bench_writes_every_phase_for_both_paths(bench_run):
    out, result = bench_run
    assert result["preset"] == "tiny" and result["device"].startswith("cpu")
    assert set(result["phases"]) == {"rollout", "reward", "train", "iteration"}
    for phase, row in result["phases"].items():
        seconds = result["seconds_per_call"][phase]
        # both paths do the same work per call, so the speed-up is the inverse ratio of their times
        time_ratio = seconds["reference"]["median_s"] / seconds["fast"]["median_s"]
        assert row["speedup"] == pytest.approx(time_ratio), phase
    assert result["phases"]["train"]["unit"] == "samples/s"
    assert set(result["switch_speedups"]) == set(FLIPPED)
    assert result["mfu"] is None  # only on a GPU
    reference, fast = result["switches"]["reference"], result["switches"]["fast"]
    assert reference["text_encoder_rows_per_iteration"] == 8 and fast["text_encoder_rows_per_iteration"] == 0
    assert reference["loss"].startswith("torch, float64") and fast["optimizer"] == "AdamW (fused)"
    assert result["switch_speedups"]["compile"]["in_fast_path"] is True
    assert fast["compiled_blocks"] == 2 and fast["compiled_graphs"] > 0 and fast["new_graphs_after_warmup"] == 0
    assert reference["forwards_per_sample"] == fast["forwards_per_sample"] == 3  # old, reference, trained
    with Image.open(out / "bench.png") as picture:
        assert picture.width > 600 and picture.height > 300
    iteration = result["phases"]["iteration"]
    assert f"| iteration | {iteration['reference']:.3g} | {iteration['fast']:.3g} |" in (out / "bench.md").read_text()
    rows = list(csv.DictReader((out / "ledger.csv").open()))
    assert len(rows) == 2 * 4 + len(FLIPPED)
    assert {row["benchmark"] for row in rows} == {"bench_tiny"}
    fast_rows = {row["shape"]: float(row["value"]) for row in rows if row["provider"] == "fast"}
    assert fast_rows == {phase: pytest.approx(row["fast"], rel=1e-5) for phase, row in result["phases"].items()}


def test_the_tiny_preset_keeps_sd35m_flop_shares_within_2x(bench_run):
    shares = bench_run[1]["flop_shares"]
    assert sum(shares.values()) == pytest.approx(1.0)
    for name, target in SD35M_FLOP_SHARES.items():
        assert 0.5 <= shares[name] / target <= 2.0, (name, shares[name], target)


def fixed_loss(trainer: Trainer, tensors: dict) -> torch.Tensor:
    inputs = (tensors[key] for key in ("x0", "noise", "t", "r", "text"))
    return trainer.update.pair_loss(*inputs).loss.detach()


@pytest.fixture(scope="module")
def tensors():
    """One micro-batch of inputs, and the reference path's loss on it."""
    reference = Trainer(bench_config("tiny", SHORT, "reference", CPU))
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, *reference.model.sample_shape, generator=generator)
    inputs = {
        "x0": x0,
        "noise": torch.randn(x0.shape, generator=generator),
        "t": reference.update.grid[torch.tensor([0, 1, 2, 3])],
        "r": torch.rand(4, generator=generator),
        "text": reference.model.encode_text(reference.train_prompts.prompts[:4]),
    }
    return {**inputs, "reference_loss": fixed_loss(reference, inputs)}


def test_reference_and_fast_paths_compute_the_same_loss(tensors):
    fast = Trainer(bench_config("tiny", SHORT, "fast", CPU))
    torch.testing.assert_close(fixed_loss(fast, tensors), tensors["reference_loss"], rtol=1e-5, atol=1e-6)
    with_bf16 = Trainer(bench_config("tiny", SHORT, "fast", CPU, flipped="bf16_weights"))  # the GPU fast path
    torch.testing.assert_close(fixed_loss(with_bf16, tensors), tensors["reference_loss"], rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("name", sorted(applicable_switches(CPU, bench_config("tiny", SHORT, "reference", CPU))))
def test_each_switch_flips_its_state_and_keeps_the_loss(name, tensors):
    switch = SWITCHES[name]
    states, losses = [], []
    for flipped in (None, name):
        trainer = Trainer(bench_config("tiny", SHORT, "fast", CPU, flipped=flipped))
        losses.append(fixed_loss(trainer, tensors))
        state = observe(trainer)
        if switch.state not in state:
            state.update(PhaseRunner(trainer).count_forwards())
        states.append(state[switch.state])
    assert states[0] != states[1], f"{name} changed nothing observable: {switch.state} = {states[0]!r}"
    tolerance = 2e-2 if name == "bf16_weights" else 1e-4
    torch.testing.assert_close(losses[0], losses[1], rtol=tolerance, atol=tolerance / 10)


def test_full_fine_tuning_with_8bit_states_benches_without_the_lora_and_adamw_switches(tmp_path):
    out = tmp_path / "full"
    arguments = ["bench", "--preset", "tiny", "--out", str(out), "--phases", "train", "--flip", "none"]
    arguments += ["--warmup", "1", "--repeats", "1", "lora.enabled=false", "optim.name=adamw8bit-bnb", *SHORT]
    assert main(arguments) == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["switches"]["fast"]["optimizer"] == "AdamW8bit"
    assert result["switches"]["fast"]["transformer_calls_per_pair"] == 3  # old, reference, trained
    assert result["phases"]["train"]["fast"] > 0
