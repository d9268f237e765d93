"""The bench's outputs: bench.json, bench.md (tables), bench.png (speed-ups) and ledger rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastnft.bench.runner import SD35M_FLOP_SHARES


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(result))
    plot(result, out / "bench.png")


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# fastnft bench: preset `{result['preset']}` on {result['device']} (commit {result['commit']})",
        "",
        "| phase | reference | fast | speed-up | unit | compile s (fast) |",
        "|---|---|---|---|---|---|",
    ]
    for phase, row in result["phases"].items():
        compile_s = result["compile_s"][phase]["fast"]
        lines.append(
            f"| {phase} | {row['reference']:.3g} | {row['fast']:.3g} | {row['speedup']:.2f}x | {row['unit']} | "
            f"{compile_s:.1f} |"
        )
    peaks = result.get("max_memory_allocated_gib")
    if peaks:
        lines += [
            "",
            f"Peak GPU memory (torch.cuda.max_memory_allocated, GiB): "
            f"reference {peaks['reference']:.2f}, fast {peaks['fast']:.2f}",
        ]
    if result.get("switch_speedups"):
        lines += ["", "| switch | in the fast path | iteration time with it flipped / fast |", "|---|---|---|"]
        lines += [
            f"| {name} | {'yes' if row['in_fast_path'] else 'no'} | {row['time_ratio_flipped']:.2f}x |"
            for name, row in result["switch_speedups"].items()
        ]
    shares = result["flop_shares"]
    lines += ["", "| FLOP share | this preset | SD3.5-M reference |", "|---|---|---|"]
    lines += [f"| {name} | {shares[name]:.1%} | {SD35M_FLOP_SHARES[name]:.1%} |" for name in SD35M_FLOP_SHARES]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speedups = {name: row["time_ratio_flipped"] for name, row in (result.get("switch_speedups") or {}).items()}
    figure, axes = plt.subplots(1, 2 if speedups else 1, figsize=(11 if speedups else 6, 3.6), squeeze=False)
    phases = list(result["phases"])
    ratio = [result["phases"][p]["speedup"] for p in phases]
    axes[0][0].bar(phases, ratio, color="tab:green")
    axes[0][0].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    axes[0][0].set_ylabel("fast / reference throughput")
    axes[0][0].set_title(f"{result['preset']} on {result['device']}")
    if speedups:
        axes[0][1].barh(list(speedups), list(speedups.values()), color="tab:blue")
        axes[0][1].axvline(1.0, color="gray", linestyle="--", linewidth=1)
        axes[0][1].set_xlabel("iteration time, switch flipped / fast path (> 1: the fast path's choice pays)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def ledger_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    context = {k: result[k] for k in ("device", "torch", "triton", "commit", "date")}
    benchmark = f"bench_{result['preset']}"
    rows = []
    for phase, row in result["phases"].items():
        for path in ("reference", "fast"):
            rows.append(
                {
                    **context,
                    "benchmark": benchmark,
                    "provider": path,
                    "shape": phase,
                    "metric": "throughput",
                    "value": f"{row[path]:.6g}",
                    "unit": row["unit"],
                }
            )
    for name, row in (result.get("switch_speedups") or {}).items():
        rows.append(
            {
                **context,
                "benchmark": benchmark,
                "provider": f"fast-flipped-{name}",
                "shape": "iteration",
                "metric": "time_ratio_flipped",
                "value": f"{row['time_ratio_flipped']:.4g}",
                "unit": "x",
            }
        )
    return rows
