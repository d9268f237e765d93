"""The NFT update: its loss is the kernel package's, it runs the forwards it must and no more,
and it reads no device scalar per (micro-batch, timestep) pair."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastnft.schedules import adapted_kl_coef
from fastnft.trainer import Trainer
from fastnft_kernels import nft_loss
from tests.helpers import assert_resume_is_bit_exact, metrics_rows, tiny_config
from tests.test_policy import velocities


def test_pair_loss_is_the_kernel_packages_loss_on_the_three_velocities():
    trainer = Trainer(tiny_config(), progress=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained != old != reference, so every branch of the loss matters
        for parameter in trainer.policies.trained_parameters().values():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    x0 = torch.randn(4, *trainer.model.sample_shape, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    t = trainer.update.grid[torch.tensor([0, 1, 2, 3])]
    r = torch.tensor([0.0, 0.3, 0.7, 1.0])
    text = trainer.model.encode_text(["a red circle"] * 4)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    v = velocities(trainer, x_t, t, text)
    out = trainer.update.pair_loss(x0, noise, t, r, text)
    nft = trainer.config.nft
    expected = nft_loss(
        v["trained"],
        v["old"],
        x0,
        noise,
        t,
        r,
        beta=nft.beta,
        v_ref=v["ref"],
        kl_coef=nft.kl_coef,
        adv_clip_max=nft.adv_clip_max,
        backend="torch",
    )
    assert expected.kl.abs().sum() > 0
    assert torch.allclose(out.loss, expected.loss, rtol=1e-6, atol=0)


def test_forward_counts_per_iteration():
    config = tiny_config()  # kl_coef = 1e-4 > 0: old + reference + trained forward per (image, t)
    trainer = Trainer(config, progress=False)
    images_through = {"transformer": 0, "text_encoder": 0, "text_encoder_2": 0, "text_encoder_3": 0}

    def counter(name):
        def hook(module, args, kwargs):
            first = kwargs.get("hidden_states", kwargs.get("input_ids", args[0] if args else None))
            images_through[name] += first.shape[0]

        return hook

    trainer.model.transformer.register_forward_pre_hook(counter("transformer"), with_kwargs=True)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        getattr(trainer.model.pipeline, name).register_forward_pre_hook(counter(name), with_kwargs=True)
    trainer.run_iteration()
    images = config.rollout.groups * config.rollout.group_size
    trained_times = int(config.nft.timestep_fraction * config.rollout.steps)
    assert images_through["transformer"] == images * config.rollout.steps + 3 * images * trained_times
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert images_through[name] == config.rollout.groups  # each prompt once, not once per image

    trainer_no_kl = Trainer(tiny_config(["nft.kl_coef=0"]), progress=False)
    images_through["transformer"] = 0
    trainer_no_kl.model.transformer.register_forward_pre_hook(counter("transformer"), with_kwargs=True)
    trainer_no_kl.run_iteration()
    assert images_through["transformer"] == images * config.rollout.steps + 2 * images * trained_times


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (.item(), float(), .tolist()): on a GPU each
    one waits for the device to drain its queue."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


def scalar_reads_of_one_update(overrides: list[str]) -> tuple[int, int]:
    """(scalar reads outside optimizer.step during one update, its (micro-batch, timestep) pairs)."""
    config = tiny_config(overrides)
    trainer = Trainer(config, progress=False)
    batch = trainer.rollout.batch(0)
    samples = trainer.rollout.sample(batch)
    scored = trainer.rollout.score(batch, samples)
    reads = ScalarReads()
    step = trainer.update.optimizer.step

    def step_unobserved(*args, **kwargs):  # AdamW reads its CPU step counters: no device sync
        reads.paused = True
        try:
            return step(*args, **kwargs)
        finally:
            reads.paused = False

    trainer.update.optimizer.step = step_unobserved
    with reads:
        trainer.update(samples.x0, samples.text, scored.probability, 0, batch.mine)
    images = config.rollout.groups * config.rollout.group_size
    pairs = images // config.nft.micro_batch_size * int(config.nft.timestep_fraction * config.rollout.steps)
    return reads.count, pairs


def test_the_update_reads_no_device_scalar_per_pair():
    few, few_pairs = scalar_reads_of_one_update(["nft.micro_batch_size=8"])
    many, many_pairs = scalar_reads_of_one_update(["nft.micro_batch_size=2", "optim.steps_per_iteration=2"])
    assert many_pairs == 4 * few_pairs
    assert many == few


def test_adaptive_kl_and_cosine_lr_follow_their_schedules_and_resume_exactly(tmp_path):
    target = 1e-9
    overrides = ["eval.every=0", "nft.kl_coef=0.1", f"nft.kl_target={target}", "optim.lr_schedule=cosine"]
    straight = assert_resume_is_bit_exact([*overrides, "optim.lr_final_fraction=0.5"], tmp_path)
    first, second = metrics_rows(tmp_path / "straight")
    lr = tiny_config().optim.lr
    assert (first["lr"], second["lr"]) == (pytest.approx(lr), pytest.approx(0.5 * lr))
    # the first step's pairs all see trained == reference (KL 0, under budget): the coefficient stays
    # at its floor, nft.kl_coef; then the trained policy has moved past the budget: up 10 %
    assert first["kl_coef"] == 0.1 and first["kl"] == 0 and second["kl"] > target
    assert second["kl_coef"] == 0.1
    assert straight.update.kl_coef == pytest.approx(adapted_kl_coef(0.1, second["kl"], target, 0.1))
    assert straight.update.kl_coef == pytest.approx(0.11)
