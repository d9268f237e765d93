"""The bad-input matrix (docs/reliability.md, "What is validated at start"): one table of bad inputs
to `fastnft train`, `sample` and `eval`. Each must exit 2 with exactly one stderr line naming the
field or file, no traceback, and leave the victim, a finished run that the command points at with
`--out RUN --overwrite` or `--resume RUN`, byte for byte as it was: every refusal comes before
the first write. Cases that damage the victim first (its prompts, its checkpoints, its lock) damage
a copy of it, hashed after the damage."""

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastnft.cli import main
from fastnft.run import train
from tests.helpers import TINY_CONFIG, tiny_config
from tests.test_reliability import hashes

SECRET = "sk-fake-0123456789-do-not-log"


@dataclass(frozen=True)
class Case:
    """argv with {run} (the victim), {files} (the bad files) and {config} (configs/tiny.yaml)
    filled in; `names` must appear in the error line, `hidden` must not appear in stderr."""

    argv: str
    names: str
    damage: Callable[[Path], None] | None = None
    hidden: str | None = None


def overwrite(*overrides: str) -> str:
    """A fresh run that would replace the victim, with these overrides."""
    return " ".join(["train {config} --out {run} --overwrite", *overrides])


def reward(name: str, **options: object) -> str:
    """A `rewards=` override with one reward, as JSON (which YAML reads) without spaces."""
    return "rewards=" + json.dumps([{"name": name, "options": options}], separators=(",", ":"))


def zero_checkpoints(run: Path) -> None:
    for data in (run / "checkpoints").glob("*/__0_0.distcp"):
        data.write_bytes(bytes(data.stat().st_size))


def lock_by_this_process(run: Path) -> None:
    (run / "run.lock").write_text(f"{os.getpid()}\n")


def garbage_first_metrics_line(run: Path) -> None:
    metrics = run / "metrics.jsonl"
    metrics.write_text("{garbage\n" + metrics.read_text())


CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- prompt files
    "prompts: empty file": Case(overwrite("prompts.train={files}/empty.txt"), "prompts.train: {files}/empty.txt"),
    "prompts: blank lines only": Case(overwrite("prompts.train={files}/blank.txt"), "{files}/blank.txt: holds no"),
    "prompts: empty jsonl": Case(overwrite("prompts.train={files}/empty.jsonl"), "{files}/empty.jsonl"),
    "prompts: invalid jsonl": Case(overwrite("prompts.train={files}/broken.jsonl"), "broken.jsonl line 2: not JSON"),
    "prompts: jsonl without prompt": Case(overwrite("prompts.train={files}/noprompt.jsonl"), "noprompt.jsonl line 1"),
    "prompts: a line not an object": Case(overwrite("prompts.train={files}/array.jsonl"), "array.jsonl line 1"),
    "prompts: metadata not an object": Case(overwrite("prompts.train={files}/meta.jsonl"), "meta.jsonl line 2"),
    "prompts: prompt not a string": Case(overwrite("prompts.train={files}/number.jsonl"), "number.jsonl line 1"),
    "prompts: non-UTF-8 txt": Case(overwrite("prompts.train={files}/latin1.txt"), "latin1.txt line 2: not UTF-8"),
    "prompts: non-UTF-8 jsonl": Case(overwrite("prompts.train={files}/latin1.jsonl"), "latin1.jsonl line 1"),
    "prompts: bad eval file": Case(overwrite("prompts.eval={files}/broken.jsonl"), "prompts.eval: {files}/broken"),
    "prompts: wrong suffix": Case(overwrite("prompts.train={files}/prompts.csv"), "prompts.train: must be a .txt"),
    "prompts: missing file": Case(overwrite("prompts.train={files}/gone.txt"), "prompts.train: no such file"),
    "prompts: unset": Case(overwrite("prompts.train=null"), "prompts.train: set a .txt"),
    # ---------------------------------------------------------------- config files
    "config: binary file": Case(
        "train {files}/binary.yaml --out {run} --overwrite", "{files}/binary.yaml is not UTF-8"
    ),
    "config: not YAML": Case("train {files}/broken.yaml --out {run} --overwrite", "{files}/broken.yaml is not valid"),
    "config: a list": Case("train {files}/list.yaml --out {run} --overwrite", "{files}/list.yaml must hold a mapping"),
    "config: missing file": Case("train {files}/gone.yaml --out {run} --overwrite", "config: no such file"),
    "config: two files": Case("train {config} {files}/list.yaml --out {run} --overwrite", "config: give one"),
    "config: unknown key": Case("train {files}/unknown.yaml --out {run} --overwrite", "nope: unknown key"),
    # ---------------------------------------------------------------- overrides
    "override: no key": Case(overwrite("=5"), "=5: overrides are written key=value"),
    "override: bad YAML": Case(overwrite("nft.beta=[1"), "nft.beta: cannot read value"),
    "override: out of range": Case(overwrite("nft.beta=-1"), "nft.beta: must be > 0"),
    "override: unknown key": Case(overwrite("nft.betta=1"), "nft.betta: unknown key"),
    "override: inside a value": Case(overwrite("rollout.groups.x=1"), "rollout.groups: cannot override"),
    "override: wrong type": Case(overwrite("rollout.groups=two"), "rollout.groups: expected int"),
    "override: nan": Case(overwrite("nft.beta=.nan"), "nft.beta: must be a finite number"),
    "override: zero iterations": Case(overwrite("iterations=0"), "iterations: must be > 0"),
    "override: batch does not divide": Case(overwrite("rollout.batch_size=3"), "rollout.batch_size: must divide"),
    "override: bad literal": Case(overwrite("rollout.sampler=heun"), "rollout.sampler: must be one of"),
    # ---------------------------------------------------------------- optim, compile
    "optim.betas: one number": Case(overwrite("optim.betas=[0.9]"), "optim.betas: must hold exactly 2"),
    "optim.betas: out of range": Case(overwrite("optim.betas=[0.9,1.5]"), "optim.betas[1]: must be in [0, 1)"),
    "optim.betas: not a list": Case(overwrite("optim.betas=0.9"), "optim.betas: expected a list"),
    "optim.betas: a string": Case(overwrite("optim.betas=[0.9,high]"), "optim.betas[1]: expected float"),
    "optim.name: unknown": Case(overwrite("optim.name=sgd"), "optim.name: must be one of"),
    "optim.max_skipped_steps: zero": Case(overwrite("optim.max_skipped_steps=0"), "optim.max_skipped_steps: must"),
    "compile.backend: unknown": Case(overwrite("compile.backend=nonesuch"), "compile.backend: unknown backend"),
    # ---------------------------------------------------------------- lora
    "lora.target_modules: no match": Case(overwrite("lora.target_modules=[nonesuch]"), "lora.target_modules: ["),
    "lora.target_modules: unsupported": Case(overwrite("lora.target_modules=[norm]"), "lora.target_modules: ["),
    "lora.rank: zero": Case(overwrite("lora.rank=0"), "lora.rank: must be > 0"),
    # ---------------------------------------------------------------- quantized base (tests/test_quantize.py)
    "quantize: full fine-tuning": Case(
        overwrite("model.quantize=int8", "lora.enabled=false"), "model.quantize: int8 quantization needs LoRA"
    ),
    "quantize: nf4 under fsdp2": Case(
        overwrite("model.quantize=nf4", "dist.strategy=fsdp2"), "model.quantize: nf4 with dist.strategy fsdp2"
    ),
    "quantize: int8 under fsdp2": Case(
        overwrite("model.quantize=int8", "dist.strategy=fsdp2"), "model.quantize: int8 with dist.strategy fsdp2"
    ),
    "quantize: unknown method": Case(overwrite("model.quantize=int4"), "model.quantize: must be one of"),
    "quantize: fp8 on a CPU": Case(overwrite("model.quantize=fp8", "device=cpu"), "model.quantize: fp8 (torchao"),
    "quantize_text: fp8 on a CPU": Case(overwrite("model.quantize_text=fp8", "device=cpu"), "model.quantize_text: fp8"),
    # ---------------------------------------------------------------- model files
    "init_lora: a text file": Case(overwrite("model.init_lora={files}/lora.txt"), "model.init_lora: {files}/lora.txt"),
    "init_lora: empty": Case(overwrite("model.init_lora={files}/empty.safetensors"), "shorter than a header"),
    "init_lora: header too long": Case(overwrite("model.init_lora={files}/long.safetensors"), "does not fit"),
    "init_lora: header a list": Case(overwrite("model.init_lora={files}/list.safetensors"), "not a JSON object"),
    "init_lora: header not JSON": Case(overwrite("model.init_lora={files}/junk.safetensors"), "header is not JSON"),
    "init_lora: missing": Case(overwrite("model.init_lora={files}/gone.safetensors"), "model.init_lora: no such"),
    "init_lora: no LoRA weight": Case(overwrite("model.init_lora={files}/nolora.safetensors"), "holds no LoRA"),
    "component_paths: not a string": Case(overwrite("model.component_paths.vae=3"), "component_paths.vae: expected"),
    "component_paths: not a mapping": Case(overwrite("model.component_paths=[a]"), "component_paths: expected a"),
    "component_paths: missing dir": Case(overwrite("model.component_paths.vae={files}/gone"), "component_paths.vae"),
    "component_paths: empty dir": Case(overwrite("model.component_paths.vae={files}/empty"), "{files}/empty is empty"),
    "model.path: empty dir": Case(overwrite("model.preset=null", "model.path={files}/empty"), "model.path: {files}"),
    "model.path: missing dir": Case(overwrite("model.preset=null", "model.path={files}/gone"), "model.path: no such"),
    "model.path: broken index": Case(
        overwrite("model.preset=null", "model.kind=auto", "model.path={files}/broken_index"), "model.path: {files}"
    ),
    "model.path: index a list": Case(
        overwrite("model.preset=null", "model.kind=auto", "model.path={files}/list_index"), "does not hold a JSON"
    ),
    "model.path: unknown pipeline": Case(
        overwrite("model.preset=null", "model.kind=auto", "model.path={files}/unknown_index"), "holds a FooPipeline"
    ),
    "model.path: no index": Case(
        overwrite("model.preset=null", "model.kind=auto", "model.path={files}/no_index"), "model_index.json not found"
    ),
    "model.path: does not load": Case(
        overwrite("model.preset=null", "model.path={files}/no_index"), "model.path: {files}/no_index does not load"
    ),
    "model.preset: unknown": Case(overwrite("model.preset=nonesuch"), "model.preset: unknown preset"),
    "model.kind: against the preset": Case(overwrite("model.kind=flux"), "model.kind: preset tiny-sd3"),
    # ---------------------------------------------------------------- reward options
    "reward: unknown name": Case(overwrite(reward("nonesuch")), "rewards: unknown reward 'nonesuch'"),
    "reward: empty list": Case(overwrite("rewards=[]"), "rewards: must not be empty"),
    "reward: unknown option": Case(overwrite(reward("jpeg_compressibility", quality=90)), "bad options (quality)"),
    "reward: local model missing": Case(overwrite(reward("pickscore")), "reward 'pickscore': set options.path"),
    "http: no url": Case(overwrite(reward("http")), "reward 'http': set options.url"),
    "http: negative retries": Case(overwrite(reward("http", url="http://127.0.0.1:9", retries=-1)), "options.retries"),
    "http: retries a string": Case(overwrite(reward("http", url="http://127.0.0.1:9", retries="x")), "options.retries"),
    "http: zero timeout": Case(overwrite(reward("http", url="http://127.0.0.1:9", timeout=0)), "options.timeout"),
    "http: zero batch": Case(overwrite(reward("http", url="http://127.0.0.1:9", batch_size=0)), "options.batch_size"),
    "http: negative backoff": Case(overwrite(reward("http", url="http://127.0.0.1:9", backoff=-1)), "options.backoff"),
    "http: headers in plain text": Case(
        overwrite(reward("http", url="http://127.0.0.1:9", headers={"Authorization": SECRET})),
        "options.headers would be written",
        hidden=SECRET,
    ),
    "http: a typo next to a header": Case(
        overwrite(reward("http", url="http://127.0.0.1:9", header={"Authorization": SECRET})),
        "bad options (header, url)",
        hidden=SECRET,
    ),
    "http: headers_env unset": Case(
        overwrite(reward("http", url="http://127.0.0.1:9", headers_env={"Authorization": "FASTNFT_NOT_SET"})),
        "headers_env names FASTNFT_NOT_SET",
    ),
    "http: headers_env a list": Case(
        overwrite(reward("http", url="http://127.0.0.1:9", headers_env=["A"])), "options.headers_env maps"
    ),
    # ---------------------------------------------------------------- remote URLs
    "url: ftp": Case(overwrite(reward("http", url="ftp://127.0.0.1/score")), "options.url must be an http"),
    "url: file": Case(overwrite(reward("http", url="file:///etc/passwd")), "it has scheme 'file'"),
    "url: no scheme": Case(overwrite(reward("http", url="127.0.0.1:8000/score")), "options.url must be"),
    "url: no host": Case(overwrite(reward("http", url="http:///score")), "options.url must be an http"),
    "url: credentials": Case(
        overwrite(reward("http", url=f"http://user:{SECRET}@127.0.0.1:9")), "holds credentials", hidden=SECRET
    ),
    "url: judge not http": Case(overwrite(reward("judge", url="ws://127.0.0.1:9", model="m")), "reward 'judge'"),
    "judge: no model": Case(overwrite(reward("judge", url="http://127.0.0.1:9")), "options.model"),
    "judge: bad pattern": Case(
        overwrite(reward("judge", url="http://127.0.0.1:9", model="m", pattern="Score:([0-9")), "options.pattern is"
    ),
    "judge: pattern without group": Case(
        overwrite(reward("judge", url="http://127.0.0.1:9", model="m", pattern="Score")), "needs a group"
    ),
    "judge: template field": Case(
        overwrite(reward("judge", url="http://127.0.0.1:9", model="m", template="{nope}")), "options.template"
    ),
    "judge: api_key_env unset": Case(
        overwrite(reward("judge", url="http://127.0.0.1:9", model="m", api_key_env="FASTNFT_NOT_SET")),
        "api_key_env names FASTNFT_NOT_SET",
    ),
    "judge: zero max_tokens": Case(
        overwrite(reward("judge", url="http://127.0.0.1:9", model="m", max_tokens=0)), "options.max_tokens"
    ),
    # ---------------------------------------------------------------- --resume targets
    "resume: missing dir": Case("train --resume {files}/gone", "--resume: {files}/gone holds no config.yaml"),
    "resume: a file": Case("train --resume {files}/lora.txt", "--resume: {files}/lora.txt holds no config.yaml"),
    "resume: not a run": Case("train --resume {files}/empty", "holds no config.yaml"),
    "resume: another config": Case("train --resume {run} nft.beta=0.5", "differs from the run's in nft.beta"),
    "resume: with --overwrite": Case("train --resume {run} --overwrite", "--overwrite: a resumed run keeps"),
    "resume: with another --out": Case("train --resume {run} --out {files}/elsewhere", "--out: a resumed run"),
    "resume: no checkpoint": Case(
        "train --resume {run}", "--resume: {run} has no checkpoint", lambda run: shutil.rmtree(run / "checkpoints")
    ),
    "resume: damaged checkpoints": Case("train --resume {run} --iterations 3", "does not load", zero_checkpoints),
    "resume: locked": Case("train --resume {run}", f"in use by process {os.getpid()}", lock_by_this_process),
    "resume: bad metrics line": Case(
        "train --resume {run} --iterations 3", "metrics: {run}/metrics.jsonl line 1", garbage_first_metrics_line
    ),
    "resume: binary config.yaml": Case(
        "train --resume {run}", "{run}/config.yaml is not UTF-8", lambda run: (run / "config.yaml").write_bytes(b"\xff")
    ),
    "resume: config.yaml not YAML": Case(
        "train --resume {run}",
        "{run}/config.yaml is not valid YAML",
        lambda run: (run / "config.yaml").write_text("a: [\n"),
    ),
    "resume: its prompts damaged": Case(
        "train --resume {run}",
        "prompts.train: {run}/prompts.txt",
        lambda run: (run / "prompts.txt").write_text("\n\n"),
    ),
    # ---------------------------------------------------------------- --out targets
    "out: holds a run": Case("train {config} --out {run}", "--out: {run} holds a run already"),
    "out: a file": Case("train {config} --out {files}/lora.txt", "--out: {files}/lora.txt is a file"),
    "out: under a file": Case("train {config} --out {files}/lora.txt/run", "cannot create {files}/lora.txt/run"),
    "out: locked": Case("train {config} --out {run} --overwrite", "in use by process", lock_by_this_process),
    # ---------------------------------------------------------------- sample and eval
    "sample: bad prompt file": Case("sample {run} --prompts {files}/broken.jsonl", "--prompts: {files}/broken.jsonl"),
    "sample: missing prompt file": Case("sample {run} --prompts {files}/gone.txt", "--prompts: no such file"),
    "sample: not a run": Case("sample {files}/empty --prompts a", "checkpoint: {files}/empty is neither"),
    "eval: empty prompt file": Case("eval {run} --prompts {files}/empty.txt", "--prompts: {files}/empty.txt"),
    "eval: no checkpoint": Case(
        "eval {run}", "checkpoint: {run} has no checkpoint", lambda run: shutil.rmtree(run / "checkpoints")
    ),
    "eval: damaged checkpoints": Case("eval {run}", "iteration_000001 does not load", zero_checkpoints),
}


def write_bad_files(files: Path) -> None:
    """The bad files the cases name, under `files`."""
    texts = {
        "empty.txt": "",
        "blank.txt": "\n   \n\t\n",
        "empty.jsonl": "\n",
        "broken.jsonl": '{"prompt": "a red circle"}\n{"prompt": "a blue\n',
        "noprompt.jsonl": '{"text": "a red circle"}\n',
        "array.jsonl": '["a red circle"]\n',
        "meta.jsonl": '{"prompt": "a"}\n{"prompt": "b", "metadata": [1, 2]}\n',
        "number.jsonl": '{"prompt": 3}\n',
        "prompts.csv": "a red circle\n",
        "broken.yaml": "seed: [0\nmodel: {\n",
        "list.yaml": "- seed\n",
        "unknown.yaml": "nope: 1\n",
        "lora.txt": "not a safetensors file\n",
    }
    for name, text in texts.items():
        (files / name).write_text(text)
    (files / "latin1.txt").write_bytes(b"a red circle\ncaf\xe9\n")
    (files / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    (files / "binary.yaml").write_bytes(bytes(range(256)))
    (files / "empty.safetensors").write_bytes(b"")
    (files / "long.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    (files / "list.safetensors").write_bytes(struct.pack("<Q", 3) + b"[1]")
    (files / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    save_file({"unrelated.weight": torch.zeros(2)}, str(files / "nolora.safetensors"))
    (files / "empty").mkdir()
    for name, index in {
        "broken_index": "{",
        "list_index": "[1]",
        "unknown_index": '{"_class_name": "FooPipeline"}',
    }.items():
        (files / name).mkdir()
        (files / name / "model_index.json").write_text(index)
    (files / "no_index").mkdir()
    (files / "no_index" / "README.md").write_text("no model here\n")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml for 1 iteration (a checkpoint, a metrics row, export/), its train prompts
    copied into the run so that a case can damage them."""
    root = tmp_path_factory.mktemp("victim")
    prompts = root / "run" / "prompts.txt"
    prompts.parent.mkdir()
    shutil.copy(Path(tiny_config().prompts.train), prompts)
    train(tiny_config(["eval.every=0", f"prompts.train={prompts}"], iterations=1), root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    files = tmp_path_factory.mktemp("files")
    write_bad_files(files)
    return files


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_is_one_line_and_leaves_the_run_as_it_was(name, finished_run, files, tmp_path, capsys):
    case = CASES[name]
    run = Path(shutil.copytree(finished_run, tmp_path / "run", symlinks=True))
    # The copy's config names its own prompt file, so that damaging it leaves the original alone.
    config_text = (run / "config.yaml").read_text().replace(str(finished_run), str(run))
    (run / "config.yaml").write_text(config_text)
    if case.damage is not None:
        case.damage(run)
    before, files_before = hashes(run), hashes(files)

    def fill(text: str) -> str:
        return text.replace("{run}", str(run)).replace("{files}", str(files)).replace("{config}", str(TINY_CONFIG))

    argv = [fill(item) for item in case.argv.split(" ")]
    quiet = ["logging.progress=false", "logging.tensorboard=false"] if argv[0] == "train" else []
    capsys.readouterr()
    assert main([*argv, *quiet]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fastnft: error: ") and fill(case.names) in lines[0], lines[0]
    if case.hidden is not None:
        assert case.hidden not in err
    assert hashes(run) == before
    assert hashes(files) == files_before and not (files / "elsewhere").exists()


def test_the_matrix_holds_at_least_60_cases():
    assert len(CASES) >= 60
