"""Forward + backward of the NFT loss: the reference code's eager expression, torch.compile of
the torch path, and the fused Triton kernel, side by side in one process.

    python kernels/benchmarks/bench_nft_loss.py [--out DIR] [--ledger PATH] [--shapes ...] [--device ...]

Reports the median and 20/80 % quantiles, and bandwidth two ways: over the minimal bytes (read
every input once, write the gradient once) for every provider, and over the bytes the Triton
path actually moves (both passes read the inputs; backward reads and writes the gradient),
against a device-to-device copy measured in the same run. Inputs: bf16 velocities and data,
with the reference velocity and kl_coef = 1e-4 as in the reference recipe. On a CPU the Triton
provider is skipped (the interpreter measures nothing useful). Needs only torch (and triton on
a GPU): it imports fastnft_kernels, never fastnft.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from fastnft_kernels import nft_loss, nft_loss_torch, triton_available
from fastnft_kernels.benchmarking import append_rows, environment, measure

SHAPES = {
    "tiny": (2, 4, 8, 8),  # seconds on any machine: for checking that the script works
    "sd35m-b9": (9, 16, 64, 64),
    "sd35m-b64": (64, 16, 64, 64),
    "flux-b9": (9, 4096, 64),
    "flux-b64": (64, 4096, 64),
}
INPUTS = ("v_theta", "v_old", "x0", "noise", "v_ref")
LOSS_OPTIONS = dict(beta=1.0, kl_coef=1e-4, adv_clip_max=5.0, loss_space="x0", eps=1e-5)


def make_inputs(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator, device=device, dtype=dtype) for name in INPUTS}
    tensors["v_theta"].requires_grad_(True)
    tensors["t"] = torch.rand(shape[0], generator=generator, device=device).clamp(min=0.01)
    tensors["r"] = torch.rand(shape[0], generator=generator, device=device)
    return tensors


def providers(device: torch.device) -> dict[str, object]:
    """name -> loss function of the inputs (each returns the scalar loss)."""

    def reference(**inputs):  # the reference code computes the adaptive weights in float64
        return nft_loss_torch(**inputs, **LOSS_OPTIONS, weight_dtype=torch.float64).loss

    compiled_torch_path = torch.compile(lambda **inputs: nft_loss_torch(**inputs, **LOSS_OPTIONS).loss, dynamic=False)
    found = {"reference": reference, "compile": compiled_torch_path}  # reference first: the baseline
    if device.type == "cuda" and triton_available():
        found["triton"] = lambda **inputs: nft_loss(**inputs, **LOSS_OPTIONS, backend="triton").loss
    return found


def forward_backward(loss_fn, inputs: dict[str, torch.Tensor]):
    def step():
        inputs["v_theta"].grad = None
        loss_fn(**inputs).backward()

    return step


def copy_bandwidth(num_bytes: int, device: torch.device) -> float:
    """GB/s of a device-to-device copy of num_bytes (read + write counted)."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    timing = measure(lambda: target.copy_(source), device)
    return 2 * num_bytes / timing.median_ms / 1e6


def run(shapes: list[str], device: torch.device, dtype: torch.dtype) -> list[dict[str, object]]:
    results = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        inputs = make_inputs(shape, device, dtype)
        tensor_bytes = math.prod(shape) * inputs["v_theta"].element_size()
        minimal_bytes = (len(INPUTS) + 1) * tensor_bytes  # read each input once, write the gradient
        # pass 1 and pass 2 each read every input; pass 2 writes the gradient; backward reads and
        # writes it (grad * grad_output)
        triton_bytes = 2 * len(INPUTS) * tensor_bytes + 3 * tensor_bytes
        copy_gbps = copy_bandwidth(minimal_bytes, device)
        shape_rows = []
        for provider, loss_fn in providers(device).items():
            timing = measure(forward_backward(loss_fn, inputs), device)
            moved = triton_bytes if provider == "triton" else None
            row = {
                "shape": shape_name,
                "dims": list(shape),
                "provider": provider,
                "median_ms": timing.median_ms,
                "q20_ms": timing.q20_ms,
                "q80_ms": timing.q80_ms,
                "gbps_minimal_bytes": minimal_bytes / timing.median_ms / 1e6,
                "gbps_moved_bytes": moved / timing.median_ms / 1e6 if moved else None,
                "copy_gbps": copy_gbps,
            }
            row["fraction_of_copy"] = (row["gbps_moved_bytes"] or row["gbps_minimal_bytes"]) / copy_gbps
            shape_rows.append(row)
            print(
                f"{shape_name:<10} {provider:<10} {timing.median_ms:9.3f} ms "
                f"[{timing.q20_ms:.3f}, {timing.q80_ms:.3f}]  {row['gbps_minimal_bytes']:8.1f} GB/s minimal  "
                f"copy {copy_gbps:7.1f} GB/s",
                flush=True,
            )
        for row in shape_rows:
            row["speedup_vs_reference"] = shape_rows[0]["median_ms"] / row["median_ms"]
        results += shape_rows
    return results


def markdown_table(results: list[dict[str, object]], env: dict[str, str]) -> str:
    lines = [
        f"NFT loss forward+backward on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit']}, {env['date']})",
        "",
        "| shape | provider | median ms | 20 % | 80 % | GB/s (minimal bytes) | GB/s (moved) | of copy | vs reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        moved = f"{row['gbps_moved_bytes']:.1f}" if row["gbps_moved_bytes"] else "-"
        lines.append(
            f"| {row['shape']} {tuple(row['dims'])} | {row['provider']} | {row['median_ms']:.3f} | "
            f"{row['q20_ms']:.3f} | {row['q80_ms']:.3f} | {row['gbps_minimal_bytes']:.1f} | {moved} | "
            f"{row['fraction_of_copy']:.0%} | {row['speedup_vs_reference']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def ledger_rows(results: list[dict[str, object]], env: dict[str, str]):
    metrics = [
        ("median_ms", "ms"),
        ("q20_ms", "ms"),
        ("q80_ms", "ms"),
        ("gbps_minimal_bytes", "GB/s"),
        ("gbps_moved_bytes", "GB/s"),
        ("copy_gbps", "GB/s"),
        ("speedup_vs_reference", "x"),
    ]
    for row in results:
        for metric, unit in metrics:
            if row[metric] is not None:
                yield {
                    **env,
                    "benchmark": "nft_loss_fwd_bwd",
                    "provider": row["provider"],
                    "shape": "x".join(map(str, row["dims"])),
                    "metric": metric,
                    "value": f"{row[metric]:.6g}",
                    "unit": unit,
                }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out/nft_loss"), help="results directory")
    parser.add_argument("--ledger", type=Path, help="also append rows to this CSV ledger")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=[s for s in SHAPES if s != "tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    env = environment(device, checkout=Path(__file__))
    results = run(args.shapes, device, torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nft_loss.json").write_text(json.dumps({"environment": env, "results": results}, indent=2))
    table = markdown_table(results, env)
    (args.out / "nft_loss.md").write_text(table)
    print(table)
    if args.ledger:
        count = append_rows(args.ledger, ledger_rows(results, env))
        print(f"appended {count} rows to {args.ledger}")


if __name__ == "__main__":
    main()
