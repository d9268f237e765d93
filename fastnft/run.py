"""A training run on disk: run directory, cadences (eval, sample grids, checkpoints), resume,
and a clean stop (target reached, SIGTERM or Ctrl-C) that always leaves a checkpoint.

Run directory: config.yaml (resolved), run.json, metrics.jsonl, tensorboard/, samples/,
checkpoints/iteration_NNNNNN/ (DCP), export/ (the EMA weights, loadable by diffusers), and
run.lock while a run writes it. docs/reliability.md states what a run promises on disk.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.checkpoint.stateful import Stateful

from fastnft.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    error_line,
    export_weights,
    list_checkpoints,
    load_latest,
    save_checkpoint,
    warn,
)
from fastnft.config import Config, ConfigError, dump_yaml, to_dict
from fastnft.distributed import World, any_rank, init_world
from fastnft.metrics import MetricsLog, NullLog, truncate_rows, write_run_info
from fastnft.report import before_after, plot_curves, summary
from fastnft.selection import BestEvaluation
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


RUN_FILES = (
    "config.yaml",
    "run.json",
    "metrics.jsonl",
    "curves.png",
    "tensorboard",
    "samples",
    "checkpoints",
    "export",
    "eval",
    "wandb",
)
"""What a run (and `fastnft eval` / `sample` on it) writes in its directory: --overwrite removes these."""


def is_run_dir(path: Path) -> bool:
    return any((Path(path) / name).exists() for name in ("config.yaml", "metrics.jsonl", CHECKPOINT_DIR))


class RunLock:
    """RUN/run.lock names the process (pid and host) writing the run, so that a second run on the
    same directory refuses to start. Created with O_CREAT | O_EXCL, which only one process can
    win; a lock whose process is gone (a killed run) is taken over with a warning."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "run.lock"
        self.held = False

    def live_owner(self) -> str | None:
        """'process PID[ on HOST]' when a live process holds the lock, else None."""
        try:
            pid_text, _, host = self.path.read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return None  # no lock, or one its writer was killed before it could fill in
        where = f" on {host}" if host and host != socket.gethostname() else ""
        if pid <= 0 or (not where and not _alive(pid)):
            return None
        return f"process {pid}{where}"  # another host's process cannot be checked: taken as alive

    def acquire(self, flag: str) -> None:
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_take_over(flag)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            return
        raise ConfigError(f"{flag}: could not take the lock {self.path}")

    def check(self, flag: str) -> None:
        """Refuses, without writing, when a live process holds the lock."""
        if self.path.exists():
            self._refuse_or_take_over(flag, take_over=False)

    def _refuse_or_take_over(self, flag: str, take_over: bool = True) -> None:
        owner = self.live_owner()
        if owner is not None:
            raise ConfigError(
                f"{flag}: {self.path.parent} is in use by {owner} (lock {self.path}; "
                "delete it if that process is not a fastnft run)"
            )
        if take_over:
            # Two processes taking over the same stale lock at once could both win; starting
            # two runs on one directory within that instant is not a case worth a second lock.
            warn(f"{self.path}: taking over the lock of a run that is gone")
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses, before anything is written, a directory this run must not start in."""
    flag = "--resume" if resume else "--out"
    if resume and overwrite:
        raise ConfigError("--overwrite: a resumed run keeps its files; drop --overwrite or --resume")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{flag}: {run_dir} is a file, not a directory")
    existing = next(path for path in (run_dir, *run_dir.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag}: cannot create {run_dir}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: cannot write in {run_dir}: {existing} is not writable")
    RunLock(run_dir).check(flag)
    if resume and not list_checkpoints(run_dir):
        raise ConfigError(
            f"--resume: {run_dir} has no checkpoint to resume from; its files are kept "
            f"(start again with --out {run_dir} --overwrite)"
        )
    if not resume and not overwrite and is_run_dir(run_dir):
        raise ConfigError(
            f"--out: {run_dir} holds a run already; continue it with --resume {run_dir}, or replace it with --overwrite"
        )


def open_run_dir(run_dir: Path, lock: RunLock, *, resume: bool, overwrite: bool) -> None:
    """Checks the directory, creates it, takes its lock and, with overwrite, removes the old run's
    files (only once the lock is ours: never under a live run)."""
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    flag = "--resume" if resume else "--out"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{flag}: cannot create {run_dir}: {error.strerror or error}") from None
    lock.acquire(flag)
    if overwrite:
        try:
            for name in RUN_FILES:
                path = run_dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        except OSError as error:
            lock.release()
            raise ConfigError(f"--overwrite: cannot remove the old run in {run_dir}: {error}") from None


_NAMES_A_FIELD = re.compile(r"^[a-z_][\w.\[\]-]*: ")  # "lora.target_modules: ...", "rewards: ..."


def startup_error(error: Exception, config: Config) -> ConfigError:
    """An error raised while loading (the model, its adapters, rewards) as one line naming the
    field: the message's own when it starts with one, else model.path (or model, for a preset)."""
    message = str(error).strip()
    if _NAMES_A_FIELD.match(message):
        return ConfigError(message)
    where = f"model.path: {config.model.path} does not load" if config.model.path else "model: does not build"
    return ConfigError(f"{where}: {error_line(error)}")


def build_trainer(config: Config) -> Trainer:
    """The Trainer (model, policies, rewards, optimizer: everything that loads), or a ConfigError
    naming the field."""
    try:
        return Trainer(config)
    except ConfigError:
        raise
    except Exception as error:
        raise startup_error(error, config) from error


def _on_rank_zero(world: World, flag: str, step: Callable[[], None]) -> None:
    """Runs `step` on rank 0; its ConfigError is raised on every rank."""
    refusal: ConfigError | None = None
    if world.is_main:
        try:
            step()
        except ConfigError as error:
            refusal = error
    if any_rank(world, refusal is not None):
        raise refusal or ConfigError(f"{flag}: refused on rank 0")


def train(
    config: Config, run_dir: Path, *, resume: bool = False, overwrite: bool = False, argv: list[str] = ()
) -> Trainer:
    """Trains until config.iterations (the total target) or a stop request. Under torchrun every
    rank runs this; rank 0 alone writes the records, grids and exports. A directory that holds a
    run already needs resume (continue it) or overwrite (replace it).

    A start that fails leaves the directory as it was: its checks come first, then everything
    that loads (the trainer), and only then is it created, locked and, with overwrite, emptied."""
    run_dir = Path(run_dir)
    world = init_world(config)
    flag = "--resume" if resume else "--out"
    _on_rank_zero(world, flag, lambda: check_run_dir(run_dir, resume=resume, overwrite=overwrite))
    if config.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb: needs wandb: pip install 'fastnft[wandb]'")
    trainer = build_trainer(config)
    lock = RunLock(run_dir)
    _on_rank_zero(world, flag, lambda: open_run_dir(run_dir, lock, resume=resume, overwrite=overwrite))
    try:
        return _train(trainer, run_dir, resume=resume, argv=argv)
    finally:
        lock.release()


def _train(trainer: Trainer, run_dir: Path, *, resume: bool, argv: list[str]) -> Trainer:
    config = trainer.config
    main = trainer.world.is_main
    best = BestEvaluation(config.eval.select, config.eval.patience)
    parts = {**trainer.checkpoint_parts(), "best": best}
    if resume:
        # Falls back past checkpoints that do not load; CheckpointError (exit 2) when none does,
        # before anything in the run directory changes.
        latest = load_latest(parts, run_dir)
        if latest is None:
            raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from")
        say(trainer, f"resumed from {latest} at iteration {trainer.iteration}")
        if main:
            # Rows after the checkpoint are redone; so is the start-of-run evaluation of a run
            # resumed at iteration 0 (stopped during it), whose rows would otherwise repeat.
            truncate_rows(run_dir / "metrics.jsonl", trainer.iteration if trainer.iteration > 0 else -1)
    log: MetricsLog | NullLog = NullLog()
    if main:
        wandb_config = to_dict(config) if config.logging.wandb else None
        log = MetricsLog(run_dir, tensorboard=config.logging.tensorboard, wandb_config=wandb_config)
        (run_dir / "config.yaml").write_text(dump_yaml(config))
        write_run_info(run_dir, trainer.device, list(argv), processes=trainer.world.size)
        record_best(run_dir, best)

    started = time.perf_counter()
    last_checkpoint = trainer.iteration if resume else None
    stop = StopRequest()
    # The handlers stay until export/ is written: a SIGTERM during the final evaluation, the
    # report or the export only asks for the stop that is already under way.
    with stop.installed():
        try:
            if trainer.iteration == 0 and config.eval.at_start:
                keep_if_best(trainer, best, evaluate_and_log(trainer, log, run_dir), run_dir)
                evaluate_with_guidance(trainer, log, run_dir)
            while trainer.iteration < config.iterations and not any_rank(trainer.world, bool(stop)):
                if best.out_of_patience:
                    say(trainer, f"eval.patience: {best.since} evaluations without a better {best.key}; stopping")
                    break
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
                    keep_if_best(trainer, best, evaluate_and_log(trainer, log, run_dir), run_dir)
                if config.checkpoint.every and iteration % config.checkpoint.every == 0:
                    checkpoint(trainer, run_dir, parts)
                    last_checkpoint = iteration
            if main:
                write_report(trainer, log.rows(), run_dir, time.perf_counter() - started)
        except BaseException as error:
            # After a crash mid-iteration the state is half-updated, and a checkpoint that could
            # not be written would fail again: keep the last checkpoint instead.
            retry = not trainer.in_iteration and not isinstance(error, CheckpointError)
            close_run(trainer, run_dir, log, parts, save=retry and last_checkpoint != trainer.iteration, failing=True)
            raise
        close_run(trainer, run_dir, log, parts, save=last_checkpoint != trainer.iteration, failing=False)
    say(
        trainer,
        f"stopped at iteration {trainer.iteration} after {time.perf_counter() - started:.1f} s"
        + (f" ({stop.reason})" if stop else ""),
    )
    return trainer


def close_run(
    trainer: Trainer,
    run_dir: Path,
    log: MetricsLog | NullLog,
    parts: dict[str, Stateful],
    *,
    save: bool,
    failing: bool,
) -> None:
    """The closing checkpoint, then export/ even when that checkpoint failed. While another error
    stops the run (failing), their own failures are warnings, so that error is the one reported;
    otherwise the first failure is raised once both were tried."""
    problems: list[CheckpointError] = []
    try:
        if save:
            try:
                say(trainer, f"checkpoint: {checkpoint(trainer, run_dir, parts)}")
            except CheckpointError as error:
                problems.append(error)
        export = run_dir / "export"
        try:
            export_weights(trainer.policies, trainer.model, trainer.world, export)
        except Exception as error:
            problems.append(CheckpointError(f"export: cannot write {export}: {error_line(error)}"))
    finally:
        log.close()
    for problem in problems[0 if failing else 1 :]:
        warn(str(problem))
    if problems and not failing:
        raise problems[0]


def checkpoint(trainer: Trainer, run_dir: Path, parts: dict[str, Stateful]) -> Path:
    """The trainer's parts and the run's own (the best evaluation) as one checkpoint."""
    return save_checkpoint(parts, run_dir, trainer.iteration, trainer.world, trainer.config.checkpoint.keep_last)


def keep_if_best(trainer: Trainer, best: BestEvaluation, metrics: dict[str, float], run_dir: Path) -> None:
    """export/best: the EMA weights of the best evaluation so far by eval.select, recorded in
    run.json's "best"."""
    if not metrics or not best.update(trainer.iteration, metrics):
        return
    export_weights(trainer.policies, trainer.model, trainer.world, run_dir / "export" / "best")
    if trainer.world.is_main:
        record_best(run_dir, best)
        say(trainer, f"best {best.key} so far: {best.value:.4g} at iteration {best.iteration} (export/best)")


def record_best(run_dir: Path, best: BestEvaluation) -> None:
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text())
    info["best"] = best.record()
    info_path.write_text(json.dumps(info, indent=2) + "\n")


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
        + (f"  skipped {row['skipped_steps']} non-finite step(s)" if row.get("skipped_steps") else "")
    )
