"""fastnft_kernels.nft_loss: both paths against an independent float64 transcription of the
formula (the nft_loss module docstring; section 5 of fastnft's docs/algorithm.md), forwards and
gradients, per-dtype tolerances, odd shapes."""

import pytest
import torch

from fastnft_kernels import nft_loss, nft_loss_torch
from fastnft_kernels.triton_nft_loss import launch_nft_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu  # on a GPU these run the compiled Triton kernel, not the interpreter
BACKENDS = ["torch", "triton"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (loss rtol, gradient rtol): arithmetic is fp32 for every dtype, the gradient is stored in
# v_theta's dtype. Gradient atol is rtol times the largest expected gradient entry.
TOLERANCES = {"fp32": (2e-5, 2e-5), "bf16": (2e-5, 8e-3), "fp16": (2e-5, 1e-3), "mixed": (2e-5, 8e-3)}


def float64_nft_loss(
    v_theta, v_old, x0, noise, t, r, *, beta, v_ref, kl_coef, adv_clip_max, loss_space, eps, weights=None
):
    """The formula in float64, written apart from the library. `weights`
    (w_pos, w_neg) replaces the detached adaptive weights by constants."""
    batch = v_theta.shape[0]
    v_theta, v_old, x0, noise = (x.double().reshape(batch, -1) for x in (v_theta, v_old, x0, noise))
    t = t.double()[:, None]
    r = r.double()
    x_t = (1 - t) * x0 + t * noise
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    if loss_space == "x0":
        x0_pos = x_t - t * v_pos
        x0_neg = x_t - t * v_neg
        if weights is None:
            w_pos = (x0_pos - x0).abs().mean(1).clamp(min=eps).detach()
            w_neg = (x0_neg - x0).abs().mean(1).clamp(min=eps).detach()
        else:
            w_pos, w_neg = weights
        l_pos = ((x0_pos - x0) ** 2).mean(1) / w_pos
        l_neg = ((x0_neg - x0) ** 2).mean(1) / w_neg
    else:
        target = noise - x0
        l_pos = ((v_pos - target) ** 2).mean(1)
        l_neg = ((v_neg - target) ** 2).mean(1)
    policy = adv_clip_max * ((r * l_pos + (1 - r) * l_neg) / beta).mean()
    kl = torch.zeros_like(l_pos)
    if v_ref is not None:
        kl = ((v_theta - v_ref.double().reshape(batch, -1)) ** 2).mean(1)
    loss = policy + kl_coef * kl.mean()
    diagnostics = {
        "positive_loss": l_pos.detach(),
        "negative_loss": l_neg.detach(),
        "kl": kl.detach(),
        "old_deviation": ((v_theta - v_old) ** 2).mean(1).detach(),
        "x0_norm": (x0**2).mean(1),
    }
    return loss, diagnostics


def make_inputs(shape, dtype_case="fp32", *, with_ref=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    velocity_dtype = torch.bfloat16 if dtype_case == "mixed" else DTYPES[dtype_case]
    data_dtype = torch.float32 if dtype_case == "mixed" else DTYPES[dtype_case]

    def randn(dtype):
        return torch.randn(shape, generator=generator).to(device=DEVICE, dtype=dtype)

    inputs = {
        "v_theta": randn(velocity_dtype),
        "v_old": randn(velocity_dtype),
        "x0": randn(data_dtype),
        "noise": randn(data_dtype),
        "t": torch.rand(shape[0], generator=generator).clamp(min=0.05).to(DEVICE),
        "r": torch.rand(shape[0], generator=generator).to(DEVICE),
    }
    if with_ref:
        inputs["v_ref"] = randn(velocity_dtype)
    return inputs


def loss_and_grad(inputs, grad_output=1.0, **options):
    v_theta = inputs["v_theta"].detach().clone().requires_grad_(True)
    out = nft_loss(**{**inputs, "v_theta": v_theta}, **options)
    (grad,) = torch.autograd.grad(out.loss * grad_output, v_theta)
    return out, grad


def expected_loss_and_grad(inputs, grad_output=1.0, **options):
    options = {"beta": 1.0, "kl_coef": 0.0, "adv_clip_max": 5.0, "loss_space": "x0", "eps": 1e-5, **options}
    v_theta = inputs["v_theta"].detach().double().requires_grad_(True)
    fields = {k: v for k, v in inputs.items() if k != "v_theta"}
    fields.setdefault("v_ref", None)
    loss, diagnostics = float64_nft_loss(v_theta, **fields, **options)
    (grad,) = torch.autograd.grad(loss * grad_output, v_theta)
    return loss.detach(), grad.view(inputs["v_theta"].shape), diagnostics


def assert_close(actual, expected, *, rtol, atol, name):
    """allclose, printing the worst mismatches when it fails."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    error = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    if bool((error <= allowed).all()):
        return
    worst = (error - allowed).flatten().topk(min(5, error.numel())).indices
    rows = [
        f"  at flat index {i}: got {actual.flatten()[i]:.10g}, expected {expected.flatten()[i]:.10g}"
        for i in worst.tolist()
    ]
    pytest.fail(f"{name}: {int((error > allowed).sum())} of {error.numel()} out of tolerance\n" + "\n".join(rows))


def check_against_float64(inputs, dtype_case="fp32", grad_output=1.0, **options):
    loss_rtol, grad_rtol = TOLERANCES[dtype_case]
    out, grad = loss_and_grad(inputs, grad_output, **options)
    backend_free = {k: v for k, v in options.items() if k != "backend"}
    expected_loss, expected_grad, expected = expected_loss_and_grad(inputs, grad_output, **backend_free)
    assert out.loss.shape == ()
    assert grad.dtype == inputs["v_theta"].dtype and grad.shape == inputs["v_theta"].shape
    assert_close(out.loss, expected_loss, rtol=loss_rtol, atol=1e-7, name="loss")
    grad_atol = grad_rtol * float(expected_grad.abs().max()) + 1e-12
    assert_close(grad, expected_grad, rtol=grad_rtol, atol=grad_atol, name="grad")
    for name, value in expected.items():
        assert_close(getattr(out, name), value, rtol=loss_rtol, atol=1e-7, name=name)


SHAPES = [(3, 5, 7, 11), (1, 4, 8, 8), (4, 3, 16, 16), (2, 7), (2, 3, 4, 5, 6)]
LOSS_OPTIONS = {
    "x0": dict(loss_space="x0", beta=1.0),
    "x0-beta0.1-kl": dict(loss_space="x0", beta=0.1, kl_coef=0.5),
    "velocity-kl": dict(loss_space="velocity", beta=1.0, kl_coef=1e-4),
    "velocity-beta0.1": dict(loss_space="velocity", beta=0.1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_case", list(TOLERANCES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_across_dtypes_and_shapes(backend, dtype_case, shape):
    check_against_float64(make_inputs(shape, dtype_case), dtype_case, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", list(LOSS_OPTIONS))
@pytest.mark.parametrize("dtype_case", ["fp32", "bf16"])
def test_matches_float64_across_loss_options(backend, options, dtype_case):
    with_ref = LOSS_OPTIONS[options].get("kl_coef", 0.0) > 0
    inputs = make_inputs((3, 5, 7, 11), dtype_case, with_ref=with_ref, seed=1)
    check_against_float64(inputs, dtype_case, backend=backend, **LOSS_OPTIONS[options])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_space", ["x0", "velocity"])
def test_grad_output_scales_the_gradient(backend, loss_space):
    inputs = make_inputs((2, 3, 9, 5), with_ref=True, seed=2)
    check_against_float64(inputs, grad_output=2.5, backend=backend, loss_space=loss_space, kl_coef=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_probabilities_and_pure_noise_time(backend):
    inputs = make_inputs((3, 4, 6, 6), seed=3)
    inputs["r"] = torch.tensor([0.0, 1.0, 0.5], device=DEVICE)
    inputs["t"] = torch.tensor([1.0, 1.0, 0.3], device=DEVICE)
    check_against_float64(inputs, backend=backend, beta=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_weight_is_clamped_at_eps(backend):
    # Near-perfect predictions: mean |x0_pm - x0| is ~1e-6, below eps = 1e-5, so the weight must
    # be eps; using the unclamped mean would make the loss ~10x larger. (The perturbation has its
    # own generator and stays well above fp32's resolution of the unit-scale noise it is added to.)
    inputs = make_inputs((2, 4, 8, 8), seed=4)
    inputs["x0"] = torch.zeros_like(inputs["x0"])
    inputs["v_old"] = inputs["noise"].clone()
    perturbation = torch.randn(inputs["noise"].shape, generator=torch.Generator().manual_seed(4))
    inputs["v_theta"] = inputs["noise"] + 1e-6 * perturbation.to(inputs["noise"])
    out, _ = loss_and_grad(inputs, backend=backend)
    expected_loss, _, _ = expected_loss_and_grad(inputs)
    assert_close(out.loss, expected_loss, rtol=0.05, atol=0, name="loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = make_inputs((6, 4, 10, 12), with_ref=True, seed=5)
    strided = {k: (v[::2].transpose(-1, -2) if v.ndim > 1 else v[::2]) for k, v in base.items()}
    assert not strided["v_theta"].is_contiguous()
    check_against_float64(strided, backend=backend, kl_coef=0.1)


@pytest.mark.parametrize("loss_space", ["x0", "velocity"])
def test_triton_many_chunks_and_partial_blocks(loss_space):
    # 770 elements per sample in 13 chunks of 64 (blocks of 16): the last chunk and block are partial.
    inputs = make_inputs((3, 2, 5, 77), with_ref=True, seed=6)
    expected_loss, expected_grad, expected = expected_loss_and_grad(inputs, loss_space=loss_space, kl_coef=0.3)
    tensors = [inputs[k] for k in ["v_theta", "v_old", "x0", "noise", "t", "r", "v_ref"]]
    options = dict(beta=1.0, kl_coef=0.3, adv_clip_max=5.0, velocity_space=loss_space == "velocity", eps=1e-5)
    loss, grad, diagnostics = launch_nft_loss(*tensors, **options, block=16, chunk_size=64)
    assert_close(loss, expected_loss, rtol=2e-5, atol=1e-7, name="loss")
    assert_close(grad, expected_grad, rtol=2e-5, atol=2e-5 * float(expected_grad.abs().max()), name="grad")
    for row, name in enumerate(["positive_loss", "negative_loss", "kl", "old_deviation", "x0_norm"]):
        assert_close(diagnostics[row], expected[name], rtol=2e-5, atol=1e-7, name=name)


def test_triton_path_is_deterministic():
    inputs = make_inputs((4, 3, 16, 16), with_ref=True, seed=7)
    first, first_grad = loss_and_grad(inputs, backend="triton", kl_coef=0.1)
    second, second_grad = loss_and_grad(inputs, backend="triton", kl_coef=0.1)
    assert torch.equal(first.loss, second.loss)
    assert torch.equal(first_grad, second_grad)


def test_auto_uses_triton_on_cuda_and_torch_on_cpu():
    inputs = make_inputs((2, 3, 4, 4), seed=8)
    expected_backend = "triton" if DEVICE == "cuda" else "torch"
    auto, auto_grad = loss_and_grad(inputs, backend="auto")
    chosen, chosen_grad = loss_and_grad(inputs, backend=expected_backend)
    assert torch.equal(auto.loss, chosen.loss) and torch.equal(auto_grad, chosen_grad)


def test_only_v_theta_gets_a_gradient():
    inputs = {k: v.requires_grad_(v.is_floating_point()) for k, v in make_inputs((2, 3, 4, 4)).items()}
    for backend in BACKENDS:
        out = nft_loss(**inputs, backend=backend)
        grads = torch.autograd.grad(out.loss, [inputs["v_theta"], inputs["v_old"]], allow_unused=True)
        assert grads[0] is not None and grads[1] is None
        assert not out.positive_loss.requires_grad and not out.x0_norm.requires_grad


def test_float64_torch_path_equals_the_transcription():
    inputs = {k: v.double() for k, v in make_inputs((3, 5, 7, 11), with_ref=True, seed=9).items()}
    for loss_space in ["x0", "velocity"]:
        out, grad = loss_and_grad(inputs, backend="torch", loss_space=loss_space, kl_coef=0.2, beta=0.3)
        expected_loss, expected_grad, _ = expected_loss_and_grad(inputs, loss_space=loss_space, kl_coef=0.2, beta=0.3)
        assert_close(out.loss, expected_loss, rtol=1e-12, atol=0, name="loss")
        assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14, name="grad")


def test_gradcheck_velocity_form():
    inputs = {k: v.double() for k, v in make_inputs((2, 3, 4, 5), with_ref=True, seed=10).items()}
    v_theta = inputs.pop("v_theta").requires_grad_(True)

    def loss(v):
        return nft_loss_torch(v, **inputs, beta=0.3, kl_coef=0.2, loss_space="velocity").loss

    assert torch.autograd.gradcheck(loss, (v_theta,))


def test_gradcheck_x0_form_with_constant_weights():
    # The adaptive weights are stop-gradient by definition, so finite differences only agree
    # with the gradient when the weights are held constant: take them at the evaluation point.
    inputs = {k: v.double() for k, v in make_inputs((2, 3, 4, 5), seed=11).items()}
    v_theta = inputs.pop("v_theta").requires_grad_(True)
    options = dict(beta=0.3, v_ref=None, kl_coef=0.0, adv_clip_max=5.0, loss_space="x0", eps=1e-5)
    with torch.no_grad():
        t = inputs["t"][:, None]
        x_t = (1 - t) * inputs["x0"].flatten(1) + t * inputs["noise"].flatten(1)
        v_pos = 0.3 * v_theta.flatten(1) + 0.7 * inputs["v_old"].flatten(1)
        v_neg = 1.3 * inputs["v_old"].flatten(1) - 0.3 * v_theta.flatten(1)
        weights = tuple((x_t - t * v - inputs["x0"].flatten(1)).abs().mean(1) for v in (v_pos, v_neg))

    def constant_weight_loss(v):
        return float64_nft_loss(v, **inputs, **options, weights=weights)[0]

    assert torch.autograd.gradcheck(constant_weight_loss, (v_theta,))
    (library_grad,) = torch.autograd.grad(nft_loss_torch(v_theta, **inputs, beta=0.3).loss, v_theta)
    (constant_grad,) = torch.autograd.grad(constant_weight_loss(v_theta), v_theta)
    assert_close(library_grad, constant_grad, rtol=1e-10, atol=1e-14, name="grad")


def test_compiled_triton_op_matches_eager():
    inputs = make_inputs((3, 4, 8, 8), "bf16", with_ref=True, seed=12)

    def step(v_theta, v_old, x0, noise, t, r, v_ref):
        out = nft_loss(v_theta, v_old, x0, noise, t, r, v_ref=v_ref, kl_coef=0.1, backend="triton")
        return out.loss * 3.0, out.positive_loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        v_theta = inputs["v_theta"].clone().requires_grad_(True)
        loss, positive = fn(v_theta, *(inputs[k] for k in ["v_old", "x0", "noise", "t", "r", "v_ref"]))
        (grad,) = torch.autograd.grad(loss, v_theta)
        results.append((loss, positive, grad))
    for eager, compiled_value in zip(*results, strict=True):
        assert torch.equal(eager, compiled_value)


def test_opcheck():
    inputs = make_inputs((2, 3, 5, 7), with_ref=True, seed=13)
    inputs["v_theta"].requires_grad_(True)
    args = [inputs[k] for k in ["v_theta", "v_old", "x0", "noise", "t", "r", "v_ref"]]
    torch.library.opcheck(torch.ops.fastnft_kernels.nft_loss.default, (*args, 0.5, 0.1, 5.0, False, 1e-5))


BAD_ARGUMENTS = {
    "v_old": (dict(v_old=torch.zeros(2, 3)), "v_old has shape"),
    "v_ref": (dict(v_ref=torch.zeros(2, 4, 1), kl_coef=0.1), "v_ref has shape"),
    "t": (dict(t=torch.zeros(2, 1)), "t must have shape"),
    "r": (dict(r=torch.zeros(3)), "r must have shape"),
    "beta": (dict(beta=0.0), "beta must be > 0"),
    "kl_coef": (dict(kl_coef=0.1), "needs v_ref"),
    "loss_space": (dict(loss_space="eps"), "loss_space must be one of"),
    "backend": (dict(backend="cuda"), "backend must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_value_errors_naming_them(case):
    overrides, message = BAD_ARGUMENTS[case]
    zeros = torch.zeros(2, 4)
    arguments = dict(v_theta=zeros, v_old=zeros, x0=zeros, noise=zeros, t=torch.ones(2), r=torch.ones(2))
    with pytest.raises(ValueError, match=message):
        nft_loss(**{**arguments, **overrides})


def test_cpu_tensors_with_triton_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    zeros = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        nft_loss(zeros, zeros, zeros, zeros, torch.ones(2), torch.ones(2), backend="triton")
