"""Every Triton kernel builds ahead of time for sm_80 and sm_90 without a GPU, with no spills."""

import os
import re
import subprocess
import sys

from fastnft_kernels.aot import all_variants


def test_kernels_compile_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fastnft_kernels.aot", "--arch", "80", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = re.findall(
        r"^sm_(\d+)\s+(\S+)\s+registers\s+(\d+)\s+spill stores (\d+) B\s+spill loads (\d+) B", result.stdout, re.M
    )
    assert len(reports) == 2 * len(all_variants())
    assert {arch for arch, *_ in reports} == {"80", "90"}
    assert all(int(stores) == 0 and int(loads) == 0 for *_, stores, loads in reports)
    assert all(0 < int(registers) <= 255 for _, _, registers, _, _ in reports)
