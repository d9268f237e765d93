"""A training run on disk: run directory, cadences (eval, sample grids, checkpoints), resume,
and a clean stop (target reached, SIGTERM or Ctrl-C) that always leaves a checkpoint.

Run directory: config.yaml (resolved), run.json, metrics.jsonl, tensorboard/, samples/,
checkpoints/iteration_NNNNNN/ (DCP), export/ (the EMA weights, loadable by diffusers).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastnft.checkpoint import export_weights, latest_checkpoint, load_checkpoint, save_checkpoint
from fastnft.config import Config, dump_yaml, to_dict
from fastnft.distributed import any_rank, barrier
from fastnft.metrics import MetricsLog, NullLog, write_run_info
from fastnft.report import before_after, plot_curves, summary
from fastnft.trainer import Trainer
from fastnft.visual import save_grid


class StopRequest:
    """Set by SIGTERM or a first Ctrl-C: the run finishes its iteration, checkpoints, and exits."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is not None

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        def on_signal(number, frame):
            self.reason = signal.Signals(number).name
            if number == signal.SIGINT:  # a second Ctrl-C interrupts at once
                signal.signal(signal.SIGINT, signal.default_int_handler)
            print(f"\n{self.reason}: finishing this iteration, then checkpointing", flush=True)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def grid_indices(trainer: Trainer) -> list[int]:
    """The evaluation images of the grids: the first image of up to 16 evaluation prompts."""
    return [prompt * trainer.config.eval.images_per_prompt for prompt in range(min(16, len(trainer.eval_prompts)))]


def evaluate_and_log(trainer: Trainer, log: MetricsLog | NullLog, run_dir: Path) -> dict[str, float]:
    if trainer.eval_prompts is None:
        return {}
    metrics, images = trainer.evaluator(trainer.eval_prompts, keep=grid_indices(trainer))
    log.append({"iteration": trainer.iteration, **metrics})
    save_eval_grid(trainer, images, run_dir / "samples" / f"eval_{trainer.iteration:06d}.png")
    return metrics


def save_eval_grid(trainer: Trainer, images, path: Path) -> None:
    """Rank 0 draws the grid images with their prompts."""
    if trainer.world.is_main:
        save_grid(images, trainer.eval_prompts.prompts[: len(images)], path)


def evaluate_with_guidance(trainer: Trainer, log: MetricsLog | NullLog, run_dir: Path) -> dict[str, float]:
    """The untrained model with each CFG scale: eval_<key>_cfg_<scale>, and eval_<key>_cfg the best
    over the scales. These rows never carry the CFG-free keys."""
    scales = trainer.config.eval.cfg_scales
    if trainer.eval_prompts is None or not scales:
        return {}
    row: dict[str, float] = {}
    for scale in scales:
        metrics, images = trainer.evaluator(trainer.eval_prompts, guidance_scale=scale, keep=grid_indices(trainer))
        row.update({f"{key}_cfg_{scale:g}": value for key, value in metrics.items()})
        save_eval_grid(trainer, images, run_dir / "samples" / f"eval_{trainer.iteration:06d}_cfg_{scale:g}.png")
        for key, value in metrics.items():
            row[f"{key}_cfg"] = max(row.get(f"{key}_cfg", value), value)
    log.append({"iteration": trainer.iteration, **row})
    return row


def train(config: Config, run_dir: Path, *, resume: bool = False, argv: list[str] = ()) -> Trainer:
    """Trains until config.iterations (the total target) or a stop request. Under torchrun every
    rank runs this; rank 0 alone writes the records, grids and exports."""
    run_dir = Path(run_dir)
    trainer = Trainer(config)
    main = trainer.world.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(trainer.world)
    log: MetricsLog | NullLog = NullLog()
    if main:
        wandb_config = to_dict(config) if config.logging.wandb else None
        log = MetricsLog(run_dir, tensorboard=config.logging.tensorboard, wandb_config=wandb_config)
    if resume:
        latest = latest_checkpoint(run_dir)
        if latest is not None:
            load_checkpoint(trainer.checkpoint_parts(), latest)
            say(trainer, f"resumed from {latest} at iteration {trainer.iteration}")
        log.truncate_after(trainer.iteration)
    if main:
        (run_dir / "config.yaml").write_text(dump_yaml(config))
        write_run_info(run_dir, trainer.device, list(argv), processes=trainer.world.size)

    started = time.perf_counter()
    last_checkpoint = trainer.iteration if resume else None
    stop = StopRequest()
    try:
        with stop.installed():
            if trainer.iteration == 0 and config.eval.at_start:
                evaluate_and_log(trainer, log, run_dir)
                evaluate_with_guidance(trainer, log, run_dir)
            while trainer.iteration < config.iterations and not any_rank(trainer.world, bool(stop)):
                row = trainer.run_iteration()
                log.append(row)
                say(trainer, _summary(row, config.iterations))
                iteration = trainer.iteration
                grid_due = config.logging.sample_grid_every and iteration % config.logging.sample_grid_every == 0
                if main and grid_due:
                    samples, prompts = trainer.last_rollout
                    save_grid(
                        trainer.model.decode(samples), prompts, run_dir / "samples" / f"rollout_{iteration:06d}.png"
                    )
                last = iteration == config.iterations
                if config.eval.every and (iteration % config.eval.every == 0 or last):
                    evaluate_and_log(trainer, log, run_dir)
                if config.checkpoint.every and iteration % config.checkpoint.every == 0:
                    checkpoint(trainer, run_dir)
                    last_checkpoint = iteration
        if main:
            write_report(trainer, log.rows(), run_dir, time.perf_counter() - started)
    finally:
        # After a crash mid-iteration the state is half-updated: keep the last checkpoint instead.
        if last_checkpoint != trainer.iteration and not trainer.in_iteration:
            path = checkpoint(trainer, run_dir)
            say(trainer, f"checkpoint: {path}")
        export_weights(trainer.policies, trainer.model, trainer.world, run_dir / "export")
        log.close()
    say(
        trainer,
        f"stopped at iteration {trainer.iteration} after {time.perf_counter() - started:.1f} s"
        + (f" ({stop.reason})" if stop else ""),
    )
    return trainer


def checkpoint(trainer: Trainer, run_dir: Path) -> Path:
    parts = trainer.checkpoint_parts()
    return save_checkpoint(parts, run_dir, trainer.iteration, trainer.world, trainer.config.checkpoint.keep_last)


def say(trainer: Trainer, message: str) -> None:
    """Progress lines come from rank 0 only."""
    if trainer.world.is_main:
        print(message, flush=True)


def write_report(trainer: Trainer, rows: list[dict], run_dir: Path, wall_seconds: float) -> None:
    """curves.png, samples/before_after.png (first and last evaluation grids) and the summary."""
    plot_curves(rows, run_dir / "curves.png")
    grids = sorted((run_dir / "samples").glob("eval_[0-9][0-9][0-9][0-9][0-9][0-9].png"))
    if len(grids) >= 2:
        labels = (f"iteration {int(grids[0].stem[5:])}", f"iteration {int(grids[-1].stem[5:])}")
        before_after(grids[0], grids[-1], run_dir / "samples" / "before_after.png", labels)
    print(summary(rows, wall_seconds), flush=True)


def _summary(row: dict, target: int) -> str:
    return (
        f"iteration {row['iteration']}/{target}  reward {row['reward_mean']:.4f}  loss {row['loss']:.4f}  "
        f"grad_norm {row['grad_norm']:.3g}  eta {row['eta']:.3f}  {row['images_per_sec']:.2f} img/s"
    )
