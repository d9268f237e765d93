"""Checkpoints: a dict of Stateful parts, bit-exact resume, half-written checkpoints ignored."""

import torch

from fastnft.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from fastnft.cli import main
from fastnft.run import train
from fastnft.trainer import Trainer
from tests.helpers import assert_bitwise_equal, assert_resume_is_bit_exact, snapshot, tiny_config


def test_exact_resume(tmp_path):
    # Evaluation off: a run stopped at iteration 1 evaluates there, an uninterrupted one does not.
    straight = assert_resume_is_bit_exact(["eval.every=0"], tmp_path)
    assert straight.update.steps == 2


def test_a_checkpoint_holds_each_part_and_loads_a_subset(tmp_path):
    trained = train(tiny_config(["eval.every=0"], iterations=1), tmp_path)
    fresh = Trainer(tiny_config(["eval.every=0"]), progress=False)
    load_checkpoint({"policies": fresh.policies}, latest_checkpoint(tmp_path))
    assert fresh.iteration == 0 and fresh.update.steps == 0  # only the policies were asked for
    assert_bitwise_equal(
        {k: v for k, v in snapshot(trained).items() if k != "optimizer"},
        {k: v for k, v in snapshot(fresh).items() if k != "optimizer"},
    )
    assert not snapshot(fresh)["optimizer"]  # the optimizer never stepped


def test_a_checkpoint_killed_before_its_rename_is_ignored(tmp_path):
    train(tiny_config(iterations=1), tmp_path)
    half_written = tmp_path / "checkpoints" / ".tmp-iteration_000002"
    half_written.mkdir()
    (half_written / "garbage").write_text("interrupted")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iteration_000001"]
    assert main(["train", "--resume", str(tmp_path), "--iterations", "2", "logging.progress=false"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "iteration_000002"
    assert not half_written.exists()


def test_policies_state_dict_round_trips_into_other_tensors():
    source = Trainer(tiny_config(["optim.lr=0.05"]), progress=False)
    source.run_iteration()
    target = Trainer(tiny_config(), progress=False)
    state = {
        group: {k: v.clone() for k, v in tensors.items()} for group, tensors in source.policies.state_dict().items()
    }
    target.policies.load_state_dict(state)
    for group, tensors in target.policies.state_dict().items():
        for name, value in tensors.items():
            assert torch.equal(value, state[group][name]), f"{group}/{name}"
