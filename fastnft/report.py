"""End-of-run pictures and summary: reward and evaluation curves, before/after grids, and a
closing summary of the evaluation metrics (untrained, untrained with CFG, trained)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont


def plot_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Training reward per iteration, and every CFG-free eval_* mean per evaluation, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = [r for r in rows if "reward_mean" in r]
    evaluations = [r for r in rows if "eval_reward_mean" in r]
    if not training and not evaluations:
        return None
    eval_keys = sorted({k for r in evaluations for k in r if k.startswith("eval_")})
    guided = next((r for r in rows if any(k.endswith("_cfg") for k in r)), None)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    if training:
        axes[0].plot([r["iteration"] for r in training], [r["reward_mean"] for r in training], label="reward_mean")
        axes[0].set_title("training rollouts (old policy)")
    for key in eval_keys:
        points = [(r["iteration"], r[key]) for r in evaluations if r.get(key) is not None]
        axes[1].plot(*zip(*points, strict=True), marker="o", label=key)
        if guided is not None and f"{key}_cfg" in guided:
            color = axes[1].lines[-1].get_color()  # the same colour as the metric's curve
            axes[1].axhline(guided[f"{key}_cfg"], linestyle="--", color=color, label=f"{key} untrained, best CFG")
    axes[1].set_title("held-out evaluation (EMA weights, no CFG)")
    for axis in axes:
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def before_after(before: Path, after: Path, path: Path, labels: tuple[str, str]) -> Path:
    """Two evaluation grids (same prompts and seeds) side by side, each under its label."""
    images = [Image.open(before).convert("RGB"), Image.open(after).convert("RGB")]
    header = 20
    width = sum(i.width for i in images) + 10
    sheet = Image.new("RGB", (width, header + max(i.height for i in images)), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for image, label in zip(images, labels, strict=True):
        draw.text((x + 4, 4), label, fill="black", font=ImageFont.load_default())
        sheet.paste(image, (x, header))
        x += image.width + 10
    sheet.save(path)
    return Path(path)


def summary(rows: list[dict[str, Any]], wall_seconds: float) -> str:
    """Untrained CFG-free, untrained with the best CFG scale, and trained CFG-free values of each
    evaluation metric, and the wall time."""
    evaluations = [r for r in rows if "eval_reward_mean" in r]
    guided = next((r for r in rows if "eval_reward_mean_cfg" in r), None)
    lines = [f"wall time {wall_seconds / 60:.1f} min"]
    if evaluations:
        first, last = evaluations[0], evaluations[-1]
        for key in sorted(k for k in first if k.startswith("eval_")):
            parts = [f"iteration {first['iteration']}: {first[key]:.3f}"]
            if guided is not None and f"{key}_cfg" in guided:
                parts.append(f"iteration {guided['iteration']} with CFG (best scale): {guided[f'{key}_cfg']:.3f}")
            if last is not first:
                parts.append(f"iteration {last['iteration']}: {last[key]:.3f}")
            lines.append(f"{key}: " + ", ".join(parts))
    return "\n".join(lines)
