"""The kernel benchmark script runs on CPU and writes its results and ledger rows."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from fastnft.benchmarking import COLUMNS, append_rows, environment, measure

BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_nft_loss.py"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nft_loss_benchmark_writes_results_and_ledger(tmp_path):
    bench = load_script(BENCH_SCRIPT)
    ledger = tmp_path / "ledger.csv"
    bench.main(["--shapes", "tiny", "--out", str(tmp_path / "out"), "--ledger", str(ledger), "--device", "cpu"])

    results = json.loads((tmp_path / "out" / "nft_loss.json").read_text())
    providers = {row["provider"] for row in results["results"]}
    assert providers == {"reference", "compile"}  # Triton is measured on GPUs only
    assert all(row["median_ms"] > 0 and row["q20_ms"] <= row["q80_ms"] for row in results["results"])
    assert "| tiny (2, 4, 8, 8) | reference |" in (tmp_path / "out" / "nft_loss.md").read_text()

    with ledger.open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(tuple(row) == COLUMNS for row in rows)
    assert {row["provider"] for row in rows} == providers
    assert {row["benchmark"] for row in rows} == {"nft_loss_fwd_bwd"}
    assert all(float(row["value"]) > 0 for row in rows)


def test_ledger_appends_under_one_header_and_rejects_incomplete_rows(tmp_path):
    ledger = tmp_path / "ledger.csv"
    row = {
        **environment("cpu"),
        "benchmark": "b",
        "provider": "p",
        "shape": "1",
        "metric": "m",
        "value": 1,
        "unit": "u",
    }
    append_rows(ledger, [row])
    append_rows(ledger, [row, row])
    lines = ledger.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 4
    with pytest.raises(ValueError, match="lacks columns"):
        append_rows(ledger, [{"device": "x"}])


def test_measure_reports_ordered_quantiles():
    timing = measure(lambda: sum(range(1000)), "cpu", warmup=1, repeats=10)
    assert 0 < timing.q20_ms <= timing.median_ms <= timing.q80_ms
