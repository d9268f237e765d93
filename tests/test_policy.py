"""The three policies (trained, old, reference), the old-policy soft update and the EMA."""

import pytest
import torch

from fastnft.config import ConfigError
from fastnft.run import train
from fastnft.schedules import ema_decay, old_policy_eta
from fastnft.trainer import Trainer
from tests.helpers import snapshot, tiny_config


def velocities(trainer: Trainer, x: torch.Tensor, t: torch.Tensor, text) -> dict[str, torch.Tensor]:
    """v of each role on the same inputs."""
    out = {}
    with torch.no_grad():
        for role in ("old", "trained", "ref"):
            with trainer.policies.role(role) as module:
                out[role] = trainer.update.velocity(module, x, t, text)
    return out


def test_at_iteration_zero_old_equals_trained_but_not_the_reference():
    trainer = Trainer(tiny_config(), progress=False)
    x = torch.randn(4, *trainer.model.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # gaussian-initialised LoRA B is zero: give the adapters an effect
        for parameter in trainer.policies.trained_parameters().values():
            parameter.add_(0.1)
        for parameter in trainer.policies.old_parameters().values():
            parameter.add_(0.1)
    v = velocities(trainer, x, torch.tensor([0.2, 0.4, 0.6, 0.8]), trainer.model.encode_text(["a red circle"] * 4))
    assert torch.equal(v["old"], v["trained"])
    assert not torch.allclose(v["old"], v["ref"], atol=1e-3)


@pytest.mark.parametrize(
    ("overrides", "expected_eta"), [([], 0.001), (["old_policy.eta_rate=0.4", "old_policy.eta_max=0.25"], 0.25)]
)
def test_soft_update_ema_and_step_counting_after_one_iteration(overrides, expected_eta):
    trainer = Trainer(tiny_config(overrides), progress=False)
    before = snapshot(trainer)
    row = trainer.run_iteration()
    after = snapshot(trainer)
    assert trainer.update.steps == 1
    eta, decay = row["eta"], ema_decay(1)
    assert eta == pytest.approx(expected_eta) and decay == pytest.approx(2 / 11)
    assert any(not torch.equal(after["trained"][n], before["trained"][n]) for n in after["trained"])
    for name, theta in after["trained"].items():
        assert torch.equal(after["ema"][name], torch.lerp(before["ema"][name], theta.float(), 1 - decay))
        assert torch.equal(after["old"][name], torch.lerp(before["old"][name], theta, 1 - eta))


def test_full_fine_tuning_moves_weights_and_soft_updates_the_old_copy():
    trainer = Trainer(tiny_config(["lora.enabled=false", "nft.kl_coef=0.1", "optim.lr=1e-3"]), progress=False)
    reference_before = {k: v.clone() for k, v in trainer.policies.reference.state_dict().items()}
    before = snapshot(trainer)
    trainer.run_iteration()
    after = snapshot(trainer)
    eta = old_policy_eta(1, 1)
    moved = [n for n in after["trained"] if not torch.equal(after["trained"][n], before["trained"][n])]
    assert moved
    for name, theta in after["trained"].items():
        expected_old = torch.lerp(before["old"][name], theta.to(before["old"][name].dtype), 1 - eta)
        assert torch.equal(after["old"][name], expected_old)
    for name, value in trainer.policies.reference.state_dict().items():
        assert torch.equal(value, reference_before[name])
    assert Trainer(tiny_config(["lora.enabled=false", "nft.kl_coef=0"]), progress=False).policies.reference is None


def test_two_optimizer_steps_per_iteration_update_the_ema_twice():
    trainer = Trainer(tiny_config(["optim.steps_per_iteration=2"]), progress=False)
    row = trainer.run_iteration()
    assert trainer.update.steps == 2 and row["optimizer_steps"] == 2
    assert row["eta"] == pytest.approx(old_policy_eta(1, 2))


def test_init_lora_warm_starts_every_copy(tmp_path):
    first = train(tiny_config(["optim.lr=0.05", "eval.every=0"], iterations=1), tmp_path / "first")
    exported = tmp_path / "first" / "export" / "pytorch_lora_weights.safetensors"
    warm = Trainer(tiny_config([f"model.init_lora={exported}"]), progress=False)
    assert warm.iteration == 0  # a warm start, not a resume
    for name, ema in first.policies.ema.items():
        assert torch.equal(warm.policies.trained_parameters()[name].detach(), ema)
        assert torch.equal(warm.policies.old_parameters()[name].detach(), ema)


def test_batched_old_and_reference_forwards_equal_separate_ones():
    trainer = Trainer(tiny_config(["nft.batch_old_ref=true"]), progress=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an old adapter unlike the trained one and the base
        for parameter in trainer.policies.old_parameters().values():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    x = torch.randn(3, *trainer.model.sample_shape, generator=generator)
    t = torch.tensor([0.2, 0.5, 0.9])
    text = trainer.model.encode_text(["a red circle", "a cat", "two stars"])
    velocity = trainer.update.velocity
    separate = velocities(trainer, x, t, text)
    with torch.no_grad():
        with trainer.policies.old_then_reference() as both:
            doubled = velocity(both, torch.cat([x, x]), torch.cat([t, t]), type(text).cat([text, text]))
        with trainer.policies.role("old") as old:
            after = velocity(old, x, t, text)
    assert not torch.allclose(separate["old"], separate["ref"], atol=1e-3)
    torch.testing.assert_close(doubled[:3], separate["old"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(doubled[3:], separate["ref"], rtol=1e-5, atol=1e-6)
    assert torch.equal(after, separate["old"])  # the row mask is gone afterwards
    with pytest.raises(ConfigError, match=r"nft\.batch_old_ref: needs LoRA"):
        tiny_config(["nft.batch_old_ref=true", "lora.enabled=false"])
