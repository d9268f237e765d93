#!/usr/bin/env bash
# The GPU checks: one command for a session that is lent a GPU (one H100/H200; its image has torch
# 2.11, triton 3.6 and Python 3.12, no diffusers and no network). README.md, "GPU check", says how to
# prepare and how to commit the results. In short, on the CPU machine, in the repo root:
#
#   pip download ... -d .whl -r benchmarks/gpu-wheels.txt   # the exact command is in that file
#   echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +dirty)" >.whl/COMMIT
#   OUT=/tmp/gc bash benchmarks/gpu_checks.sh --dry-run     # the same stages here: preset tiny, 2-4 min
#
# then on the GPU machine, with `.whl` carried:   bash benchmarks/gpu_checks.sh
#
# Stages, most valuable first. Each runs under its own `timeout`, cut to what is left of the whole
# budget (BUDGET_S: 360 s, 250 s in a dry run; a stage with under 30 s left is skipped), and leaves
# its results in $OUT (default runs/gpu-checks) as soon as it ends; a stage that fails or times out
# does not stop the next. $OUT ends with at most 8 files (what the device machine returns):
#   env.txt           install: which carried wheels went in, which the image already had; versions,
#                     nvidia-smi, commit (git, else the file COMMIT or .whl/COMMIT)
#   stages.txt        one line per stage: name, rc (124: timed out), seconds, limit, note
#   bench/bench.json  fastnft bench --preset sd35m --flip none --warmup 1 --repeats 3: reference beside
#                     fast, per phase and iteration, MFU, peak memory (bench.md and bench.png
#                     regenerate from it: README)
#   bench.log         its output, bench.md appended, then `fastnft plan`'s estimate of the fast path's
#                     memory: its peak_gib beside the bench's torch.cuda.max_memory_allocated
#   ledger.csv        the ledger rows of the bench, the loss-kernel benchmark and flux-dev
#   nft_loss.tar.gz   the loss-kernel benchmark: its log, nft_loss.json, nft_loss.md
#   pytest_gpu.log    pytest -m gpu (CUDA-only tests and the loss-kernel tests, compiled for real)
#   extras.tar.gz     with the time left, each stage's log and outputs: switch flips (iteration only),
#                     full fine-tuning memory with 8-bit AdamW states (torchao; train phase only),
#                     the flux-dev-512 preset (FLUX.1-dev at 512^2, rollout.groups=1)
# Settings (environment): OUT, BUDGET_S, PYTHON (default python3; .venv/bin/python in a dry run),
# SD35M_OVERRIDES (key=value overrides of the sd35m runs; default rollout.groups=1: one rollout batch
# and one micro-batch of 9, the preset's own shapes, a quarter of its work, so that the bench fits;
# set it empty for the whole preset), FLIPS (the switches to flip, comma-separated, or all), EXTRAS
# (which of flips full_ft_8bit flux_dev to run, default all three).
# Exit status: 0 when every stage that ran passed, the extras aside (best effort: stages.txt and a
# warning report them); 1 when one failed or timed out; 2 on a usage error.
set -uo pipefail # no -e: a failed stage must not stop the next one
bash -n "$0" || {
  echo "gpu_checks.sh: syntax error, nothing run" >&2
  exit 2
}

DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "gpu_checks.sh: unknown argument '$arg' (known: --dry-run, --help)" >&2
      exit 2
      ;;
  esac
done

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd) || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-checks.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 # no network there: never wait on the hub
# Only what this script writes is cleared, so a rerun into the same $OUT starts a fresh ledger.
rm -rf "$OUT"/{env.txt,stages.txt,ledger.csv,bench,bench.log,nft_loss.log,nft_loss.tar.gz,pytest_gpu.log,extras.tar.gz}

if ((DRY_RUN)); then
  MODE="dry run (CPU, preset tiny, nothing installed)"
  if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
  BUDGET_S=${BUDGET_S:-250}
  PRESET=tiny
  OVERRIDES=()
  LOSS_ARGS=(--shapes tiny --device cpu)
  FLIPS=${FLIPS:-compile} # the one flip that compiles nothing more
  #       env bench nft_loss pytest_gpu flips full_ft_8bit flux_dev plan
  LIMITS=(60 150 90 90 90 90 90 60)
else
  MODE="GPU"
  PY=${PYTHON:-python3}
  BUDGET_S=${BUDGET_S:-360}
  PRESET=sd35m
  read -r -a OVERRIDES <<<"${SD35M_OVERRIDES-rollout.groups=1}"
  LOSS_ARGS=()
  FLIPS=${FLIPS:-compile,bf16_weights,attention,rollout_cuda_graphs}
  LIMITS=(60 210 100 90 300 240 300 90)
fi
MIN_STAGE_S=${MIN_STAGE_S:-30}
EXTRAS=${EXTRAS-flips full_ft_8bit flux_dev}
EXTRAS_FAILED=""
DEADLINE=$((SECONDS + BUDGET_S))
FAILED=0
export PY OUT WORK DRY_RUN

stamp() { date -u +%H:%M:%S; }

commit_of_checkout() {
  local commit
  if commit=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || commit="$commit+dirty"
    echo "$commit"
  elif [ -s COMMIT ]; then
    head -n 1 COMMIT
  elif [ -s .whl/COMMIT ]; then
    head -n 1 .whl/COMMIT
  else
    echo unknown
  fi
}
COMMIT=$(commit_of_checkout)
export COMMIT

printf '%-14s %4s %7s %5s  %s\n' stage rc seconds limit note >"$OUT/stages.txt"
record() { # NAME RC SECONDS LIMIT NOTE
  printf '%-14s %4s %7s %5s  %s\n' "$@" >>"$OUT/stages.txt"
}

# run_stage NAME MAX_S LOG COMMAND...: COMMAND under `timeout` (MAX_S, cut to the budget left), its
# output appended to LOG; one line in stages.txt. Returns COMMAND's status.
run_stage() {
  local name=$1 max=$2 log=$3
  shift 3
  local left=$((DEADLINE - SECONDS - 5))
  local limit=$((max < left ? max : left))
  if ((limit < MIN_STAGE_S)); then
    record "$name" - 0 "$limit" "skipped: under ${MIN_STAGE_S} s of the ${BUDGET_S} s budget left"
    echo "[$(stamp)] $name: skipped (budget)"
    return 1
  fi
  echo "[$(stamp)] $name: start, limit ${limit} s: $*" | tee -a "$log"
  local began=$SECONDS rc note=""
  timeout -k 10 "$limit" "$@" </dev/null >>"$log" 2>&1
  rc=$?
  case $rc in
    0) ;;
    124 | 137) note="timed out" ;;
    *) note="failed" ;;
  esac
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
  record "$name" "$rc" "$((SECONDS - began))" "$limit" "$note"
  echo "[$(stamp)] $name: rc $rc after $((SECONDS - began)) s $note; the log ends:" | tee -a "$log"
  tail -n 12 "$log" | sed 's/^/    /'
  return "$rc"
}

pack() { # ARCHIVE DIR: DIR's files as $OUT/ARCHIVE, replaced whole
  [ -n "$(ls -A "$2" 2>/dev/null)" ] || return 0
  tar czf "$WORK/$1" -C "$2" . && mv -f "$WORK/$1" "$OUT/$1"
}

install_wheels() { # the carried wheels the image lacks (or has too old for fastnft), then fastnft
  shopt -s nullglob
  local wheels=(.whl/*.whl)
  echo "${#wheels[@]} carried wheels in .whl"
  "$PY" - "$WORK/to_install" <<'EOF' || return 1
import pathlib, re, sys, tomllib
from importlib import metadata

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
declared = [*project["dependencies"], *project["optional-dependencies"].get("torchao", [])]
declared.append("setuptools>=77")  # pyproject's license string (PEP 639); older ones fail `pip install -e .`
key = lambda name: re.sub(r"[-_.]+", "-", name).lower()
wanted = {key(r.name): r for r in map(Requirement, declared)}
chosen = []
for wheel in sorted(pathlib.Path(".whl").glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    need = wanted.get(key(name))
    if have is not None and (need is None or need.specifier.contains(have, prereleases=True)):
        print(f"keep    {name} {have} (the image's; the carried {version} unused)")
        continue
    print(f"install {name} {version} (the image's: {have or 'absent'})")
    chosen.append(str(wheel))
pathlib.Path(sys.argv[1]).write_text("".join(f"{path}\n" for path in chosen))
EOF
  if [ -s "$WORK/to_install" ]; then
    mapfile -t wheels <"$WORK/to_install"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "${wheels[@]}" || return 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e ./kernels -e . || return 1
  echo "pip check, fastnft's dependencies only:"
  "$PY" -m pip check 2>&1 | grep -iE 'fastnft|diffusers|transformers|peft|torchao|huggingface|tokenizers|safetensors' || echo "  none broken"
}

env_report() {
  echo "mode:   ${MODE}"
  echo "date:   $(date -u +%FT%TZ)"
  echo "commit: ${COMMIT}"
  echo "host:   $(uname -srm), $(nproc) CPUs"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'EOF'
import importlib, os, sys

print("python", sys.version.split()[0], sys.executable)
missing = []
for name in ("torch", "triton", "diffusers", "transformers", "peft", "torchao", "safetensors", "tokenizers",
             "huggingface_hub", "accelerate", "numpy", "bitsandbytes", "flash_attn", "fastnft_kernels", "fastnft"):
    try:
        module = importlib.import_module(name)
        print(f"{name:16} {getattr(module, '__version__', '(no __version__)')}  {os.path.dirname(module.__file__ or '')}")
    except Exception as error:  # noqa: BLE001 - report every kind of import failure
        print(f"{name:16} MISSING: {type(error).__name__}: {error}")
        missing.append(name)
import torch

print("cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
required = {"torch", "diffusers", "transformers", "peft", "fastnft_kernels", "fastnft"}
required |= {"triton"} if torch.cuda.is_available() else set()
sys.exit(f"required but missing: {sorted(required & set(missing))}" if required & set(missing) else 0)
EOF
}
export -f install_wheels env_report
export MODE

echo "gpu_checks: ${MODE}, budget ${BUDGET_S} s, python ${PY}, out ${OUT}, commit ${COMMIT}"

# (a) install (GPU only) and the environment
if ((DRY_RUN)); then
  record install - 0 0 "dry run: nothing installed"
else
  run_stage install 90 "$OUT/env.txt" bash -c install_wheels
fi
run_stage env "${LIMITS[0]}" "$OUT/env.txt" bash -c env_report

# (b) fastnft bench: reference beside fast, no switch flips
run_stage bench "${LIMITS[1]}" "$OUT/bench.log" \
  "$PY" -m fastnft bench --preset "$PRESET" --flip none --warmup 1 --repeats 3 \
  --out "$OUT/bench" --ledger "$OUT/ledger.csv" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
if [ -f "$OUT/bench/bench.md" ]; then # the 8-file limit: bench.md into the log, bench.png dropped
  { printf '\n== bench.md\n' && cat "$OUT/bench/bench.md"; } >>"$OUT/bench.log"
fi
rm -f "$OUT/bench/bench.md" "$OUT/bench/bench.png"

# (b2) the memory plan of the bench's fast path beside what the bench measured, into bench.log:
# fastnft plan's peak_gib (an estimate, traced on the meta device) and torch.cuda.max_memory_allocated
plan_vs_bench() {
  "$PY" - "$OUT/bench/bench.json" "$PRESET" <<'EOF'
import json, sys
from pathlib import Path

from fastnft.config import load_config
from fastnft.plan import Planner, resolve_source, table

bench = json.loads(Path(sys.argv[1]).read_text())
overrides = [*bench["overrides"], *bench.get("path_overrides", {}).get("fast", [])]
config = load_config(resolve_source(sys.argv[2]), overrides)
plan = Planner(lambda message: print(f"plan: {message} ...", flush=True)).plan(config, 1)
print(table(plan, f"{sys.argv[2]}, the bench's fast path"))
measured = (bench.get("max_memory_allocated_gib") or {}).get("fast")
shown = f"{measured:.3f} GiB" if measured is not None else "n/a (no CUDA device)"
print(f"memory, preset {sys.argv[2]}, fast path: plan peak_gib {plan.peak / 2**30:.3f} (estimate) | "
      f"torch.cuda.max_memory_allocated {shown}")
EOF
}
export -f plan_vs_bench
export PRESET
if [ -f "$OUT/bench/bench.json" ]; then
  run_stage plan "${LIMITS[7]}" "$OUT/bench.log" bash -c plan_vs_bench
  grep -h '^memory, preset' "$OUT/bench.log" || true
else
  record plan - 0 0 "skipped: no bench.json"
fi

# (c) the loss-kernel benchmark (moving from benchmarks/ to kernels/benchmarks/)
loss_script=benchmarks/bench_nft_loss.py
[ -f kernels/benchmarks/bench_nft_loss.py ] && loss_script=kernels/benchmarks/bench_nft_loss.py
mkdir -p "$WORK/nft_loss"
run_stage nft_loss "${LIMITS[2]}" "$OUT/nft_loss.log" \
  "$PY" "$loss_script" --out "$WORK/nft_loss" --ledger "$OUT/ledger.csv" ${LOSS_ARGS[@]+"${LOSS_ARGS[@]}"}
if [ -f "$OUT/nft_loss.log" ]; then
  mv "$OUT/nft_loss.log" "$WORK/nft_loss/" && pack nft_loss.tar.gz "$WORK/nft_loss"
fi

# (d) the tests that need a CUDA device (marker gpu; on a CPU they skip)
run_stage pytest_gpu "${LIMITS[3]}" "$OUT/pytest_gpu.log" \
  "$PY" -m pytest -m gpu -q -rs --strict-markers --continue-on-collection-errors -p no:cacheprovider --durations=5

# (e) with the time left, each packed into extras.tar.gz as it ends; best effort: their failures
# are in stages.txt and a warning, but leave the exit status to (a)-(d)
extra() { # NAME MAX_S COMMAND...
  local name=$1 max=$2 failed=$FAILED
  shift 2
  case " $EXTRAS " in
    *" $name "*) ;;
    *)
      record "$name" - 0 0 "skipped: not in EXTRAS"
      return 0
      ;;
  esac
  mkdir -p "$WORK/extras"
  run_stage "$name" "$max" "$WORK/extras/$name.log" "$@" || EXTRAS_FAILED="$EXTRAS_FAILED $name"
  FAILED=$failed
  pack extras.tar.gz "$WORK/extras"
}
flip_args=(--flip "$FLIPS")
[ "$FLIPS" = all ] && flip_args=()
extra flips "${LIMITS[4]}" \
  "$PY" -m fastnft bench --preset "$PRESET" --phases iteration "${flip_args[@]}" --warmup 1 --repeats 3 \
  --out "$WORK/extras/flips" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
extra full_ft_8bit "${LIMITS[5]}" \
  "$PY" -m fastnft bench --preset "$PRESET" --phases train --flip none --warmup 1 --repeats 2 \
  --out "$WORK/extras/full_ft_8bit" lora.enabled=false optim.name=adamw8bit-torchao ${OVERRIDES[@]+"${OVERRIDES[@]}"}
if [ -f configs/flux-dev-512.yaml ]; then
  # FLUX.1-dev at 512^2, one rollout batch (9 images, about 9 PFLOP an iteration): the 1024^2
  # preset's iteration is 3.5x that, too long for this budget.
  flux_preset=flux-dev-512
  flux_overrides=(rollout.groups=1)
  if ((DRY_RUN)); then
    flux_preset=tiny
    flux_overrides=()
  fi
  extra flux_dev "${LIMITS[6]}" \
    "$PY" -m fastnft bench --preset "$flux_preset" --flip none --warmup 1 --repeats 2 --out "$WORK/extras/flux_dev" \
    --ledger "$OUT/ledger.csv" ${flux_overrides[@]+"${flux_overrides[@]}"}
else
  record flux_dev - 0 0 "skipped: no configs/flux-dev-512.yaml"
fi

# The ledger's and bench.json's commit: "unknown" where the checkout has no git (the device's copy).
if [ "$COMMIT" != unknown ]; then
  "$PY" - "$OUT" <<'EOF' || echo "gpu_checks: could not fill in the commit" >&2
import csv, json, os, pathlib, sys

out, commit = pathlib.Path(sys.argv[1]), os.environ["COMMIT"]
ledger = out / "ledger.csv"
if ledger.is_file():
    with ledger.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    if any(row.get("commit") == "unknown" for row in rows):
        for row in rows:
            row["commit"] = commit if row.get("commit") == "unknown" else row["commit"]
        with ledger.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
bench = out / "bench" / "bench.json"
if bench.is_file():
    result = json.loads(bench.read_text())
    if result.get("commit") == "unknown":
        result["commit"] = commit
        bench.write_text(json.dumps(result, indent=2) + "\n")
EOF
fi

files=$(find "$OUT" -type f | wc -l)
deep=$(find "$OUT" -mindepth 3 -type f | wc -l)
echo "== $OUT: ${files} files (the device returns at most 8, none deeper than \$OUT/a/b/)"
(cd "$OUT" && find . -type f -printf '%8s  %P\n' | sort -k2)
if ((files > 8 || deep > 0)); then
  echo "gpu_checks: too many files or too deep under $OUT" >&2
  FAILED=$((FAILED + 1))
fi
echo "== stages.txt (${SECONDS} s in all, budget ${BUDGET_S} s)"
cat "$OUT/stages.txt"
[ -z "$EXTRAS_FAILED" ] || echo "gpu_checks: WARNING: extras that failed or ran out of time:$EXTRAS_FAILED" >&2
((FAILED == 0))
