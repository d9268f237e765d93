"""Ahead-of-time build of every Triton kernel for NVIDIA GPUs, with no GPU present.

    python -m fastnft_kernels.aot [--arch 80 90]

compiles each kernel variant to PTX with `triton.compile` and a `GPUTarget`, runs triton's
bundled `ptxas -v` on the PTX, prints registers and spill bytes, and exits 1 on any spill.
Run it with TRITON_INTERPRET unset: under the interpreter kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastnft_kernels import triton_nft_loss


@dataclass(frozen=True)
class KernelVariant:
    name: str
    kernel: object  # a triton.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object]


@dataclass(frozen=True)
class BuildReport:
    variant: str
    arch: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


FLOAT_SCALARS = ("beta", "kl_coef", "adv_clip_max", "eps", "inv_n", "grad_scale")


def _signature(kernel, pointer_types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Triton signature: pointers typed as given, float scalars fp32, other scalars i32."""
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointer_types:
            signature[arg] = "*" + pointer_types[arg]
        else:
            signature[arg] = "fp32" if arg in FLOAT_SCALARS else "i32"
    return signature


def _nft_loss_variants() -> list[KernelVariant]:
    dtype_pairs = [("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32"), ("fp16", "fp16")]
    variants = []
    for (velocity, data), velocity_space, has_ref in itertools.product(dtype_pairs, (False, True), (False, True)):
        pointer_types = {
            **dict.fromkeys(["v_theta_ptr", "v_old_ptr", "v_ref_ptr", "grad_ptr"], velocity),
            **dict.fromkeys(["x0_ptr", "noise_ptr"], data),
            **dict.fromkeys(["t_ptr", "r_ptr", "partials_ptr", "per_sample_ptr"], "fp32"),
        }
        flags = {"VELOCITY_SPACE": velocity_space, "HAS_REF": has_ref, "BLOCK": triton_nft_loss.GPU_BLOCK}
        label = f"{velocity}-{data}-{'velocity' if velocity_space else 'x0'}-{'ref' if has_ref else 'noref'}"
        for kernel, extra in [
            (triton_nft_loss.nft_loss_partials_kernel, {}),
            (triton_nft_loss.nft_loss_finish_kernel, {"CHUNKS_POW2": 64}),
        ]:
            constexprs = {**flags, **extra}
            signature = _signature(kernel, pointer_types, constexprs)
            variants.append(KernelVariant(f"{kernel.__name__}[{label}]", kernel, signature, constexprs))
    return variants


def all_variants() -> list[KernelVariant]:
    """Every kernel of the package in the dtype and flag combinations trainers launch."""
    return _nft_loss_variants()


def _ptxas_report(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the PTX."""
    gpu_name = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as workdir:
        source = Path(workdir) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run(
            [
                triton.knobs.nvidia.ptxas.path,
                "-v",
                f"--gpu-name={gpu_name}",
                str(source),
                "-o",
                str(source.with_suffix(".cubin")),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    log = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)), int(spills.group(2))


def build(variant: KernelVariant, arch: int) -> BuildReport:
    source = ASTSource(variant.kernel, variant.signature, variant.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    registers, stores, loads = _ptxas_report(compiled.asm["ptx"])
    return BuildReport(variant.name, arch, registers, stores, loads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    args = parser.parse_args(argv)
    reports = [build(variant, arch) for arch in args.arch for variant in all_variants()]
    for report in reports:
        print(
            f"sm_{report.arch}  {report.variant:<70} registers {report.registers:>3}  "
            f"spill stores {report.spill_store_bytes} B  spill loads {report.spill_load_bytes} B"
        )
    spilled = [r for r in reports if r.spills]
    print(f"{len(reports)} builds, {len(spilled)} with spills")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
