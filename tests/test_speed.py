"""Speed switches: each changes what it says it changes and leaves the loss unchanged."""

import importlib.util

import pytest
import torch

from fastnft.cli import main
from fastnft.trainer import Trainer
from tests.helpers import TINY_CONFIG, tiny_config


def first_pair_loss_and_grads(trainer: Trainer):
    """Loss and LoRA gradients of one (micro-batch, timestep) pair on fixed tensors."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, *trainer.model.sample_shape, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    t = trainer.update.grid[:4]
    r = torch.tensor([0.1, 0.4, 0.6, 0.9])
    text = trainer.model.encode_text(["a red circle", "a cat", "two stars", "a dog"])
    with torch.no_grad():  # move the trained policy away from the old one
        for p in trainer.policies.trained_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    out = trainer.update.pair_loss(x0, noise, t, r, text)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.policies.trained_parameters().items() if p.grad is not None}
    return out.loss.detach(), grads


def assert_same_loss_and_grads(first, second, rtol=1e-5, atol=1e-6):
    assert torch.allclose(first[0], second[0], rtol=rtol, atol=atol)
    assert first[1].keys() == second[1].keys()
    for name in first[1]:
        assert torch.allclose(first[1][name], second[1][name], rtol=rtol, atol=atol), name


def test_attention_backend_is_installed_and_exact():
    default = Trainer(tiny_config(), progress=False)
    math_backend = Trainer(tiny_config(["model.attention=sdpa-math"]), progress=False)
    assert set(default.speed.attention.values()) == {"JointAttnProcessor2_0"}
    assert set(math_backend.speed.attention.values()) == {"sdpa-math"}
    assert len(math_backend.speed.attention) == 3  # joint attention in both blocks and the dual attention
    assert_same_loss_and_grads(first_pair_loss_and_grads(default), first_pair_loss_and_grads(math_backend))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attn_missing_is_a_clear_config_error(tmp_path, capsys):
    code = main(["train", str(TINY_CONFIG), "--out", str(tmp_path), "model.attention=flash-attn"])
    assert code == 2 and "model.attention: flash-attn is not installed" in capsys.readouterr().err


def test_gradient_checkpointing_keeps_loss_and_gradients():
    plain = first_pair_loss_and_grads(Trainer(tiny_config(), progress=False))
    checkpointed_trainer = Trainer(tiny_config(["model.gradient_checkpointing=true"]), progress=False)
    assert checkpointed_trainer.model.transformer.gradient_checkpointing
    assert_same_loss_and_grads(plain, first_pair_loss_and_grads(checkpointed_trainer))


def test_regional_compile_is_warm_after_the_first_iteration(monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    config = tiny_config(["compile.enabled=true", "compile.backend=aot_eager", "eval.every=0"])
    trainer = Trainer(config, progress=False)
    assert trainer.speed.compiled_blocks == 2
    eager = Trainer(tiny_config(["eval.every=0"]), progress=False)
    compiled_row = trainer.run_iteration()
    graphs_after_first = counters["stats"]["unique_graphs"]
    assert graphs_after_first > 0
    trainer.run_iteration()
    assert counters["stats"]["unique_graphs"] == graphs_after_first  # no new graph in iteration 2
    eager_row = eager.run_iteration()
    assert compiled_row["loss"] == pytest.approx(eager_row["loss"], rel=1e-4)
    torch._dynamo.reset()


def rollout_twice(trainer: Trainer) -> list[torch.Tensor]:
    return [trainer.rollout.sample(trainer.rollout.batch(iteration)).x0 for iteration in (0, 1)]


def test_rollout_graph_wrapper_keeps_the_samples():
    """CPU counterpart of the CUDA-graph rollout: the same wrapper, compiled without graphs, in
    the place where the trainer keeps it on a GPU."""
    from torch._dynamo.utils import counters

    from fastnft.speed import CudaGraphRollout

    torch._dynamo.reset()
    eager = rollout_twice(Trainer(tiny_config(["eval.every=0"]), progress=False))
    trainer = Trainer(tiny_config(["eval.every=0"]), progress=False)
    with trainer.policies.role("old") as old:
        trainer.rollout.cuda_graph = CudaGraphRollout(old, backend="aot_eager")
    wrapped = rollout_twice(trainer)
    assert counters["stats"]["unique_graphs"] > 0  # the rollout did go through the compiled wrapper
    for first, second in zip(eager, wrapped, strict=True):
        torch.testing.assert_close(second, first, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_rollout_cuda_graphs_are_refused_without_a_gpu_or_with_fsdp2(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["train", str(TINY_CONFIG), "--out", str(tmp_path / "cpu"), "rollout.cuda_graphs=true"]) == 2
        assert "rollout.cuda_graphs: CUDA graphs need a CUDA device" in capsys.readouterr().err
    fsdp2 = ["rollout.cuda_graphs=true", "dist.strategy=fsdp2", "lora.enabled=false"]
    assert main(["train", str(TINY_CONFIG), "--out", str(tmp_path / "fsdp2"), *fsdp2]) == 2
    assert "rollout.cuda_graphs: cannot capture FSDP2" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_rollout_under_cuda_graphs_matches_eager_and_records_graphs():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    overrides = ["eval.every=0", "device=cuda"]
    eager = rollout_twice(Trainer(tiny_config(overrides), progress=False))
    trainer = Trainer(tiny_config([*overrides, "rollout.cuda_graphs=true"]), progress=False)
    graphed = rollout_twice(trainer)
    assert trainer.rollout.cuda_graph is not None and counters["inductor"]["cudagraph_skips"] == 0
    for first, second in zip(eager, graphed, strict=True):
        torch.testing.assert_close(second, first, rtol=1e-3, atol=1e-3)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention needs a GPU")
def test_cudnn_attention_on_a_gpu_keeps_loss_and_gradients():
    """GPU counterpart of test_attention_backend_is_installed_and_exact (sdpa-math on a CPU)."""
    overrides = ["device=cuda", "model.precision=bf16"]
    default = Trainer(tiny_config(overrides), progress=False)
    cudnn = Trainer(tiny_config([*overrides, "model.attention=sdpa-cudnn"]), progress=False)
    assert set(cudnn.speed.attention.values()) == {"sdpa-cudnn"}
    first, second = first_pair_loss_and_grads(default), first_pair_loss_and_grads(cudnn)
    assert_same_loss_and_grads(
        (first[0].cpu(), {k: v.cpu() for k, v in first[1].items()}),
        (second[0].cpu(), {k: v.cpu() for k, v in second[1].items()}),
        rtol=2e-2,
        atol=2e-3,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the reference precision's autocast is CUDA-only")
def test_reference_precision_on_a_gpu_trains_under_fp16_autocast_with_a_grad_scaler():
    trainer = Trainer(tiny_config(["device=cuda", "model.precision=reference"]), progress=False)
    assert trainer.speed.autocast == torch.float16 and trainer.update.grad_scaler is not None
    before = {n: p.detach().clone() for n, p in trainer.policies.trained_parameters().items()}
    row = trainer.run_iteration()
    assert row["loss"] == row["loss"] and trainer.update.grad_scaler.get_scale() > 0  # finite, scaler live
    after = trainer.policies.trained_parameters()
    assert any(not torch.equal(after[n].detach(), before[n]) for n in before)


def test_reference_precision_on_a_cpu_has_no_autocast():
    trainer = Trainer(tiny_config(["model.precision=reference"]), progress=False)
    assert trainer.speed.autocast is None and trainer.update.grad_scaler is None
