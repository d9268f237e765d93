"""SD3.5-Medium's directory layout in miniature: the shipped recipes load from a local pipeline
directory, and an exported LoRA reproduces `fastnft sample` inside diffusers' own pipeline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastnft.cli import default_config_path, main
from fastnft.config import load_config
from fastnft.models.presets import build_preset
from fastnft.models.sd3 import JOINT_ATTENTION_PROJECTIONS
from fastnft.rng import keyed_randn
from fastnft.run import train
from tests.helpers import tiny_config

CONFIGS = default_config_path().parent
SMALL = [
    "model.resolution=32",
    "model.clip_max_length=16",
    "model.t5_max_length=16",
    "rollout.groups=2",
    "rollout.group_size=2",
    "rollout.batch_size=4",
    "nft.micro_batch_size=2",
    "rollout.steps=3",
    "eval.every=0",
    "logging.progress=false",
    "logging.tensorboard=false",
    "logging.sample_grid_every=0",
    "lora.rank=4",
    "lora.alpha=8",
]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """transformer/ (with a dual-attention block), vae/ (with shift_factor), text_encoder{,_2,_3}/,
    tokenizer{,_2,_3}/, scheduler/, model_index.json."""
    from diffusers import StableDiffusion3Pipeline

    path = tmp_path_factory.mktemp("sd35m-tiny")
    StableDiffusion3Pipeline(**build_preset("tiny-sd3", seed=7)).save_pretrained(path)
    return path


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\na cat\n")
    return path


def test_pipeline_directory_has_sd35m_layout(pipeline_dir):
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    for component in [
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
    ]:
        assert component in index and (pipeline_dir / component).is_dir()
    transformer = json.loads((pipeline_dir / "transformer" / "config.json").read_text())
    assert transformer["dual_attention_layers"] == [0] and transformer["qk_norm"] == "rms_norm"
    assert "shift_factor" in json.loads((pipeline_dir / "vae" / "config.json").read_text())


@pytest.mark.parametrize("recipe", ["sd35m_geneval", "sd35m_pickscore", "sd35m_multireward"])
def test_recipes_resolve_to_the_reference_values(pipeline_dir, prompt_file, recipe):
    config = load_config(CONFIGS / f"{recipe}.yaml", [f"model.path={pipeline_dir}", f"prompts.train={prompt_file}"])
    assert (config.rollout.groups, config.rollout.group_size, config.nft.micro_batch_size) == (48, 24, 9)
    steps = 25 if recipe == "sd35m_multireward" else 10  # the reference's multi-reward config samples 25
    assert (config.rollout.sampler, config.rollout.steps, config.rollout.shift) == ("dpm2m", steps, 3.0)
    assert config.rollout.guidance_scale == 1.0 and config.eval.guidance_scale == 1.0
    assert config.nft.beta == (0.1 if recipe == "sd35m_multireward" else 1.0)
    assert (config.nft.kl_coef, config.nft.adv_clip_max, config.nft.timestep_fraction) == (1e-4, 5.0, 0.99)
    assert (config.nft.loss_space, config.nft.std_scope, config.old_policy.schedule) == ("x0", "global", 1)
    assert (config.lora.rank, config.lora.alpha, config.lora.init) == (32, 64, "gaussian")
    assert config.lora.target_modules == list(JOINT_ATTENTION_PROJECTIONS)
    optim = config.optim
    assert (optim.name, optim.lr, optim.betas, optim.weight_decay, optim.eps, optim.grad_clip) == (
        "adamw",
        3e-4,
        [0.9, 0.999],
        1e-4,
        1e-8,
        1.0,
    )
    assert (config.model.resolution, config.model.clip_max_length, config.model.t5_max_length) == (512, 77, 128)
    assert (config.eval.every, config.eval.sampler, config.eval.steps) == (10, "euler", 40)
    rewards = {
        "sd35m_geneval": ["http"],
        "sd35m_pickscore": ["pickscore"],
        "sd35m_multireward": ["pickscore", "clipscore", "hpsv2"],
    }
    assert [r.name for r in config.rewards] == rewards[recipe] and {r.weight for r in config.rewards} == {1.0}


def test_a_recipe_whose_reward_paths_are_unset_names_them(pipeline_dir, prompt_file, capsys, tmp_path):
    arguments = ["train", str(CONFIGS / "sd35m_pickscore.yaml"), "--out", str(tmp_path), f"model.path={pipeline_dir}"]
    assert main([*arguments, f"prompts.train={prompt_file}", *SMALL]) == 2
    assert "rewards: reward 'pickscore': set options.path to a local directory" in capsys.readouterr().err


def test_geneval_recipe_trains_from_a_local_pipeline_directory(pipeline_dir, prompt_file, tmp_path):
    overrides = [
        f"model.path={pipeline_dir}",
        f"prompts.train={prompt_file}",
        "iterations=1",
        *SMALL,
        "rewards=[{name: jpeg_incompressibility}]",
    ]
    trainer = train(load_config(CONFIGS / "sd35m_geneval.yaml", overrides), tmp_path / "run")
    assert trainer.iteration == 1
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["iteration"] == 1 and np.isfinite(row["loss"])


def test_exported_lora_reproduces_fastnft_sample_in_the_diffusers_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    config = tiny_config(["optim.lr=0.05", "eval.sampler=euler", "eval.steps=4", "eval.every=0"], iterations=1)
    run = tmp_path / "run"
    trainer = train(config, run)
    assert any(p.abs().max() > 0 for n, p in trainer.policies.ema.items() if "lora_B" in n)  # the LoRA does something

    assert main(["sample", str(run), "--prompts", "a red circle", "--out", str(tmp_path / "sampled")]) == 0
    sampled = np.asarray(Image.open(tmp_path / "sampled" / "0000.png"), dtype=np.float32) / 255

    pipeline = StableDiffusion3Pipeline(**build_preset("tiny-sd3", seed=config.seed))
    pipeline.tokenizer_max_length = config.model.clip_max_length
    pipeline.load_lora_weights(run / "export")
    latents = keyed_randn(trainer.model.sample_shape, config.eval.seed, 0, [0], "eval_noise")

    def generate() -> torch.Tensor:
        return pipeline(
            prompt="a red circle",
            latents=latents,
            guidance_scale=1.0,
            num_inference_steps=4,
            height=32,
            width=32,
            max_sequence_length=config.model.t5_max_length,
            output_type="pt",
        ).images[0]

    image = generate()
    expected = (image.permute(1, 2, 0).float().clamp(0, 1) * 255).round().numpy() / 255
    assert np.abs(sampled - expected).max() <= 1.5 / 255

    pipeline.unload_lora_weights()  # and the LoRA is what makes the difference
    base = generate()
    assert not torch.allclose(base, image, atol=1e-3)


def test_eval_command_writes_metrics(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(["eval.every=0"], iterations=1), run)
    assert main(["eval", str(run)]) == 0
    metrics = json.loads((run / "eval" / "eval.json").read_text())
    assert metrics["iteration"] == 1 and metrics["eval_reward_mean"] > 0
    assert "eval_reward_jpeg_incompressibility" in metrics


@pytest.mark.parametrize(
    "overrides", [[], ["model.kind=sd3-pixel", "model.preset=null", "model.path=pkg:fastnft/assets/shapes-base"]]
)
def test_codec_round_trip_shapes(overrides):
    """encode_images maps images into the transformer's sample space, decode maps back to [0, 1]."""
    from fastnft.trainer import Trainer

    trainer = Trainer(tiny_config(overrides), progress=False)
    images = torch.rand(2, 3, 32, 32)
    samples = trainer.model.encode_images(images)
    assert samples.shape == (2, *trainer.model.sample_shape)
    decoded = trainer.model.decode(samples)
    assert decoded.shape == images.shape and 0 <= decoded.min() and decoded.max() <= 1
    if overrides:  # the pixel codec is the identity up to [-1, 1] scaling
        assert torch.allclose(decoded, images, atol=1e-6)
