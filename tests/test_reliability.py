"""What a run promises on disk (docs/reliability.md): refusals that leave a run directory as it
was, resume past torn metrics and damaged checkpoints, checkpoints that cannot run code, one run
per directory, a stop that still writes export/, non-finite steps skipped, and errors at the CLI
boundary as one line."""

import builtins
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

import fastnft.checkpoint
import fastnft.run
from fastnft.checkpoint import Progress, latest_checkpoint, list_checkpoints, load_latest
from fastnft.cli import main
from fastnft.run import train
from fastnft.trainer import Trainer
from fastnft.update import NFTUpdate
from tests.helpers import TINY_CONFIG, tiny_config

QUIET = ["logging.progress=false", "logging.tensorboard=false"]
TORCH_LOSS = ["nft.loss_backend=torch"]  # not the Triton interpreter: these tests are about the steps


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml for 2 iterations: checkpoints at 1 and 2, a metrics row each, export/."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(["eval.every=0"], iterations=2), run)
    return run


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def one_error_line(capsys) -> str:
    """stderr holds exactly one `fastnft: error:` line and no traceback; returns it."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastnft: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def zero_file(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def truncate_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ---------------------------------------------------------------- 1. --out


def test_out_at_an_existing_run_is_refused_and_left_byte_identical(run, capsys):
    before = hashes(run)
    assert main(["train", str(TINY_CONFIG), "--out", str(run), *QUIET]) == 2
    error = one_error_line(capsys)
    assert f"--out: {run} holds a run already" in error and f"--resume {run}" in error and "--overwrite" in error
    assert hashes(run) == before


def test_overwrite_replaces_the_old_run(run):
    assert (run / "samples" / "rollout_000002.png").is_file()
    arguments = ["train", str(TINY_CONFIG), "--out", str(run), "--overwrite", "--iterations", "1", "eval.every=0"]
    assert main([*arguments, *QUIET]) == 0
    assert [p.name for p in list_checkpoints(run)] == ["iteration_000001"]
    assert [row["iteration"] for row in rows(run)] == [1]
    assert not (run / "samples" / "rollout_000002.png").exists()  # the old run's files went first
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file() and not (run / "run.lock").exists()


@pytest.mark.parametrize("case", ["a file", "under a file", "not writable"])
def test_out_at_a_file_or_an_unwritable_path_is_one_line(tmp_path, capsys, monkeypatch, case):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a run")
    out = {"a file": a_file, "under a file": a_file / "run", "not writable": tmp_path / "locked" / "run"}[case]
    if case == "not writable":
        (tmp_path / "locked").mkdir()
        real_access = os.access  # tests run as root, which chmod does not stop
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked" and real_access(path, mode))
    assert main(["train", str(TINY_CONFIG), "--out", str(out), *QUIET]) == 2
    assert str(out) in one_error_line(capsys)
    assert a_file.read_text() == "not a run" and not (tmp_path / "locked" / "run").exists()


# ---------------------------------------------------------------- 2. torn metrics


def test_a_torn_last_metrics_line_is_dropped_on_resume(run, capsys):
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"iteration": 3, "reward_mean": 0.4')  # killed mid-write: no newline, no brace
    assert main(["train", "--resume", str(run), "--iterations", "3", *QUIET]) == 0
    assert "dropped a torn last line" in capsys.readouterr().err
    assert [row["iteration"] for row in rows(run)] == [1, 2, 3]


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_it(run, capsys):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in ["{garbage", *lines]))
    before = hashes(run)
    assert main(["train", "--resume", str(run), "--iterations", "3", *QUIET]) == 2
    assert f"metrics: {run / 'metrics.jsonl'} line 1" in one_error_line(capsys)
    assert hashes(run) == before


# ---------------------------------------------------------------- 3. --resume without checkpoints


def test_resume_without_a_checkpoint_is_refused_and_keeps_every_row(run, capsys):
    shutil.rmtree(run / "checkpoints")
    before = hashes(run)
    assert main(["train", "--resume", str(run), "--iterations", "3", *QUIET]) == 2
    assert f"--resume: {run} has no checkpoint" in one_error_line(capsys)
    assert hashes(run) == before and len(rows(run)) == 2


# ---------------------------------------------------------------- 4. damaged checkpoints

DAMAGE = {
    "truncated data": lambda c: truncate_file(c / "__0_0.distcp"),
    "zeroed data": lambda c: zero_file(c / "__0_0.distcp"),
    "empty data": lambda c: (c / "__0_0.distcp").write_bytes(b""),
    "missing data": lambda c: (c / "__0_0.distcp").unlink(),
    "missing metadata": lambda c: (c / ".metadata").unlink(),
    "truncated metadata": lambda c: truncate_file(c / ".metadata"),
    "zeroed metadata": lambda c: zero_file(c / ".metadata"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(run, capsys, damage):
    newest = latest_checkpoint(run)
    DAMAGE[damage](newest)
    progress = Progress()
    assert load_latest({"progress": progress}, run).name == "iteration_000001" and progress.iteration == 1
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("fastnft: warning: checkpoint:") and str(newest) in warning
    assert "falling back to iteration_000001" in warning and len(warning.splitlines()) == 1


def test_resume_and_eval_fall_back_past_a_damaged_checkpoint(run, capsys):
    zero_file(run / "checkpoints" / "iteration_000002" / "__0_0.distcp")
    assert main(["eval", str(run)]) == 0
    assert "iteration_000002" in capsys.readouterr().err
    assert json.loads((run / "eval" / "eval.json").read_text())["iteration"] == 1
    assert main(["train", "--resume", str(run), "--iterations", "2", *QUIET]) == 0
    assert "falling back to iteration_000001" in capsys.readouterr().err
    assert [row["iteration"] for row in rows(run)] == [1, 2]  # iteration 2 redone once
    progress = Progress()
    assert load_latest({"progress": progress}, run).name == "iteration_000002" and progress.iteration == 2


@pytest.mark.parametrize("command", ["resume", "eval", "sample"])
def test_no_loadable_checkpoint_is_one_line_naming_it(run, capsys, command):
    for checkpoint in list_checkpoints(run):
        zero_file(checkpoint / "__0_0.distcp")
    before = hashes(run)
    arguments = {
        "resume": ["train", "--resume", str(run), "--iterations", "3", *QUIET],
        "eval": ["eval", str(run)],
        "sample": ["sample", str(run), "--prompts", "a red circle"],
    }[command]
    assert main(arguments) == 2
    error = one_error_line(capsys)
    assert str(run / "checkpoints" / "iteration_000001") in error and "no checkpoint in" in error
    assert hashes(run) == before


# ---------------------------------------------------------------- 5. doctored checkpoints


class Payload:
    """Unpickled, it creates `marker`: what a doctored checkpoint could do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def doctor_metadata(checkpoint: Path, marker: Path) -> None:
    """A real checkpoint's metadata with the payload tucked into its planner data."""
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
    metadata.planner_data["extra"] = Payload(marker)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("command", ["resume", "eval", "sample"])
def test_a_doctored_metadata_file_is_refused_and_runs_nothing(run, tmp_path, capsys, command):
    marker = tmp_path / "marker"
    for checkpoint in list_checkpoints(run):
        doctor_metadata(checkpoint, marker)
    metadata = run / "checkpoints" / "iteration_000001" / ".metadata"
    arguments = {
        "resume": ["train", "--resume", str(run), "--iterations", "3", *QUIET],
        "eval": ["eval", str(run)],
        "sample": ["sample", str(run), "--prompts", "a red circle"],
    }[command]
    assert main(arguments) == 2
    error = one_error_line(capsys)
    assert str(metadata) in error and "is not a DCP metadata class" in error
    assert not marker.exists()
    pickle.loads(metadata.read_bytes())  # the control: plain unpickling runs the payload
    assert marker.exists()


def test_a_doctored_bytes_entry_is_refused_and_runs_nothing(run, tmp_path, capsys):
    """A non-tensor entry (here progress.iteration) pointing at a pickled payload."""
    marker, checkpoint = tmp_path / "marker", latest_checkpoint(run)
    for stale in list_checkpoints(run)[:-1]:
        shutil.rmtree(stale)
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    (checkpoint / "extra.distcp").write_bytes(payload.getvalue())
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
    (entry,) = [info for index, info in metadata.storage_data.items() if index.fqn == "progress.iteration"]
    entry.relative_path, entry.offset, entry.length = "extra.distcp", 0, len(payload.getvalue())
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))

    assert main(["train", "--resume", str(run), "--iterations", "3", *QUIET]) == 2
    assert f"{checkpoint} does not load: refused by the weights-only unpickler" in one_error_line(capsys)
    assert not marker.exists()
    with pytest.raises(TypeError):  # the control: DCP's own loader runs the payload (an open file as iteration)
        dcp.load({"progress": Progress()}, checkpoint_id=str(checkpoint), no_dist=True)
    assert marker.exists()


# ---------------------------------------------------------------- 6. one run per directory


def test_a_second_run_on_a_locked_directory_is_refused(run, tmp_path, capsys):
    lock = run / "run.lock"
    lock.write_text(f"{os.getpid()}\n")  # a live owner: this very process
    before = hashes(run)
    assert main(["train", "--resume", str(run), "--iterations", "3", *QUIET]) == 2
    assert f"in use by process {os.getpid()}" in one_error_line(capsys)
    assert hashes(run) == before

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "run.lock").write_text(f"{os.getpid()}\n")
    assert main(["train", str(TINY_CONFIG), "--out", str(fresh), *QUIET]) == 2
    assert f"in use by process {os.getpid()}" in one_error_line(capsys)
    assert [p.name for p in fresh.iterdir()] == ["run.lock"]


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text(f"{int(gone.stdout)} \n")
    assert main(["train", str(TINY_CONFIG), "--out", str(out), "--iterations", "1", "eval.every=0", *QUIET]) == 0
    assert "taking over the lock" in capsys.readouterr().err
    assert latest_checkpoint(out).name == "iteration_000001" and not (out / "run.lock").exists()


# ---------------------------------------------------------------- 7. failing writes, late signals


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_last(tmp_path, capsys, monkeypatch):
    real_save, calls = dcp.save, []

    def save_fails_after_the_first(*args, **kwargs):
        calls.append(kwargs["checkpoint_id"])
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(fastnft.checkpoint.dcp, "save", save_fails_after_the_first)
    out = tmp_path / "run"
    assert main(["train", str(TINY_CONFIG), "--out", str(out), "--iterations", "3", "eval.every=0", *QUIET]) == 2
    error = one_error_line(capsys)
    assert f"cannot write {out / 'checkpoints' / 'iteration_000002'}" in error and "No space left" in error
    assert len(calls) == 2  # not tried again on the way out
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["iteration_000001"]
    assert load_latest({"progress": Progress()}, out).name == "iteration_000001"
    assert (out / "export" / "pytorch_lora_weights.safetensors").is_file() and not (out / "run.lock").exists()


def test_a_sigterm_during_the_export_still_writes_it(tmp_path, monkeypatch):
    received = []
    real_export = fastnft.run.export_weights

    def export_under_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(fastnft.run, "export_weights", export_under_sigterm)
    # Were the run's handlers gone by now, this one (not the default, which would end pytest) gets it.
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        out = tmp_path / "run"
        assert main(["train", str(TINY_CONFIG), "--out", str(out), "--iterations", "1", "eval.every=0", *QUIET]) == 0
        assert not received  # the run's handler took it
        assert signal.getsignal(signal.SIGTERM) is not previous  # and gave the test's back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (out / "export" / "pytorch_lora_weights.safetensors").is_file()


# ---------------------------------------------------------------- 8. stopped during the start evaluation


def test_a_run_stopped_during_its_start_evaluation_does_not_repeat_its_rows(tmp_path, monkeypatch):
    real_evaluate = fastnft.run.evaluate_with_guidance

    def evaluate_under_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(fastnft.run, "evaluate_with_guidance", evaluate_under_sigterm)
    out = tmp_path / "run"
    overrides = ["eval.at_start=true", "eval.cfg_scales=[2]", "eval.every=0", *QUIET]
    assert main(["train", str(TINY_CONFIG), "--out", str(out), "--iterations", "1", *overrides]) == 0
    assert latest_checkpoint(out).name == "iteration_000000"  # stopped before any iteration
    assert [row["iteration"] for row in rows(out)] == [0, 0]

    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--iterations", "1", *QUIET]) == 0
    assert [row["iteration"] for row in rows(out)] == [0, 0, 1]  # one free and one guided row at 0


# ---------------------------------------------------------------- 9. non-finite steps


def poison_steps(monkeypatch, poisoned: Callable[[NFTUpdate], bool]) -> None:
    """Every pair loss of an optimizer step for which `poisoned(update)` holds becomes NaN (so do
    its gradients), as a diverging run's would."""
    real = NFTUpdate.pair_loss

    def pair_loss(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if poisoned(self) else out

    monkeypatch.setattr(NFTUpdate, "pair_loss", pair_loss)


def trained_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trained, old and EMA weights and the optimizer's moments, copied."""
    state = {f"trained.{k}": v.detach().clone() for k, v in trainer.policies.trained_parameters().items()}
    state.update({f"ema.{k}": v.detach().clone() for k, v in trainer.policies.ema.items()})
    state.update({f"old.{k}": v.detach().clone() for k, v in trainer.policies.old_parameters().items()})
    for index, moments in enumerate(trainer.update.optimizer.state.values()):
        state.update({f"optimizer.{index}.{k}": v.clone() for k, v in moments.items() if torch.is_tensor(v)})
    return state


def test_a_non_finite_step_is_skipped_and_counted(monkeypatch):
    trainer = Trainer(
        tiny_config(["optim.steps_per_iteration=2", "optim.max_skipped_steps=5", *TORCH_LOSS]),
        progress=False,
    )
    trainer.run_iteration()
    poison_steps(monkeypatch, lambda update: update.steps == 3)  # the second step of iteration 2
    row = trainer.run_iteration()
    assert row["skipped_steps"] == 1 and trainer.update.steps == 3 and row["optimizer_steps"] == 3
    assert all(math.isfinite(row[key]) for key in ("loss", "grad_norm", "positive_loss"))  # the kept step's

    poison_steps(monkeypatch, lambda update: True)
    before = trained_state(trainer)
    row = trainer.run_iteration()
    assert row["skipped_steps"] == 2 and trainer.update.steps == 3 and math.isnan(row["loss"])
    after = trained_state(trainer)
    # No optimizer step, no EMA step; only the old policy moves (its soft update runs each iteration).
    changed = sorted(key for key in before if not torch.equal(before[key], after[key]))
    assert changed and all(key.startswith("old.") for key in changed)
    assert trainer.update.skipped_in_a_row == 3  # with the one before

    monkeypatch.undo()
    row = trainer.run_iteration()
    assert row["skipped_steps"] == 0 and trainer.update.steps == 5 and trainer.update.skipped_in_a_row == 0


def test_max_skipped_steps_in_a_row_stop_the_run_keeping_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, lambda update: update.steps >= 1)  # every step after the first
    out = tmp_path / "run"
    arguments = ["train", str(TINY_CONFIG), "--out", str(out), "--iterations", "6", "eval.every=0", *TORCH_LOSS, *QUIET]
    assert main([*arguments, "optim.max_skipped_steps=2"]) == 2
    error = one_error_line(capsys)
    assert "optim.max_skipped_steps: 2 optimizer steps in a row" in error and "iteration 3" in error
    assert [(row["iteration"], row["skipped_steps"]) for row in rows(out)] == [(1, 0), (2, 1)]
    assert rows(out)[1]["loss"] is None  # NaN is written as null
    assert latest_checkpoint(out).name == "iteration_000002" and not (out / "run.lock").exists()
    exported = load_file(out / "export" / "pytorch_lora_weights.safetensors")
    assert exported and all(bool(torch.isfinite(tensor).all()) for tensor in exported.values())


def test_the_skip_decision_reads_the_device_once_per_optimizer_step(monkeypatch):
    """One read per optimizer step (whether it is finite, and its grad norm) and one for the
    metrics, however many (micro-batch, timestep) pairs a step holds."""
    reads = []
    real = torch.Tensor.tolist

    def counted(self):
        reads.append(self.numel())
        return real(self)

    def reads_of_one_update(overrides: list[str]) -> int:
        trainer = Trainer(tiny_config([*overrides, *TORCH_LOSS]), progress=False)
        batch = trainer.rollout.batch(0)
        samples = trainer.rollout.sample(batch)
        scored = trainer.rollout.score(batch, samples)
        reads.clear()
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "tolist", counted)
            trainer.update(samples.x0, samples.text, scored.probability, 0, batch.mine)
        return len(reads)

    assert reads_of_one_update(["nft.micro_batch_size=8"]) == 1 + 1
    assert reads_of_one_update(["nft.micro_batch_size=2", "optim.steps_per_iteration=2"]) == 2 + 1


# ---------------------------------------------------------------- 10. the CLI boundary


def test_a_load_failure_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    bad = ["lora.target_modules=[nonesuch]", *QUIET]
    assert main(["train", str(TINY_CONFIG), "--out", str(tmp_path / "run"), *bad]) == 2
    assert "lora.target_modules: ['nonesuch']" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # the trainer is built before the directory is made
    assert main(["train", str(TINY_CONFIG), "--out", str(tmp_path / "run"), "--debug", *bad]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("FASTNFT_DEBUG", "1")
    assert main(["train", str(TINY_CONFIG), "--out", str(tmp_path / "run"), *bad]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_failure_after_the_start_is_one_line_with_exit_1(tmp_path, capsys, monkeypatch):
    def crash(self):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(Trainer, "run_iteration", crash)
    out = tmp_path / "run"
    assert main(["train", str(TINY_CONFIG), "--out", str(out), "eval.every=0", *QUIET]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "fastnft: error: RuntimeError: the device fell over (--debug or FASTNFT_DEBUG=1 shows the traceback)"
    ]
    with pytest.raises(RuntimeError, match="fell over"):
        main(["train", str(TINY_CONFIG), "--out", str(out), "--overwrite", "--debug", "eval.every=0", *QUIET])
