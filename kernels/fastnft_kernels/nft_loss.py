"""The DiffusionNFT loss: public API, the plain-PyTorch specification, and the fused op.

For each sample b with t = t[b], r = r[b] and the flow-matching target v = noise - x0:

    v_pos  = beta * v_theta + (1 - beta) * v_old          implicit positive policy
    v_neg  = (1 + beta) * v_old - beta * v_theta          implicit negative policy
    x_t    = (1 - t) * x0 + t * noise
    x0_pos = x_t - t * v_pos,  x0_neg = x_t - t * v_neg   (so x0_pm - x0 = t * (v - v_pm))

    loss_space="x0" (reference code, default):
        w_pm  = stopgrad(clamp(mean |x0_pm - x0|, min=eps))
        L_pm  = mean (x0_pm - x0)^2 / w_pm
    loss_space="velocity" (paper form):
        L_pm  = mean (v_pm - v)^2

    policy = adv_clip_max * mean_b((r * L_pos + (1 - r) * L_neg) / beta)
    kl     = mean_b(mean (v_theta - v_ref)^2)
    loss   = policy + kl_coef * kl

Means without a subscript run over all non-batch dims. The loss is differentiable w.r.t.
v_theta only; all arithmetic is fp32 whatever the input dtypes (mixed dtypes allowed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_SPACES = ("x0", "velocity")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class NFTLossOutput:
    """The loss and detached per-sample diagnostics (fp32; fp64 on the torch path for fp64)."""

    loss: Tensor  # [] differentiable w.r.t. v_theta
    positive_loss: Tensor  # [B] L_pos
    negative_loss: Tensor  # [B] L_neg
    kl: Tensor  # [B] mean (v_theta - v_ref)^2, zeros without v_ref
    old_deviation: Tensor  # [B] mean (v_theta - v_old)^2
    x0_norm: Tensor  # [B] mean x0^2


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    r: Tensor,
    *,
    beta: float = 1.0,
    v_ref: Tensor | None = None,
    kl_coef: float = 0.0,
    adv_clip_max: float = 5.0,
    loss_space: str = "x0",
    eps: float = 1e-5,
    backend: str = "auto",
) -> NFTLossOutput:
    """DiffusionNFT loss (module docstring has the formula).

    Args:
        v_theta: [B, ...] velocity of the trained policy (the only input that gets a gradient).
        v_old: [B, ...] velocity of the old (rollout) policy.
        x0: [B, ...] clean sample.
        noise: [B, ...] the noise eps that built x_t = (1 - t) x0 + t eps.
        t: [B] times in (0, 1] (t = 1 is pure noise).
        r: [B] optimality probabilities in [0, 1].
        v_ref: [B, ...] velocity of the frozen reference model; required when kl_coef > 0.
        backend: "torch" (the specification), "triton" (fused, two passes) or "auto" (Triton
            for CUDA tensors when triton is installed, torch otherwise).
    """
    _check_arguments(v_theta, v_old, x0, noise, t, r, beta, v_ref, kl_coef, loss_space, backend)
    if _resolve_backend(backend, v_theta) == "torch":
        return nft_loss_torch(
            v_theta,
            v_old,
            x0,
            noise,
            t,
            r,
            beta=beta,
            v_ref=v_ref,
            kl_coef=kl_coef,
            adv_clip_max=adv_clip_max,
            loss_space=loss_space,
            eps=eps,
        )
    loss, _, diagnostics = torch.ops.fastnft_kernels.nft_loss(
        v_theta,
        v_old,
        x0,
        noise,
        t,
        r,
        v_ref,
        float(beta),
        float(kl_coef),
        float(adv_clip_max),
        loss_space == "velocity",
        float(eps),
    )
    return NFTLossOutput(loss, *diagnostics.unbind(0))


def nft_loss_torch(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    r: Tensor,
    *,
    beta: float = 1.0,
    v_ref: Tensor | None = None,
    kl_coef: float = 0.0,
    adv_clip_max: float = 5.0,
    loss_space: str = "x0",
    eps: float = 1e-5,
    weight_dtype: torch.dtype = torch.float32,
) -> NFTLossOutput:
    """The specification: plain autograd, line for line the module docstring.

    Arithmetic is fp32 (fp64 for fp64 v_theta, which the float64 checks use).

    `weight_dtype` is the precision of the adaptive weights w_pm. fp32 (the default) is enough.
    torch.float64 reproduces the reference DiffusionNFT code, which computes them in float64:
    it is the switch behind fastnft's `nft.loss_backend: reference`, and the NFT-loss
    benchmark's `reference` provider uses it to measure the reference code's cost.
    """
    batch = v_theta.shape[0]
    compute_dtype = torch.promote_types(v_theta.dtype, torch.float32)  # fp32, or fp64 for fp64

    def rows(x: Tensor) -> Tensor:  # [B, ...] -> [B, N] in the compute dtype
        return x.reshape(batch, -1).to(compute_dtype)

    t = t.to(compute_dtype).view(batch, 1)
    r = r.to(compute_dtype)
    v_theta = rows(v_theta)
    v_old, x0, noise = rows(v_old.detach()), rows(x0.detach()), rows(noise.detach())

    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    if loss_space == "x0":
        x_t = (1 - t) * x0 + t * noise
        positive_loss = _adaptive_squared_error(x_t - t * v_pos, x0, eps, weight_dtype)
        negative_loss = _adaptive_squared_error(x_t - t * v_neg, x0, eps, weight_dtype)
    else:
        v = noise - x0
        positive_loss = (v_pos - v).square().mean(1)
        negative_loss = (v_neg - v).square().mean(1)
    policy = adv_clip_max * ((r * positive_loss + (1 - r) * negative_loss) / beta).mean()

    if v_ref is not None:
        kl = (v_theta - rows(v_ref.detach())).square().mean(1)
    else:
        kl = torch.zeros_like(positive_loss)
    loss = policy + kl_coef * kl.mean() if kl_coef > 0 else policy

    with torch.no_grad():
        old_deviation = (v_theta - v_old).square().mean(1)
        x0_norm = x0.square().mean(1)
    return NFTLossOutput(
        loss=loss,
        positive_loss=positive_loss.detach(),
        negative_loss=negative_loss.detach(),
        kl=kl.detach(),
        old_deviation=old_deviation,
        x0_norm=x0_norm,
    )


def _adaptive_squared_error(prediction: Tensor, target: Tensor, eps: float, weight_dtype: torch.dtype) -> Tensor:
    """[B, N] -> [B]: mean (prediction - target)^2 / stopgrad(clamp(mean |...|, min=eps))."""
    error = prediction - target
    with torch.no_grad():
        weight = error.to(torch.promote_types(weight_dtype, error.dtype)).abs().mean(1).clamp(min=eps)
    return (error.square().mean(1) / weight).to(error.dtype)


def _check_arguments(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    r: Tensor,
    beta: float,
    v_ref: Tensor | None,
    kl_coef: float,
    loss_space: str,
    backend: str,
) -> None:
    if v_theta.ndim < 1 or v_theta.numel() == 0:
        raise ValueError(f"v_theta must be a non-empty [B, ...] tensor, got shape {tuple(v_theta.shape)}")
    named = {"v_old": v_old, "x0": x0, "noise": noise}
    if v_ref is not None:
        named["v_ref"] = v_ref
    for name, tensor in named.items():
        if tensor.shape != v_theta.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected v_theta's {tuple(v_theta.shape)}")
    batch = v_theta.shape[0]
    for name, tensor in {"t": t, "r": r}.items():
        if tensor.shape != (batch,):
            raise ValueError(f"{name} must have shape [B] = ({batch},), got {tuple(tensor.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and v_ref is None:
        raise ValueError(f"kl_coef = {kl_coef} > 0 needs v_ref (the reference model's velocity)")
    if loss_space not in LOSS_SPACES:
        raise ValueError(f"loss_space must be one of {LOSS_SPACES}, got {loss_space!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def triton_available() -> bool:
    """True when triton can be imported (it is a Linux-only dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, v_theta: Tensor) -> str:
    if backend == "auto":
        return "triton" if v_theta.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if v_theta.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' got CPU tensors, which run only under the Triton interpreter: "
                "set TRITON_INTERPRET=1 before fastnft_kernels is imported, or use backend='torch'"
            )
    return backend


# The fused path as a custom op, so torch.compile(fullgraph=True) traces it as one node and
# CUDA graphs capture it. The launcher (and triton) is imported only when the op first runs.
@torch.library.custom_op("fastnft_kernels::nft_loss", mutates_args=())
def _nft_loss_op(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    r: Tensor,
    v_ref: Tensor | None,
    beta: float,
    kl_coef: float,
    adv_clip_max: float,
    velocity_space: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (loss [], dloss/dv_theta [B, ...], diagnostics [5, B]); see launch_nft_loss."""
    from fastnft_kernels.triton_nft_loss import launch_nft_loss

    return launch_nft_loss(
        v_theta,
        v_old,
        x0,
        noise,
        t,
        r,
        v_ref,
        beta=beta,
        kl_coef=kl_coef,
        adv_clip_max=adv_clip_max,
        velocity_space=velocity_space,
        eps=eps,
    )


@_nft_loss_op.register_fake
def _nft_loss_fake(v_theta, v_old, x0, noise, t, r, v_ref, beta, kl_coef, adv_clip_max, velocity_space, eps):
    loss = v_theta.new_empty((), dtype=torch.float32)
    grad = v_theta.new_empty(v_theta.shape)  # contiguous, as the launcher writes it
    diagnostics = v_theta.new_empty((5, v_theta.shape[0]), dtype=torch.float32)
    return loss, grad, diagnostics


def _nft_loss_setup_context(ctx, inputs, output) -> None:
    _, grad, diagnostics = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad, diagnostics)


def _nft_loss_backward(ctx, grad_loss, *unused_grads):
    # The gradient was computed in the forward pass; scale it on the device, never on the host.
    (grad,) = ctx.saved_tensors
    return (grad * grad_loss,) + (None,) * 11


_nft_loss_op.register_autograd(_nft_loss_backward, setup_context=_nft_loss_setup_context)
