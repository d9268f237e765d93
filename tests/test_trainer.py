"""The training loop on tiny random-init SD3 components (configs/tiny.yaml)."""

import importlib.util
import json

import pytest
import torch

from fastnft.checkpoint import latest_checkpoint, list_checkpoints
from fastnft.cli import main
from fastnft.config import ConfigError, load_config
from fastnft.run import train
from fastnft.schedules import ema_decay, old_policy_eta
from fastnft.trainer import Trainer
from fastnft_kernels import nft_loss
from tests.helpers import TINY_CONFIG, tiny_config

TIMING_KEYS = {"time_rollout", "time_reward", "time_train", "images_per_sec"}


def snapshot(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    policies = trainer.policies
    optimizer = trainer.optimizer.state_dict()["state"]
    return {
        "trained": {k: v.detach().clone() for k, v in policies.trained_parameters().items()},
        "old": {k: v.detach().clone() for k, v in policies.old_parameters().items()},
        "ema": {k: v.clone() for k, v in policies.ema.items()},
        "optimizer": {f"{i}.{k}": v.clone() for i, s in optimizer.items() for k, v in s.items()},
    }


def assert_bitwise_equal(first: dict, second: dict) -> None:
    for group in first:
        assert first[group].keys() == second[group].keys(), group
        for name in first[group]:
            assert torch.equal(first[group][name], second[group][name]), f"{group}/{name} differs"


def test_one_iteration_writes_every_metric(tmp_path):
    assert main(["train", str(TINY_CONFIG), "--out", str(tmp_path), "--iterations", "1", "logging.progress=false"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in rows if "loss" in r]
    assert len(training) == 1 and training[0]["iteration"] == 1
    expected = {"reward_mean", "reward_std", "reward_jpeg_incompressibility", "group_std_mean", "zero_std_ratio",
                "loss", "positive_loss", "negative_loss", "kl", "old_deviation", "x0_norm", "grad_norm", "eta",
                *TIMING_KEYS}  # fmt: skip
    assert expected <= training[0].keys()
    assert all(v is None or v == v for v in training[0].values())  # no NaN
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "run.json").is_file()
    assert latest_checkpoint(tmp_path).name == "iteration_000001"
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert list((tmp_path / "samples").glob("rollout_*.png"))
    assert list((tmp_path / "tensorboard").iterdir())


def test_at_iteration_zero_old_equals_trained_and_loss_is_the_torch_path():
    trainer = Trainer(tiny_config(), progress=False)
    x0 = torch.randn(4, *trainer.model.sample_shape)
    noise = torch.randn_like(x0)
    t = trainer.grid[torch.tensor([0, 1, 2, 3])]
    r = torch.tensor([0.0, 0.3, 0.7, 1.0])
    text = trainer.model.encode_text(["a red circle"] * 4)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        with trainer.policies.role("old") as old:
            v_old = trainer.velocity_fn(old, text, 1.0)(x_t, t)
        with trainer.policies.role("trained") as trained:
            v_theta = trainer.velocity_fn(trained, text, 1.0)(x_t, t)
        with trainer.policies.role("ref") as ref:
            v_ref = trainer.velocity_fn(ref, text, 1.0)(x_t, t)
    assert torch.equal(v_old, v_theta)
    out = trainer.nft_step(x0, noise, t, r, text)
    nft = trainer.config.nft
    expected = nft_loss(v_theta, v_old, x0, noise, t, r, beta=nft.beta, v_ref=v_ref, kl_coef=nft.kl_coef,
                        adv_clip_max=nft.adv_clip_max, backend="torch")  # fmt: skip
    assert torch.allclose(out.loss, expected.loss, rtol=1e-6, atol=0)


def test_exact_resume(tmp_path):
    # Evaluation off: a run stopped at iteration 1 evaluates there, an uninterrupted one does not.
    straight = train(tiny_config(["eval.every=0"], iterations=2), tmp_path / "straight")
    train(tiny_config(["eval.every=0"], iterations=1), tmp_path / "split")
    assert main(["train", "--resume", str(tmp_path / "split"), "--iterations", "2", "logging.progress=false"]) == 0
    resumed = Trainer(tiny_config(["eval.every=0"]), progress=False)
    from fastnft.checkpoint import load_checkpoint

    load_checkpoint(resumed, latest_checkpoint(tmp_path / "split"))
    assert resumed.iteration == straight.iteration == 2
    assert resumed.optimizer_steps == straight.optimizer_steps == 2
    assert_bitwise_equal(snapshot(straight), snapshot(resumed))

    def rows(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]

    assert rows("straight") == rows("split")


def test_a_checkpoint_killed_before_its_rename_is_ignored(tmp_path):
    train(tiny_config(iterations=1), tmp_path)
    half_written = tmp_path / "checkpoints" / ".tmp-iteration_000002"
    half_written.mkdir()
    (half_written / "garbage").write_text("interrupted")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iteration_000001"]
    assert main(["train", "--resume", str(tmp_path), "--iterations", "2", "logging.progress=false"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "iteration_000002"
    assert not half_written.exists()


@pytest.mark.parametrize(
    ("overrides", "expected_eta"), [([], 0.001), (["old_policy.eta_rate=0.4", "old_policy.eta_max=0.25"], 0.25)]
)
def test_soft_update_ema_and_step_counting_after_one_iteration(overrides, expected_eta):
    trainer = Trainer(tiny_config(overrides), progress=False)
    before = snapshot(trainer)
    row = trainer.run_iteration()
    after = snapshot(trainer)
    assert trainer.optimizer_steps == 1
    eta, decay = row["eta"], ema_decay(1)
    assert eta == pytest.approx(expected_eta) and decay == pytest.approx(2 / 11)
    assert any(not torch.equal(after["trained"][n], before["trained"][n]) for n in after["trained"])
    for name, theta in after["trained"].items():
        assert torch.equal(after["ema"][name], torch.lerp(before["ema"][name], theta.float(), 1 - decay))
        assert torch.equal(after["old"][name], torch.lerp(before["old"][name], theta, 1 - eta))


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


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["nft.beta=-1"], "nft.beta: must be > 0"),
        (["nft.bogus=1"], "nft.bogus: unknown key"),
        (["rollout.group_size=1"], "rollout.group_size: must be >= 2"),
        (["nft.micro_batch_size=3"], "nft.micro_batch_size: must divide"),
        (["model.path=/no/such/dir"], "model.path: no such directory"),
        (["prompts.train=/no/such/prompts.txt"], "prompts.train: no such file"),
        (["nft.beta=[1, 2]"], "nft.beta: expected float"),
    ],
)
def test_config_errors_exit_2_with_one_line(tmp_path, capsys, arguments, message):
    code = main(["train", str(TINY_CONFIG), "--out", str(tmp_path), *arguments])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and message in error and "Traceback" not in error


def test_resume_refuses_a_different_config(tmp_path, capsys):
    train(tiny_config(iterations=1), tmp_path)
    quiet = ["logging.progress=false", "logging.tensorboard=false"]
    code = main(["train", str(TINY_CONFIG), "--resume", str(tmp_path), "nft.beta=0.5", *quiet])
    error = capsys.readouterr().err
    assert code == 2 and "differs from the run's in nft.beta" in error and "logging" not in error
    assert load_config(tmp_path / "config.yaml").nft.beta == 1.0


def test_two_optimizer_steps_per_iteration_update_the_ema_twice():
    trainer = Trainer(tiny_config(["optim.steps_per_iteration=2"]), progress=False)
    row = trainer.run_iteration()
    assert trainer.optimizer_steps == 2 and row["optimizer_steps"] == 2
    assert row["eta"] == pytest.approx(old_policy_eta(1, 2))


def test_init_lora_warm_starts_every_copy(tmp_path):
    first = train(tiny_config(["optim.lr=0.05", "eval.every=0"], iterations=1), tmp_path / "first")
    exported = tmp_path / "first" / "export" / "pytorch_lora_weights.safetensors"
    warm = Trainer(tiny_config([f"model.init_lora={exported}"]), progress=False)
    assert warm.iteration == 0  # a warm start, not a resume
    for name, ema in first.policies.ema.items():
        assert torch.equal(warm.policies.trained_parameters()[name].detach(), ema)
        assert torch.equal(warm.policies.old_parameters()[name].detach(), ema)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_missing_optional_optimizer_is_a_config_error(tmp_path, capsys):
    code = main(["train", str(TINY_CONFIG), "--out", str(tmp_path), "optim.name=adamw8bit-bnb"])
    assert code == 2 and "optim.name: adamw8bit-bnb needs bitsandbytes" in capsys.readouterr().err


def test_evaluation_at_start_with_and_without_guidance(tmp_path):
    overrides = ["eval.at_start=true", "eval.cfg_scales=[1.5, 3]", "eval.images_per_prompt=2", "eval.every=0"]
    train(tiny_config(overrides, iterations=1), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    free, guided = rows[0], rows[1]
    assert free["iteration"] == guided["iteration"] == 0
    assert "eval_reward_mean" in free and not any("cfg" in key for key in free)
    assert "eval_reward_mean" not in guided
    scales = [guided["eval_reward_mean_cfg_1.5"], guided["eval_reward_mean_cfg_3"]]
    assert guided["eval_reward_mean_cfg"] == max(scales) and scales[0] != scales[1]
    assert (tmp_path / "samples" / "eval_000000_cfg_3.png").is_file()


def test_batched_old_and_reference_forwards_equal_separate_ones():
    trainer = Trainer(tiny_config(["nft.batch_old_ref=true"]), progress=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an old adapter unlike the trained one and the base
        for parameter in trainer.policies.old_parameters().values():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    x = torch.randn(3, *trainer.model.sample_shape, generator=generator)
    t = torch.tensor([0.2, 0.5, 0.9])
    text = trainer.model.encode_text(["a red circle", "a cat", "two stars"])
    with torch.no_grad():
        with trainer.policies.role("old") as old:
            v_old = trainer.velocity_fn(old, text, 1.0)(x, t)
        with trainer.policies.role("ref") as ref:
            v_ref = trainer.velocity_fn(ref, text, 1.0)(x, t)
        with trainer.policies.old_then_reference() as both:
            doubled = trainer.velocity_fn(both, type(text).cat([text, text]), 1.0)(torch.cat([x, x]), torch.cat([t, t]))
        with trainer.policies.role("old") as old:
            after = trainer.velocity_fn(old, text, 1.0)(x, t)
    assert not torch.allclose(v_old, v_ref, atol=1e-3)
    torch.testing.assert_close(doubled[:3], v_old, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(doubled[3:], v_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, v_old)  # the row mask is gone afterwards
    with pytest.raises(ConfigError, match=r"nft\.batch_old_ref: needs LoRA"):
        tiny_config(["nft.batch_old_ref=true", "lora.enabled=false"])
