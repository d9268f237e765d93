"""fastnft_kernels.benchmarking (timing, environment probe, CSV ledger) and the NFT-loss benchmark
script, which runs on CPU with only torch and triton installed."""

import csv
import datetime
import importlib.util
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
import triton

from fastnft_kernels import benchmarking
from fastnft_kernels.benchmarking import COLUMNS, append_rows, environment, measure

BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_nft_loss.py"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ledger_row(**values) -> dict[str, object]:
    return {**dict.fromkeys(COLUMNS, "x"), **values}


def test_measure_times_every_repeat_in_milliseconds():
    sleep_s = 0.005
    calls = []

    def sleeper():
        start = time.perf_counter()
        time.sleep(sleep_s)
        calls.append((time.perf_counter() - start) * 1e3)

    timing = measure(sleeper, "cpu", warmup=2, repeats=9)
    assert len(calls) == 2 + 9
    timed = calls[2:]
    # Each timed sample spans one call (plus the overhead of the clock reads around it), so the
    # median lies between the fastest call and the slowest call plus a millisecond of overhead.
    assert min(timed) <= timing.median_ms <= max(timed) + 1.0
    assert timing.q20_ms >= sleep_s * 1e3  # every sample includes a full sleep


def test_ledger_rows_round_trip_under_one_header(tmp_path):
    ledger = tmp_path / "sub" / "ledger.csv"  # the directory is created
    first = [ledger_row(metric="median_ms", value="1.5"), ledger_row(metric="q20_ms", value="1.25")]
    second = [ledger_row(provider="triton", shape="2x4x8x8", value="0.5")]
    assert append_rows(ledger, first) == 2
    assert append_rows(ledger, iter(second)) == 1

    lines = ledger.read_text().splitlines()
    assert lines.count(",".join(COLUMNS)) == 1 and lines[0] == ",".join(COLUMNS)
    with ledger.open(newline="") as handle:
        assert list(csv.DictReader(handle)) == first + second


def test_ledger_rejects_missing_and_unknown_columns(tmp_path):
    ledger = tmp_path / "ledger.csv"
    with pytest.raises(ValueError, match=r"lacks columns \['torch'"):
        append_rows(ledger, [{k: v for k, v in ledger_row().items() if k != "torch"}])
    with pytest.raises(ValueError):  # csv.DictWriter(extrasaction="raise")
        append_rows(ledger, [ledger_row(extra="1")])


def test_environment_reports_versions_device_commit_and_date():
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    env = environment("cpu")
    after = datetime.datetime.now(datetime.timezone.utc)
    assert set(env) == {"device", "torch", "triton", "commit", "date"} and set(env) <= set(COLUMNS)
    assert env["torch"] == torch.__version__
    assert env["triton"] == triton.__version__
    assert env["device"] == f"cpu ({torch.get_num_threads()} threads)"
    assert before <= datetime.datetime.fromisoformat(env["date"]) <= after

    # By default the commit is that of the checkout holding the package (editable install).
    assert env["commit"].removesuffix("+dirty") == short_commit(Path(benchmarking.__file__).parent)


def test_environment_commit_is_unknown_outside_a_checkout(tmp_path):
    if short_commit(tmp_path) != "unknown":
        pytest.skip(f"{tmp_path} lies inside a git checkout")
    assert environment("cpu", checkout=tmp_path)["commit"] == "unknown"


def short_commit(directory: Path) -> str:
    """git's own answer, or 'unknown' outside a checkout or without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=directory, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() if head.returncode == 0 else "unknown"


def test_nft_loss_benchmark_writes_results_and_ledger(tmp_path):
    bench = load_script(BENCH_SCRIPT)
    ledger = tmp_path / "ledger.csv"
    bench.main(["--shapes", "tiny", "--out", str(tmp_path / "out"), "--ledger", str(ledger), "--device", "cpu"])

    results = json.loads((tmp_path / "out" / "nft_loss.json").read_text())["results"]
    assert [row["provider"] for row in results] == ["reference", "compile"]  # Triton is measured on GPUs only
    assert all(row["dims"] == [2, 4, 8, 8] and row["median_ms"] > 0 for row in results)
    assert results[0]["speedup_vs_reference"] == 1.0
    table = (tmp_path / "out" / "nft_loss.md").read_text()
    assert "| tiny (2, 4, 8, 8) | reference |" in table and "| tiny (2, 4, 8, 8) | compile |" in table

    with ledger.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    # Per provider: median, q20, q80, GB/s over minimal bytes, copy GB/s and speedup (no moved
    # bytes off the Triton path).
    assert len(rows) == 2 * 6
    assert {row["benchmark"] for row in rows} == {"nft_loss_fwd_bwd"}
    assert {row["shape"] for row in rows} == {"2x4x8x8"}
    medians = {row["provider"]: float(row["value"]) for row in rows if row["metric"] == "median_ms"}
    assert medians == pytest.approx({row["provider"]: row["median_ms"] for row in results}, rel=1e-5)
