"""Fused DiffusionNFT loss in two deterministic Triton passes (formula: fastnft_kernels.nft_loss).

Both passes run on a grid (B, chunks); each program owns one chunk of one sample.
Pass 1 writes per-chunk fp32 partial sums. Pass 2 reduces its sample's partials in a fixed
order (so results do not depend on scheduling, and no float atomics are used), forms the
adaptive weights and per-sample losses, re-reads its chunk and writes dloss/dv_theta:

    e_pm = s * (v - v_pm)     with s = t in x0 space, s = 1 in velocity space
    grad = 2 / (B N) * (adv_clip_max * s * ((1 - r) e_neg / w_neg - r e_pos / w_pos)
                        + kl_coef * (v_theta - v_ref))

(w_pm = 1 in velocity space). beta cancels from the gradient except through v_pm.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Buffer layouts. The indices are tl.constexpr because @triton.jit code may read module globals
# only when they are constexpr; host code reads their int as `.value`.

# partials: [B, num_chunks, NUM_PARTIALS] fp32. Pass 1 stores, for each chunk of each sample,
# one sum over the chunk's elements per column; pass 2 adds up each column over the chunks.
PARTIAL_ABS_POS = tl.constexpr(0)  # sum |e_pos|: the adaptive weight w_pos (x0 space)
PARTIAL_ABS_NEG = tl.constexpr(1)  # sum |e_neg|: the adaptive weight w_neg (x0 space)
PARTIAL_SQ_POS = tl.constexpr(2)  # sum e_pos^2: positive_loss
PARTIAL_SQ_NEG = tl.constexpr(3)  # sum e_neg^2: negative_loss
PARTIAL_SQ_REF = tl.constexpr(4)  # sum (v_theta - v_ref)^2: kl (0 without v_ref)
PARTIAL_SQ_OLD = tl.constexpr(5)  # sum (v_theta - v_old)^2: old_deviation
PARTIAL_SQ_X0 = tl.constexpr(6)  # sum x0^2: x0_norm
NUM_PARTIALS = tl.constexpr(7)

# per_sample: [NUM_PER_SAMPLE, B] fp32, written by pass 2. Rows before SAMPLE_LOSS are the
# diagnostics launch_nft_loss returns, in NFTLossOutput's order.
ROW_POSITIVE_LOSS = tl.constexpr(0)
ROW_NEGATIVE_LOSS = tl.constexpr(1)
ROW_KL = tl.constexpr(2)
ROW_OLD_DEVIATION = tl.constexpr(3)
ROW_X0_NORM = tl.constexpr(4)
SAMPLE_LOSS = tl.constexpr(5)  # each sample's contribution to the loss, before the batch mean
NUM_PER_SAMPLE = tl.constexpr(6)

GPU_BLOCK = 1024
GPU_TARGET_PROGRAMS = 1024  # enough programs to fill every SM a few times over
INTERPRETER_MAX_BLOCK = 1 << 16  # the interpreter is fastest with few, wide programs


@triton.jit
def _load_row(ptr, row_stride, sample, idx, mask):
    return tl.load(ptr + sample * row_stride + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _errors(v_theta, v_old, x0, noise, scale, beta):
    """x0-space (scale = t) or velocity-space (scale = 1) errors of both implicit policies."""
    target = noise - x0
    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    return scale * (target - v_pos), scale * (target - v_neg)


@triton.jit
def nft_loss_partials_kernel(
    v_theta_ptr,  # [B, N] trained-policy velocity, row stride stride_theta
    v_old_ptr,  # [B, N] old-policy velocity
    x0_ptr,  # [B, N] clean sample
    noise_ptr,  # [B, N] noise
    v_ref_ptr,  # [B, N] reference velocity (unused unless HAS_REF)
    t_ptr,  # [B] time
    partials_ptr,  # [B, num_chunks, NUM_PARTIALS] fp32 output
    stride_theta,
    stride_old,
    stride_x0,
    stride_noise,
    stride_ref,
    n_per_sample,
    chunk_size,
    num_chunks,
    beta,
    VELOCITY_SPACE: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sample = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    scale = 1.0
    if not VELOCITY_SPACE:
        scale = tl.load(t_ptr + sample).to(tl.float32)
    chunk_start = chunk * chunk_size
    chunk_end = tl.minimum(chunk_start + chunk_size, n_per_sample)

    abs_pos = tl.zeros([BLOCK], dtype=tl.float32)
    abs_neg = tl.zeros([BLOCK], dtype=tl.float32)
    sq_pos = tl.zeros([BLOCK], dtype=tl.float32)
    sq_neg = tl.zeros([BLOCK], dtype=tl.float32)
    sq_ref = tl.zeros([BLOCK], dtype=tl.float32)
    sq_old = tl.zeros([BLOCK], dtype=tl.float32)
    sq_x0 = tl.zeros([BLOCK], dtype=tl.float32)
    for block_start in range(chunk_start, chunk_end, BLOCK):
        idx = block_start + tl.arange(0, BLOCK)
        mask = idx < chunk_end
        v_theta = _load_row(v_theta_ptr, stride_theta, sample, idx, mask)
        v_old = _load_row(v_old_ptr, stride_old, sample, idx, mask)
        x0 = _load_row(x0_ptr, stride_x0, sample, idx, mask)
        noise = _load_row(noise_ptr, stride_noise, sample, idx, mask)
        e_pos, e_neg = _errors(v_theta, v_old, x0, noise, scale, beta)
        abs_pos += tl.abs(e_pos)
        abs_neg += tl.abs(e_neg)
        sq_pos += e_pos * e_pos
        sq_neg += e_neg * e_neg
        sq_old += (v_theta - v_old) * (v_theta - v_old)
        sq_x0 += x0 * x0
        if HAS_REF:
            v_ref = _load_row(v_ref_ptr, stride_ref, sample, idx, mask)
            sq_ref += (v_theta - v_ref) * (v_theta - v_ref)

    out = partials_ptr + (sample * num_chunks + chunk) * NUM_PARTIALS
    tl.store(out + PARTIAL_ABS_POS, tl.sum(abs_pos, axis=0))
    tl.store(out + PARTIAL_ABS_NEG, tl.sum(abs_neg, axis=0))
    tl.store(out + PARTIAL_SQ_POS, tl.sum(sq_pos, axis=0))
    tl.store(out + PARTIAL_SQ_NEG, tl.sum(sq_neg, axis=0))
    tl.store(out + PARTIAL_SQ_REF, tl.sum(sq_ref, axis=0))
    tl.store(out + PARTIAL_SQ_OLD, tl.sum(sq_old, axis=0))
    tl.store(out + PARTIAL_SQ_X0, tl.sum(sq_x0, axis=0))


@triton.jit
def _sample_total(partials_ptr, sample, num_chunks, column, CHUNKS_POW2: tl.constexpr):
    """Sum of one partial column over a sample's chunks, always in the same order."""
    chunks = tl.arange(0, CHUNKS_POW2)
    row = partials_ptr + sample * num_chunks * NUM_PARTIALS
    values = tl.load(row + chunks * NUM_PARTIALS + column, mask=chunks < num_chunks, other=0.0)
    return tl.sum(values, axis=0)


@triton.jit
def nft_loss_finish_kernel(
    v_theta_ptr,  # [B, N] trained-policy velocity
    v_old_ptr,  # [B, N] old-policy velocity
    x0_ptr,  # [B, N] clean sample
    noise_ptr,  # [B, N] noise
    v_ref_ptr,  # [B, N] reference velocity (unused unless HAS_REF)
    t_ptr,  # [B] time
    r_ptr,  # [B] optimality probability
    partials_ptr,  # [B, num_chunks, NUM_PARTIALS] fp32 from pass 1
    per_sample_ptr,  # [NUM_PER_SAMPLE, B] fp32 output, written by each sample's chunk 0
    grad_ptr,  # [B, N] contiguous output, dloss/dv_theta in v_theta's dtype
    stride_theta,
    stride_old,
    stride_x0,
    stride_noise,
    stride_ref,
    batch,
    n_per_sample,
    inv_n,
    grad_scale,
    chunk_size,
    num_chunks,
    beta,
    kl_coef,
    adv_clip_max,
    eps,
    VELOCITY_SPACE: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNKS_POW2: tl.constexpr,
):
    sample = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    r = tl.load(r_ptr + sample).to(tl.float32)
    scale = 1.0
    weight_pos = 1.0
    weight_neg = 1.0
    if not VELOCITY_SPACE:
        scale = tl.load(t_ptr + sample).to(tl.float32)
        abs_pos = _sample_total(partials_ptr, sample, num_chunks, PARTIAL_ABS_POS, CHUNKS_POW2)
        abs_neg = _sample_total(partials_ptr, sample, num_chunks, PARTIAL_ABS_NEG, CHUNKS_POW2)
        weight_pos = tl.maximum(abs_pos * inv_n, eps)
        weight_neg = tl.maximum(abs_neg * inv_n, eps)
    positive_loss = _sample_total(partials_ptr, sample, num_chunks, PARTIAL_SQ_POS, CHUNKS_POW2) * inv_n / weight_pos
    negative_loss = _sample_total(partials_ptr, sample, num_chunks, PARTIAL_SQ_NEG, CHUNKS_POW2) * inv_n / weight_neg
    kl = _sample_total(partials_ptr, sample, num_chunks, PARTIAL_SQ_REF, CHUNKS_POW2) * inv_n
    old_deviation = _sample_total(partials_ptr, sample, num_chunks, PARTIAL_SQ_OLD, CHUNKS_POW2) * inv_n
    x0_norm = _sample_total(partials_ptr, sample, num_chunks, PARTIAL_SQ_X0, CHUNKS_POW2) * inv_n
    sample_loss = adv_clip_max * (r * positive_loss + (1.0 - r) * negative_loss) / beta + kl_coef * kl

    is_first = chunk == 0
    tl.store(per_sample_ptr + ROW_POSITIVE_LOSS * batch + sample, positive_loss, mask=is_first)
    tl.store(per_sample_ptr + ROW_NEGATIVE_LOSS * batch + sample, negative_loss, mask=is_first)
    tl.store(per_sample_ptr + ROW_KL * batch + sample, kl, mask=is_first)
    tl.store(per_sample_ptr + ROW_OLD_DEVIATION * batch + sample, old_deviation, mask=is_first)
    tl.store(per_sample_ptr + ROW_X0_NORM * batch + sample, x0_norm, mask=is_first)
    tl.store(per_sample_ptr + SAMPLE_LOSS * batch + sample, sample_loss, mask=is_first)

    coef_pos = -grad_scale * adv_clip_max * scale * r / weight_pos
    coef_neg = grad_scale * adv_clip_max * scale * (1.0 - r) / weight_neg
    coef_ref = grad_scale * kl_coef
    chunk_start = chunk * chunk_size
    chunk_end = tl.minimum(chunk_start + chunk_size, n_per_sample)
    for block_start in range(chunk_start, chunk_end, BLOCK):
        idx = block_start + tl.arange(0, BLOCK)
        mask = idx < chunk_end
        v_theta = _load_row(v_theta_ptr, stride_theta, sample, idx, mask)
        v_old = _load_row(v_old_ptr, stride_old, sample, idx, mask)
        x0 = _load_row(x0_ptr, stride_x0, sample, idx, mask)
        noise = _load_row(noise_ptr, stride_noise, sample, idx, mask)
        e_pos, e_neg = _errors(v_theta, v_old, x0, noise, scale, beta)
        grad = coef_pos * e_pos + coef_neg * e_neg
        if HAS_REF:
            v_ref = _load_row(v_ref_ptr, stride_ref, sample, idx, mask)
            grad += coef_ref * (v_theta - v_ref)
        tl.store(grad_ptr + sample * n_per_sample + idx, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _rows(x: Tensor) -> Tensor:
    """[B, N] view with unit inner stride (copies only when no such view exists)."""
    rows = x.reshape(x.shape[0], -1)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def launch_geometry(n_per_sample: int, batch: int, on_interpreter: bool) -> tuple[int, int]:
    """(BLOCK, chunk_size): wide programs under the interpreter, enough of them on a GPU."""
    if on_interpreter:
        block = min(triton.next_power_of_2(n_per_sample), INTERPRETER_MAX_BLOCK)
        return block, triton.cdiv(n_per_sample, block) * block
    block = min(GPU_BLOCK, triton.next_power_of_2(n_per_sample))
    max_chunks = triton.cdiv(n_per_sample, block)
    chunks = max(1, min(max_chunks, triton.cdiv(GPU_TARGET_PROGRAMS, batch)))
    blocks_per_chunk = triton.cdiv(max_chunks, chunks)
    return block, blocks_per_chunk * block


def launch_nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    r: Tensor,
    v_ref: Tensor | None,
    *,
    beta: float,
    kl_coef: float,
    adv_clip_max: float,
    velocity_space: bool,
    eps: float,
    block: int | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs both passes. Returns (loss [], dloss/dv_theta [B, ...], diagnostics [5, B]) with
    the diagnostics' rows positive_loss, negative_loss, kl, old_deviation, x0_norm.

    `block` and `chunk_size` override the launch geometry (tests use them to cover many
    chunks and partial blocks on small tensors); chunk_size must be a multiple of block.
    """
    batch = v_theta.shape[0]
    n_per_sample = v_theta.numel() // batch
    if block is None or chunk_size is None:
        on_interpreter = os.environ.get("TRITON_INTERPRET") == "1"
        block, chunk_size = launch_geometry(n_per_sample, batch, on_interpreter)
    num_chunks = triton.cdiv(n_per_sample, chunk_size)
    device = v_theta.device

    rows = [_rows(x) for x in (v_theta, v_old, x0, noise)]
    has_ref = v_ref is not None
    ref_rows = _rows(v_ref) if has_ref else rows[0]
    strides = [x.stride(0) for x in (*rows, ref_rows)]
    t = t.to(device=device, dtype=torch.float32).contiguous()
    r = r.to(device=device, dtype=torch.float32).contiguous()
    partials = torch.empty((batch, num_chunks, NUM_PARTIALS.value), device=device, dtype=torch.float32)
    per_sample = torch.empty((NUM_PER_SAMPLE.value, batch), device=device, dtype=torch.float32)
    grad = torch.empty((batch, n_per_sample), device=device, dtype=v_theta.dtype)
    grid = (batch, num_chunks)
    flags = dict(VELOCITY_SPACE=velocity_space, HAS_REF=has_ref, BLOCK=block)

    nft_loss_partials_kernel[grid](
        *rows,
        ref_rows,
        t,
        partials,
        *strides,
        n_per_sample,
        chunk_size,
        num_chunks,
        beta,
        **flags,
    )
    nft_loss_finish_kernel[grid](
        *rows,
        ref_rows,
        t,
        r,
        partials,
        per_sample,
        grad,
        *strides,
        batch,
        n_per_sample,
        1.0 / n_per_sample,
        2.0 / (batch * n_per_sample),
        chunk_size,
        num_chunks,
        beta,
        kl_coef,
        adv_clip_max,
        eps,
        CHUNKS_POW2=triton.next_power_of_2(num_chunks),
        **flags,
    )
    loss = per_sample[SAMPLE_LOSS.value].sum() / batch
    return loss, grad.view(v_theta.shape), per_sample[: SAMPLE_LOSS.value]
