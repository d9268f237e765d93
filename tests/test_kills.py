"""SIGKILL at chosen points of a checkpoint (docs/reliability.md, "What a stop or a kill loses"):
a `fastnft train` subprocess is paused while writing its iteration-2 checkpoint (during DCP's
write, before the rename into place, after it) and killed there; `--resume` then continues from
the last complete checkpoint, and the metrics rows (timing fields aside) and the exported weights
equal those of an uninterrupted run. benchmarks/kill_tally.py kills at random moments instead."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastnft.checkpoint import list_checkpoints
from fastnft.cli import main
from tests.helpers import TINY_CONFIG
from tests.test_reliability import rows

ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    "--iterations",
    "3",
    "eval.every=0",
    "logging.sample_grid_every=0",
    "logging.progress=false",
    "logging.tensorboard=false",
    "nft.loss_backend=torch",  # the kernel is not what this tests; the Triton interpreter is slow
]
TIMING = {"time_rollout", "time_reward", "time_train", "images_per_sec"}
PAUSED_AT = "iteration_000002"
DEADLINE = 300  # seconds for the child to reach the pause: a bound, not an expectation

# The child: `fastnft train` with one pause, where FASTNFT_KILL_POINT says, in the writing of the
# checkpoint PAUSED_AT. It writes the marker file and sleeps until the test kills it.
CHILD = f"""
import os, sys, time
from pathlib import Path

point, marker = os.environ["FASTNFT_KILL_POINT"], Path(os.environ["FASTNFT_KILL_MARKER"])


def pause():
    marker.write_text(str(os.getpid()))
    time.sleep(3600)


if point == "during":  # DCP has written the data files, not yet .metadata
    from torch.distributed.checkpoint import FileSystemWriter

    real_finish = FileSystemWriter.finish

    def finish(self, *args, **kwargs):
        if Path(str(self.path)).name == ".tmp-{PAUSED_AT}":
            pause()
        return real_finish(self, *args, **kwargs)

    FileSystemWriter.finish = finish
else:  # before or after the rename of the complete checkpoint into place
    real_rename = Path.rename

    def rename(self, target):
        ours = self.name == ".tmp-{PAUSED_AT}"
        if ours and point == "before":
            pause()
        renamed = real_rename(self, target)
        if ours and point == "after":
            pause()
        return renamed

    Path.rename = rename

from fastnft.cli import main

sys.exit(main(sys.argv[1:]))
"""


def without_timing(run: Path) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in TIMING} for row in rows(run)]


def assert_same_result(run: Path, reference: Path) -> None:
    assert without_timing(run) == without_timing(reference)
    exported, expected = (load_file(r / "export" / "pytorch_lora_weights.safetensors") for r in (run, reference))
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    assert [p.name for p in list_checkpoints(run)] == [p.name for p in list_checkpoints(reference)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run, uninterrupted."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", str(TINY_CONFIG), "--out", str(run), *ARGS]) == 0
    return run


def kill_at(point: str, run: Path, scratch: Path) -> None:
    """Starts the child, waits (bounded) until it pauses at `point`, and SIGKILLs it."""
    marker, log = scratch / "paused", scratch / "child.log"
    env = {**os.environ, "FASTNFT_KILL_POINT": point, "FASTNFT_KILL_MARKER": str(marker)}
    with log.open("w") as output:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, "train", str(TINY_CONFIG), "--out", str(run), *ARGS],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + DEADLINE
            while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert marker.exists(), f"the child did not reach {point} (exit {child.poll()}):\n{log.read_text()[-3000:]}"
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(timeout=60) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.mark.parametrize("point", ["during", "before", "after"])
def test_a_run_killed_at_a_checkpoint_resumes_to_the_uninterrupted_result(point, reference, tmp_path, capsys):
    run = tmp_path / "run"
    kill_at(point, run, tmp_path)
    temporary, final = run / "checkpoints" / f".tmp-{PAUSED_AT}", run / "checkpoints" / PAUSED_AT
    left = {
        "during": temporary.is_dir() and not (temporary / ".metadata").exists() and not final.exists(),
        "before": (temporary / ".metadata").is_file() and not final.exists(),
        "after": (final / ".metadata").is_file() and not temporary.exists(),
    }
    assert left[point], sorted(p.name for p in (run / "checkpoints").iterdir())
    assert (run / "run.lock").exists()  # the killed run's, stale now

    assert main(["train", "--resume", str(run), "logging.progress=false"]) == 0
    out = capsys.readouterr()
    expected = "iteration_000002" if point == "after" else "iteration_000001"
    assert f"resumed from {run / 'checkpoints' / expected}" in out.out and "taking over the lock" in out.err
    assert_same_result(run, reference)
    assert not temporary.exists() and not (run / "run.lock").exists()
