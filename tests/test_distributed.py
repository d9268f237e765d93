"""More than one process (gloo on CPU, launched by torchrun as users do): the same global recipe
trains the same weights on 1 and 2 ranks, FSDP2 checkpoints resume, and checkpoints move between
process counts."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from fastnft.cli import main
from fastnft.config import ConfigError, check_recipe
from fastnft.distributed import World, even_shard, gather_rows, image_shard
from tests.helpers import TINY_CONFIG, tiny_config

QUIET = ["logging.progress=false", "logging.tensorboard=false"]
FULL_FSDP2 = ["lora.enabled=false", "dist.strategy=fsdp2"]


@pytest.fixture
def one_thread():
    """In-process runs on one thread, as each torchrun rank runs (OMP_NUM_THREADS=1): CPU kernels
    split their sums by thread count, and Adam turns the last-bit differences of a near-zero
    gradient into steps of about lr."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(arguments: list[str], processes: int = 2) -> None:
    """`torchrun --nproc_per_node=N -m fastnft train ...` in a subprocess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "-m", "fastnft", "train", *arguments], env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def checkpoint(run_dir: Path, iteration: int, scratch: Path) -> dict:
    """A DCP checkpoint read back as plain tensors, whatever the number of ranks that wrote it."""
    target = scratch / f"{run_dir.name}_{iteration}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"iteration_{iteration:06d}", target)
    return torch.load(target, weights_only=False)


def training_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def assert_same_training_state(first: dict, second: dict, atol: float = 1e-6) -> None:
    for group in ("trained", "old", "ema"):
        first_weights, second_weights = first["policies"][group], second["policies"][group]
        assert first_weights.keys() == second_weights.keys()
        for name, value in first_weights.items():
            torch.testing.assert_close(value, second_weights[name], rtol=1e-4, atol=atol, msg=f"{group}/{name}")
    assert first["progress"]["iteration"] == second["progress"]["iteration"]
    assert first["update"]["steps"] == second["update"]["steps"]


def assert_weights_moved(state_before: dict, state_after: dict) -> None:
    before, after = state_before["policies"]["trained"], state_after["policies"]["trained"]
    moved = sum(not torch.equal(before[n], v) for n, v in after.items())
    assert moved > 0


def fsdp2_full_fine_tuning_matches_one_rank(family_overrides: list[str], tmp_path: Path) -> dict:
    """A family's tiny model fully fine-tuned with FSDP2 on 2 processes and unsharded on 1 for 2
    iterations: the same training state, weights that moved and the same last loss. Returns the
    sharded run's final checkpoint, for the family's own checks."""
    arguments = [str(TINY_CONFIG), *family_overrides, "logging.progress=false", "logging.tensorboard=false"]
    arguments += ["lora.enabled=false", "dist.strategy=fsdp2", "eval.every=0"]
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    torchrun([*arguments, "--out", str(sharded)])
    assert json.loads((sharded / "run.json").read_text())["processes"] == 2
    assert main(["train", *arguments, "--out", str(single)]) == 0
    end = checkpoint(sharded, 2, tmp_path)
    assert_same_training_state(end, checkpoint(single, 2, tmp_path))
    assert_weights_moved(checkpoint(sharded, 1, tmp_path), end)
    assert training_rows(sharded)[-1]["loss"] == pytest.approx(training_rows(single)[-1]["loss"], rel=1e-4)
    return end


def resume_copy(run_dir: Path, target: Path, iteration: int) -> Path:
    """A copy of a finished run cut back to its checkpoint at `iteration`."""
    shutil.copytree(run_dir, target)
    for path in (target / "checkpoints").iterdir():
        if int(path.name.split("_")[1]) > iteration:
            shutil.rmtree(path)
    shutil.rmtree(target / "export")
    return target


# ---------------------------------------------------------------- the recipe split


@pytest.mark.parametrize("processes", [1, 2, 4])
@pytest.mark.parametrize("steps", [1, 2])
def test_every_optimizer_step_sees_the_same_images_on_any_number_of_ranks(processes, steps):
    images = 48
    shards = [image_shard(images, steps, World(rank, processes)) for rank in range(processes)]
    assert sorted(i for shard in shards for i in shard) == list(range(images))
    per_step = images // steps
    for step in range(steps):
        seen = {i for shard in shards for i in shard[step * per_step // processes : (step + 1) * per_step // processes]}
        assert seen == set(range(step * per_step, (step + 1) * per_step))


def test_even_shards_pad_so_every_rank_runs_the_same_work():
    shards = [even_shard(5, World(rank, 2)) for rank in range(2)]
    assert shards == [([0, 1, 2], 3), ([3, 4, 0], 2)]
    assert even_shard(1, World(1, 2)) == ([0], 0)


def test_gather_rows_puts_rows_in_global_order():
    rows = gather_rows(World(), {"score": torch.tensor([1.0, 2.0, 3.0])}, [2, 0, 1], 3)
    assert rows["score"].tolist() == [2.0, 3.0, 1.0]


def test_a_recipe_that_does_not_split_names_its_fields():
    config = tiny_config()  # 2 prompts x K 4 = 8 images, micro-batch 4
    check_recipe(config, 2)
    with pytest.raises(ConfigError, match=r"rollout.groups \* rollout.group_size.*3 processes.*nft.micro_batch_size"):
        check_recipe(config, 3)


# ---------------------------------------------------------------- real launches


def test_two_ranks_train_what_one_rank_trains_and_resume_on_one(tmp_path, one_thread):
    """configs/tiny.yaml unchanged (LoRA, DDP) on 2 processes and on 1; then the 2-rank
    checkpoint of iteration 1 resumes on 1 process and reaches the 2-rank end state."""
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun([str(TINY_CONFIG), "--out", str(two), *QUIET])
    assert main(["train", str(TINY_CONFIG), "--out", str(one), *QUIET]) == 0
    assert json.loads((two / "run.json").read_text())["processes"] == 2

    end_two, end_one = checkpoint(two, 2, tmp_path), checkpoint(one, 2, tmp_path)
    assert_same_training_state(end_two, end_one)
    assert_weights_moved(checkpoint(two, 1, tmp_path), end_two)
    for row_two, row_one in zip(training_rows(two), training_rows(one), strict=True):
        for key in ("reward_mean", "reward_std", "zero_std_ratio", "loss", "grad_norm"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-4), key
    assert (two / "export" / "pytorch_lora_weights.safetensors").is_file()

    resumed = resume_copy(two, tmp_path / "resumed", iteration=1)
    assert main(["train", "--resume", str(resumed)]) == 0
    assert_same_training_state(checkpoint(resumed, 2, tmp_path), end_two)
    assert training_rows(resumed)[-1]["loss"] == pytest.approx(training_rows(two)[-1]["loss"], rel=1e-4)


def test_fsdp2_full_fine_tuning_matches_one_rank_and_resumes(tmp_path, one_thread):
    """Full fine-tuning sharded with FSDP2 on 2 processes: same weights as 1 unsharded process;
    its iteration-1 checkpoint resumes on 2 ranks and on 1 to the uninterrupted iteration 2."""
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    torchrun([str(TINY_CONFIG), "--out", str(sharded), *QUIET, *FULL_FSDP2])
    assert main(["train", str(TINY_CONFIG), "--out", str(single), *QUIET, *FULL_FSDP2]) == 0
    end = checkpoint(sharded, 2, tmp_path)
    assert_same_training_state(end, checkpoint(single, 2, tmp_path))
    assert_weights_moved(checkpoint(sharded, 1, tmp_path), end)
    exported = sharded / "export" / "transformer"
    assert (exported / "config.json").is_file() and (exported / "diffusion_pytorch_model.safetensors").is_file()

    uninterrupted = training_rows(sharded)[-1]["loss"]
    on_two = resume_copy(sharded, tmp_path / "on_two", iteration=1)
    torchrun(["--resume", str(on_two)])
    on_one = resume_copy(sharded, tmp_path / "on_one", iteration=1)
    assert main(["train", "--resume", str(on_one)]) == 0
    for resumed in (on_two, on_one):
        assert training_rows(resumed)[-1]["loss"] == pytest.approx(uninterrupted, rel=1e-4)
        assert_same_training_state(checkpoint(resumed, 2, tmp_path), end)


def test_fsdp2_with_torchao_8bit_states_trains_and_resumes_on_two_ranks(tmp_path):
    """torchao's AdamW8bit on FSDP2 shards: it trains on 2 ranks, and its iteration-1 checkpoint
    resumes on 2 ranks to the uninterrupted run. Sharded 8-bit states are stored dequantized (so
    DCP can reshard them) and quantized again on load, which moves a block's scale by rounding:
    the resumed weights agree to 1e-5 (lr is 3e-4), not bit for bit. Not compared with 1 rank:
    each shard quantizes in blocks of its own."""
    straight = tmp_path / "straight"
    overrides = [*QUIET, *FULL_FSDP2, "optim.name=adamw8bit-torchao", "eval.every=0"]
    torchrun([str(TINY_CONFIG), "--out", str(straight), *overrides])
    end = checkpoint(straight, 2, tmp_path)
    assert_weights_moved(checkpoint(straight, 1, tmp_path), end)
    assert end["update"]["optimizer"]["state"]  # the 8-bit states were checkpointed
    resumed = resume_copy(straight, tmp_path / "resumed", iteration=1)
    torchrun(["--resume", str(resumed)])
    assert training_rows(resumed)[-1]["loss"] == pytest.approx(training_rows(straight)[-1]["loss"], rel=1e-6)
    assert_same_training_state(checkpoint(resumed, 2, tmp_path), end, atol=1e-5)


def test_lora_over_an_fsdp2_sharded_base_matches_one_rank_and_resumes_on_one_and_two(tmp_path, one_thread):
    """LoRA with dist.strategy fsdp2 on 2 processes (base and adapters sharded per block): the
    1-rank weights and rows; its iteration-1 checkpoint resumes on 2 ranks and on 1."""
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    overrides = [*QUIET, "dist.strategy=fsdp2"]
    torchrun([str(TINY_CONFIG), "--out", str(sharded), *overrides])
    assert main(["train", str(TINY_CONFIG), "--out", str(single), *overrides]) == 0
    end = checkpoint(sharded, 2, tmp_path)
    assert_same_training_state(end, checkpoint(single, 2, tmp_path))
    assert_weights_moved(checkpoint(sharded, 1, tmp_path), end)
    for row_two, row_one in zip(training_rows(sharded), training_rows(single), strict=True):
        assert row_two["loss"] == pytest.approx(row_one["loss"], rel=1e-4)
    exported = load_file(sharded / "export" / "pytorch_lora_weights.safetensors")
    assert exported.keys() == load_file(single / "export" / "pytorch_lora_weights.safetensors").keys()

    on_two = resume_copy(sharded, tmp_path / "on_two", iteration=1)
    torchrun(["--resume", str(on_two)])
    on_one = resume_copy(sharded, tmp_path / "on_one", iteration=1)
    assert main(["train", "--resume", str(on_one)]) == 0
    for resumed in (on_two, on_one):
        assert_same_training_state(checkpoint(resumed, 2, tmp_path), end)
