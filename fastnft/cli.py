"""The command line:

    fastnft train [CONFIG] [--out DIR [--overwrite]] [--iterations N] [--resume DIR] [key=value ...]
    fastnft sample RUN_OR_CHECKPOINT --prompts FILE_OR_TEXT [--cfg S] [--out DIR]
    fastnft eval RUN_OR_CHECKPOINT [--prompts FILE] [--out DIR]
    fastnft pretrain shapes [--out DIR] [--steps N] ...
    fastnft bench --preset NAME [--out DIR] [--ledger PATH] [--phases ...] [key=value ...]
    fastnft plan CONFIG_OR_PRESET [key=value ...] [--processes N] [--gpu-memory GIB] [--json]

Configuration errors, and anything that fails while a command loads (a model that does not
load, a bad prompt file), print one line naming the field or file and exit with code 2; any other
failure prints one line and exits with code 1. `--debug` (anywhere on the line) or
FASTNFT_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from fastnft.config import Config, ConfigError, load_config, to_dict
from fastnft.prompts import PromptFileError, PromptSet

EXIT_CONFIG_ERROR = 2
EXIT_FAILURE = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastnft", description="DiffusionNFT training.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (or FASTNFT_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (or resume) a run")
    train.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] key=value",
        help="YAML config file (optional) and dotted overrides, e.g. nft.beta=0.1, in any order among the options",
    )
    train.add_argument("--out", type=Path, help="run directory (default runs/<config name>)")
    train.add_argument("--iterations", type=int, help="total number of iterations to reach")
    train.add_argument("--resume", type=Path, help="continue the run in this directory")
    train.add_argument(
        "--overwrite", action="store_true", help="replace the run that --out holds (its files are removed first)"
    )

    sample = commands.add_parser("sample", help="generate images with a run's EMA weights")
    sample.add_argument("checkpoint", type=Path, help="a run directory or one of its checkpoints")
    sample.add_argument("--prompts", required=True, help="a .txt/.jsonl prompt file, or a prompt")
    sample.add_argument("--cfg", type=float, default=None, help="guidance scale (default eval.guidance_scale)")
    sample.add_argument("--out", type=Path, help="output directory (default RUN/samples/sample)")

    commands.add_parser("bench", help="throughput: the reference path beside the fast path (see fastnft bench -h)")
    plan = commands.add_parser(
        "plan",
        help="estimate a run's GPU memory per process without allocating it (docs/plan.md)",
        description="Builds the run's models on the meta device, traces one rollout batch and one training "
        "step, and prints an ESTIMATE of the memory each process needs, in GiB (2^30 bytes).",
    )
    plan.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG_OR_PRESET key=value",
        help="a YAML config file or a bench preset (sd35m, flux-dev, ...), then dotted overrides",
    )
    plan.add_argument("--processes", type=int, default=1, help="processes (GPUs) the run is spread over")
    plan.add_argument("--gpu-memory", type=float, help="GiB per GPU: says whether the run fits, and what would help")
    plan.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    pretrain = commands.add_parser("pretrain", help="pretrain an embedded task's base model", add_help=False)
    pretrain.add_argument("task", choices=["shapes"])
    pretrain.add_argument("task_arguments", nargs=argparse.REMAINDER, help="see fastnft pretrain shapes --help")

    evaluate = commands.add_parser("eval", help="evaluate a run's EMA weights on prompts")
    evaluate.add_argument("checkpoint", type=Path, help="a run directory or one of its checkpoints")
    evaluate.add_argument("--prompts", type=Path, help="prompt file (default prompts.eval of the run)")
    evaluate.add_argument("--out", type=Path, help="output directory (default RUN/eval)")
    return parser


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The optional CONFIG is the one item without '='."""
    files = [item for item in args.items if "=" not in item]
    if len(files) > 1:
        raise ConfigError(f"config: give one config file, got {', '.join(files)}")
    return (files[0] if files else None), [item for item in args.items if "=" in item]


def _changed_fields(saved: dict, requested: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(requested)):
        a, b = saved.get(key), requested.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_fields(a, b, name + ".")
        elif a != b and name != "iterations":
            changed.append(name)
    return changed


def _resolve_train_config(args: argparse.Namespace) -> tuple[Config, Path, bool]:
    config_path, overrides = _split_config_and_overrides(args)
    if args.iterations is not None:
        overrides = [*overrides, f"iterations={args.iterations}"]
    if args.resume is not None and args.overwrite:
        raise ConfigError("--overwrite: a resumed run keeps its files; drop --overwrite or --resume")
    if args.resume is None:
        config = load_config(config_path or default_config_path(), overrides)
        name = Path(config_path).stem if config_path else "default"
        return config, args.out or Path("runs") / name, False
    saved_path = args.resume / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume: {args.resume} holds no config.yaml (not a fastnft run directory)")
    saved = load_config(saved_path)
    config = load_config(config_path or saved_path, overrides)
    changed = _changed_fields(to_dict(saved), to_dict(config))
    if changed:
        raise ConfigError(f"--resume: the config differs from the run's in {', '.join(changed)}")
    if args.out is not None and args.out.resolve() != args.resume.resolve():
        raise ConfigError("--out: a resumed run writes into its --resume directory")
    return config, args.resume, True


def default_config_path() -> Path:
    """The embedded default run's config, shipped as package data."""
    from importlib.resources import files

    return Path(str(files("fastnft.configs") / "default.yaml"))


def _run_dir_of(checkpoint: Path) -> tuple[Path, Path | None]:
    """(run directory, the checkpoint named, if one is) for a run directory or a checkpoint
    directory inside one."""
    from fastnft.checkpoint import CHECKPOINT_DIR

    checkpoint = checkpoint.resolve()
    if checkpoint.parent.name == CHECKPOINT_DIR:
        return checkpoint.parent.parent, checkpoint
    if not (checkpoint / "config.yaml").is_file():
        raise ConfigError(f"checkpoint: {checkpoint} is neither a run directory nor a checkpoint")
    return checkpoint, None


def _load_for_inference(checkpoint: Path, prompts: PromptSet, *, with_rewards: bool):
    """A named checkpoint loads as it is; a run directory loads its newest checkpoint that reads
    back (falling back past damaged ones with a warning)."""
    from fastnft.checkpoint import list_checkpoints
    from fastnft.inference import load_evaluator

    run_dir, named = _run_dir_of(checkpoint)
    if named is None and not list_checkpoints(run_dir):
        raise ConfigError(f"checkpoint: {run_dir} has no checkpoint yet")
    config = load_config(run_dir / "config.yaml")
    try:
        loaded = load_evaluator(config, named or run_dir, prompts, with_rewards=with_rewards)
    except ConfigError:
        raise
    except Exception as error:  # the model or a reward does not load: one line naming it
        from fastnft.run import startup_error

        raise startup_error(error, config) from error
    return (config, run_dir, *loaded)


def _prompt_set(text_or_file: str | Path) -> PromptSet:
    path = Path(text_or_file)
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise ConfigError(f"--prompts: no such file {path}")
        try:
            return PromptSet.load(path)
        except PromptFileError as error:
            raise ConfigError(f"--prompts: {error}") from None
    return PromptSet([str(text_or_file)], [{}])


def command_sample(args: argparse.Namespace) -> int:
    from fastnft.visual import save_gif, save_grid, save_strip, to_pil

    prompts = _prompt_set(args.prompts)
    config, run_dir, evaluator, world, _ = _load_for_inference(args.checkpoint, prompts, with_rewards=False)
    guidance = config.eval.guidance_scale if args.cfg is None else args.cfg
    out = args.out or run_dir / "samples" / "sample"
    images = evaluator.images(prompts, guidance_scale=guidance)
    if not world.is_main:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        if image.ndim == 4:  # a video [3, F, H, W]: its frame strip and a GIF
            save_strip(image, out / f"{index:04d}.png")
            save_gif(image, out / f"{index:04d}.gif")
        else:
            to_pil(image).save(out / f"{index:04d}.png")
    save_grid(images, prompts.prompts, out / "grid.png")
    print(f"wrote {len(images)} {'videos' if images.ndim == 5 else 'images'} to {out}")
    return 0


def command_eval(args: argparse.Namespace) -> int:
    run_dir, _ = _run_dir_of(args.checkpoint)
    prompt_file = args.prompts or load_config(run_dir / "config.yaml").prompts.eval
    if prompt_file is None:
        raise ConfigError("--prompts: the run has no prompts.eval; name a prompt file")
    prompts = _prompt_set(prompt_file)
    _, run_dir, evaluator, world, iteration = _load_for_inference(args.checkpoint, prompts, with_rewards=True)
    metrics, _ = evaluator(prompts, keep=[])
    if not world.is_main:
        return 0
    out = args.out or run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"iteration": iteration, **metrics}, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


def command_plan(args: argparse.Namespace) -> int:
    from fastnft.plan import run_plan

    source, overrides = _split_config_and_overrides(args)
    if source is None:
        raise ConfigError("CONFIG_OR_PRESET: name a config file or a bench preset, e.g. fastnft plan sd35m")
    return run_plan(source, overrides, processes=args.processes, gpu_memory=args.gpu_memory, as_json=args.json)


def _one_line(message: str) -> str:
    """A message on one line (YAML's errors, for one, span several)."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """The CLI boundary: every error leaves it as one line on stderr (with the traceback only
    under --debug or FASTNFT_DEBUG=1) and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FASTNFT_DEBUG", "0") not in ("", "0")
    argv = [item for item in argv if item != "--debug"]
    try:
        return _command(argv)
    except ConfigError as error:
        if debug:
            traceback.print_exc()
        print(f"fastnft: error: {_one_line(str(error))}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Exception as error:
        if debug:
            raise
        from fastnft.checkpoint import error_line

        hint = "--debug or FASTNFT_DEBUG=1 shows the traceback"
        print(f"fastnft: error: {_one_line(error_line(error))} ({hint})", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        from fastnft.distributed import close_world

        close_world()  # under torchrun


def _command(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        from fastnft.bench import main as bench

        return bench(argv[1:])
    if argv[:2] == ["pretrain", "shapes"]:
        from fastnft.shapes.pretrain import main as pretrain_shapes

        return pretrain_shapes(argv[2:])
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)  # overrides may follow options
    if args.command in ("train", "plan"):
        args.items += [item for item in unknown if not item.startswith("-")]
    unknown = [item for item in unknown if item.startswith("-") or args.command not in ("train", "plan")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "train":
        from fastnft.models import check_model_rules
        from fastnft.run import train

        config, run_dir, resume = _resolve_train_config(args)
        check_model_rules(config)  # before anything is written
        train(config, run_dir, resume=resume, overwrite=args.overwrite, argv=argv)
        return 0
    if args.command == "plan":
        return command_plan(args)
    if args.command == "sample":
        return command_sample(args)
    return command_eval(args)


if __name__ == "__main__":
    sys.exit(main())
