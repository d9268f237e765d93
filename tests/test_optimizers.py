"""8-bit optimizer states (bitsandbytes, torchao) for full fine-tuning: they train, resume
exactly after two optimizer steps, and torchao's states stay quantized in checkpoints; bf16
trained weights with stochastic rounding."""

import math

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from fastnft.checkpoint import latest_checkpoint, load_checkpoint
from fastnft.cli import main
from fastnft.config import ConfigError
from fastnft.run import train
from fastnft.trainer import Trainer
from tests.helpers import assert_bitwise_equal, snapshot, tiny_config

FULL = ["lora.enabled=false", "eval.every=0", "optim.lr=1e-3"]
EIGHT_BIT = ["adamw8bit-bnb", "adamw8bit-torchao"]


def optimizer_state_bytes(checkpoint) -> dict[str, int]:
    """Bytes of the optimizer's per-parameter state in a checkpoint, by stored dtype."""
    stored: dict[str, int] = {}
    for key, entry in FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata.items():
        if key.startswith("update.optimizer.state.") and hasattr(entry, "size"):
            dtype = entry.properties.dtype
            stored[str(dtype)] = stored.get(str(dtype), 0) + math.prod(entry.size) * dtype.itemsize
    return stored


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_full_fine_tuning_with_8bit_states_trains_and_resumes_exactly(tmp_path, name):
    overrides = [*FULL, f"optim.name={name}"]
    straight = train(tiny_config(overrides, iterations=3), tmp_path / "straight")
    train(tiny_config(overrides, iterations=2), tmp_path / "split")  # two optimizer steps before the cut
    assert main(["train", "--resume", str(tmp_path / "split"), "--iterations", "3", "logging.progress=false"]) == 0
    resumed = Trainer(tiny_config(overrides), progress=False)
    load_checkpoint(resumed.checkpoint_parts(), latest_checkpoint(tmp_path / "split"))
    assert resumed.update.steps == straight.update.steps == 3
    assert_bitwise_equal(snapshot(straight), snapshot(resumed))  # weights and optimizer states
    stored = optimizer_state_bytes(latest_checkpoint(tmp_path / "straight"))
    assert stored.get("torch.uint8", 0) > 3 * stored.get("torch.float32", 0)  # mostly 1-byte codes


def test_torchao_states_are_checkpointed_quantized(tmp_path):
    sizes = {}
    for name in ("adamw", "adamw8bit-torchao"):
        train(tiny_config([*FULL, f"optim.name={name}"], iterations=1), tmp_path / name)
        sizes[name] = sum(optimizer_state_bytes(latest_checkpoint(tmp_path / name)).values())
    assert sizes["adamw8bit-torchao"] < 0.35 * sizes["adamw"]


def test_bf16_stochastic_rounding_trains_bf16_weights_and_changes_the_update():
    overrides = [*FULL, "optim.name=adamw8bit-torchao", "optim.bf16_stochastic_round=true"]
    rounded, nearest = (Trainer(tiny_config(overrides), progress=False) for _ in range(2))
    assert {p.dtype for p in rounded.policies.trained_parameters().values()} == {torch.bfloat16}
    nearest.update.optimizer.bf16_stochastic_round = False  # the same run with round-to-nearest
    rounded.run_iteration()
    nearest.run_iteration()
    after_rounded, after_nearest = snapshot(rounded)["trained"], snapshot(nearest)["trained"]
    assert any(not torch.equal(after_rounded[n], after_nearest[n]) for n in after_rounded)
    with pytest.raises(ConfigError, match=r"optim.bf16_stochastic_round: trains bf16 weights"):
        tiny_config(["optim.name=adamw8bit-torchao", "optim.bf16_stochastic_round=true"])


def test_bitsandbytes_with_fsdp2_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"optim.name: bitsandbytes' 8-bit AdamW rejects FSDP2"):
        tiny_config(["lora.enabled=false", "dist.strategy=fsdp2", "optim.name=adamw8bit-bnb"])
