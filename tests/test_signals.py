"""A run sent SIGTERM mid-iteration finishes the iteration, checkpoints, exits 0, and resumes."""

import json
import os
import signal
import subprocess
import sys
import time

from fastnft.checkpoint import latest_checkpoint
from fastnft.cli import main
from tests.helpers import TINY_CONFIG


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    options = ["--out", str(run), "--iterations", "500", "checkpoint.every=0", "eval.every=0"]
    command = [sys.executable, "-m", "fastnft", "train", str(TINY_CONFIG), *options, "logging.progress=false"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no iteration finished in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "SIGTERM" in output

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    stopped_at = rows[-1]["iteration"]
    assert 1 <= stopped_at < 500
    assert latest_checkpoint(run).name == f"iteration_{stopped_at:06d}"
    quiet = ["logging.progress=false", "checkpoint.every=0", "eval.every=0"]
    assert main(["train", "--resume", str(run), "--iterations", str(stopped_at + 1), *quiet]) == 0
    assert json.loads(metrics.read_text().splitlines()[-1])["iteration"] == stopped_at + 1
