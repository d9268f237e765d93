"""Curves of several runs side by side: held-out accuracy, the rollout samples' norm and the
training reward per iteration, read from each run's metrics.jsonl.

    python experiments/compare_runs.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def series(rows: list[dict], key: str, window: int = 1) -> tuple[list[int], list[float]]:
    """(iterations, values) of the rows holding `key`, as a trailing mean over `window` rows."""
    points = [(row["iteration"], row[key]) for row in rows if row.get(key) is not None]
    values = [v for _, v in points]
    windows = [values[max(0, i - window + 1) : i + 1] for i in range(len(values))]
    return [x for x, _ in points], [sum(w) / len(w) for w in windows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    args = parser.parse_args()
    panels = [
        ("eval_accuracy", "held-out strict accuracy", 1),
        ("x0_norm", "rollout mean x0^2 (10-it. mean)", 10),
        ("reward_mean", "training reward (10-it. mean)", 10),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for spec in args.runs:
        label, directory = spec.split("=", 1)
        rows = [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]
        for axis, (key, title, window) in zip(axes, panels, strict=True):
            axis.plot(*series(rows, key, window), label=label, marker="o" if window == 1 else None, markersize=3)
            axis.set_title(title)
            axis.set_xlabel("iteration")
            axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
