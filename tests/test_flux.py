"""FLUX.1 through `model.path` with `model.kind: auto`: a tiny FluxPipeline directory written by
the pipeline's own save_pretrained (guidance embedding, a VAE with shift and scaling factors,
CLIP-L + T5, a dynamic-shift scheduler) trains, resumes bit-exactly, and an exported LoRA
reproduces `fastnft sample` inside diffusers' FluxPipeline."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastnft.cli import main
from fastnft.models.flux import image_ids, pack, unpack
from fastnft.models.presets import BASIC_WORDS, FLUX_DEV_SCHEDULER, FLUX_VAE, seeded, word_tokenizer
from fastnft.rng import keyed_randn
from fastnft.run import train
from fastnft.trainer import Trainer
from tests.helpers import assert_resume_is_bit_exact, metrics_rows, tiny_config, train_fails
from tests.test_distributed import (
    fsdp2_full_fine_tuning_matches_one_rank,
    one_thread,  # noqa: F401 (a fixture, used by name)
)

GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, and the adapter's


def tiny_flux_components(seed: int) -> dict[str, object]:
    """FLUX.1-dev's layout in miniature: double and single blocks with a guidance embedding, a 2x
    VAE with FLUX's shift and scaling factors, CLIP (pooled) and T5 (sequence), and FLUX.1-dev's
    dynamic-shift scheduler config."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer = word_tokenizer(BASIC_WORDS, 77)
    vocab_size = len(clip_tokenizer)
    with seeded(seed):
        return {
            "transformer": FluxTransformer2DModel(
                patch_size=1,
                in_channels=16,  # 4 latent channels in 2x2 patches
                num_layers=1,
                num_single_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=16,
                guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),
            ),
            "vae": AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(4, 8),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=4,
                sample_size=32,
                shift_factor=FLUX_VAE["shift_factor"],
                scaling_factor=FLUX_VAE["scaling_factor"],
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=vocab_size,
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    max_position_embeddings=77,
                    pad_token_id=0,
                    bos_token_id=2,
                    eos_token_id=3,
                )
            ),
            "text_encoder_2": T5EncoderModel(
                T5Config(
                    vocab_size=vocab_size,
                    d_model=32,
                    d_ff=64,
                    num_layers=2,
                    num_heads=2,
                    d_kv=16,
                    pad_token_id=0,
                    eos_token_id=3,
                    decoder_start_token_id=0,
                )
            ),
            "tokenizer": clip_tokenizer,
            "tokenizer_2": word_tokenizer(BASIC_WORDS, 512),
            "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        }


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from diffusers import FluxPipeline

    path = tmp_path_factory.mktemp("flux-tiny")
    FluxPipeline(**tiny_flux_components(seed=7)).save_pretrained(path)
    return path


def flux_overrides(path, *extra: str) -> list[str]:
    """configs/tiny.yaml on the FLUX directory: the kind comes from its model_index.json."""
    return ["model.kind=auto", "model.preset=null", f"model.path={path}", *extra]


def test_the_directory_has_flux_dev_layout(flux_dir):
    index = json.loads((flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (flux_dir / component).is_dir()
    assert json.loads((flux_dir / "transformer" / "config.json").read_text())["guidance_embeds"] is True
    assert json.loads((flux_dir / "scheduler" / "scheduler_config.json").read_text())["use_dynamic_shifting"] is True


def test_trains_through_model_path_and_resumes_bit_exactly(flux_dir, tmp_path):
    overrides = flux_overrides(flux_dir, "eval.every=0")
    straight = assert_resume_is_bit_exact(overrides, tmp_path)
    assert type(straight.model).__name__ == "FluxAdapter" and straight.model.sample_shape == (4, 16, 16)
    assert "single_transformer_blocks.1.proj_out" in straight.model.default_lora_targets
    trained = straight.policies.trained_parameters()
    assert any("single_transformer_blocks.0.proj_out" in name for name in trained)
    assert not any(name.startswith("proj_out") for name in trained)  # not the final output layer
    assert any(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n)  # the LoRA learnt

    rows = metrics_rows(tmp_path / "straight")
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows)


def test_exported_lora_reproduces_fastnft_sample_in_flux_pipeline(flux_dir, tmp_path):
    from diffusers import FluxPipeline

    overrides = flux_overrides(flux_dir, "optim.lr=0.05", "eval.sampler=euler", "eval.steps=4", "eval.every=0")
    config = tiny_config(overrides, iterations=1)
    run = tmp_path / "run"
    trainer = train(config, run)
    assert main(["sample", str(run), "--prompts", "a red circle", "--out", str(tmp_path / "sampled")]) == 0
    sampled = np.asarray(Image.open(tmp_path / "sampled" / "0000.png"), dtype=np.float32) / 255

    pipeline = FluxPipeline.from_pretrained(flux_dir)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.tokenizer_max_length = config.model.clip_max_length
    pipeline.load_lora_weights(run / "export")
    # The evaluation's initial noise, [C, H, W] keyed as the sampler draws it, packed the pipeline's way.
    latents = pack(keyed_randn(trainer.model.sample_shape, config.eval.seed, 0, [0], "eval_noise"))

    def generate():
        return pipeline(
            prompt="a red circle",
            latents=latents,
            guidance_scale=GUIDANCE,  # FLUX's embedded guidance: the adapter's default
            num_inference_steps=4,
            height=32,
            width=32,
            max_sequence_length=config.model.t5_max_length,
            output_type="pt",
        ).images[0]

    image = generate()
    expected = (image.permute(1, 2, 0).float().clamp(0, 1) * 255).round().numpy() / 255
    difference = np.abs(sampled - expected).max()
    assert difference <= 1.5 / 255, f"max pixel difference {difference * 255:.2f}/255"

    pipeline.unload_lora_weights()  # and the LoRA is what makes the difference
    assert (generate() - image).abs().max() > 3 / 255  # well past the tolerance above


@pytest.mark.parametrize("resolution", [32, 64])
def test_the_grid_is_the_pipeline_schedulers_at_that_resolution(flux_dir, resolution):
    from diffusers import FluxPipeline

    steps = 6
    trainer = Trainer(tiny_config(flux_overrides(flux_dir, f"model.resolution={resolution}")), progress=False)
    grid = trainer.model.timestep_grid(steps, None)
    assert torch.equal(trainer.rollout.grid, trainer.model.timestep_grid(4, None))  # rollout.steps of tiny.yaml

    pipeline = FluxPipeline.from_pretrained(flux_dir)
    pipeline.set_progress_bar_config(disable=True)
    pipeline(
        prompt="a cat",
        num_inference_steps=steps,
        height=resolution,
        width=resolution,
        max_sequence_length=16,
        output_type="latent",
    )
    assert torch.equal(grid, pipeline.scheduler.sigmas.float())

    # The closed form: mu linear in the token count between (256, 0.5) and (4096, 1.15), and the
    # exponential shift exp(mu) / (exp(mu) + 1 / s - 1) of linspace(1, 1/steps, steps), then 0.
    tokens = (resolution // 2 // 2) ** 2
    mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    expected = [*(math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in sigmas), 0.0]
    assert np.allclose(grid.numpy(), expected, atol=1e-6)


def test_packing_and_positions_are_the_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 6, 8)
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(unpack(packed, 6, 8), latents)
    expected_ids = FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)
    assert torch.equal(image_ids(3, 4, torch.device("cpu")), expected_ids)


def _index_only(tmp_path, text: str):
    path = tmp_path / "model"
    path.mkdir()
    (path / "model_index.json").write_text(text)
    return path


@pytest.mark.parametrize(
    ("class_name", "message"),
    [
        ("StableDiffusionXLPipeline", "holds a StableDiffusionXLPipeline, which fastnft does not support"),
    ],
)
def test_an_unsupported_pipeline_class_is_one_line_naming_it(capsys, tmp_path, class_name, message):
    path = _index_only(tmp_path, json.dumps({"_class_name": class_name}))
    line = train_fails(capsys, tmp_path, *flux_overrides(path))
    assert line.startswith("fastnft: error: model.path: ") and message in line
    assert "supported: StableDiffusion3Pipeline (sd3), FluxPipeline (flux)" in line


@pytest.mark.parametrize(
    ("index", "message"),
    [(None, "model_index.json not found"), ("{not json", "model_index.json is not readable JSON")],
)
def test_a_missing_or_broken_model_index_names_the_file(capsys, tmp_path, index, message):
    path = tmp_path / "model"
    (path / "transformer").mkdir(parents=True)  # not empty (an empty directory is its own error)
    if index is not None:
        (path / "model_index.json").write_text(index)
    line = train_fails(capsys, tmp_path, *flux_overrides(path))
    assert f"model.path: {path / 'model_index.json'}" in line and message in line


def test_a_missing_component_is_named_before_anything_loads(capsys, tmp_path, flux_dir):
    path = tmp_path / "flux"
    shutil.copytree(flux_dir, path)
    shutil.rmtree(path / "text_encoder_2")
    err_line = train_fails(capsys, tmp_path, *flux_overrides(path))
    assert f"model.path: {path} has no text_encoder_2/ directory" in err_line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.resolution=34", "model.resolution: 34 is not a multiple of 4 (the VAE's 2x downsampling"),
        ("rollout.shift=3.0", "rollout.shift: this flux model shifts its grid by the image size"),
        ("model.kind=sd3", "model.kind: sd3 loads a StableDiffusion3Pipeline directory, but"),
        ("model.t5_max_length=513", "model.t5_max_length: FLUX encodes at most 512 T5 tokens; got 513"),
    ],
)
def test_bad_flux_settings_name_their_field(capsys, tmp_path, flux_dir, override, message):
    assert message in train_fails(capsys, tmp_path, *flux_overrides(flux_dir), override)


def test_the_guidance_input_is_a_config_field(flux_dir):
    trainer = Trainer(tiny_config(flux_overrides(flux_dir, "model.guidance=5.0")), progress=False)
    assert trainer.model.guidance == 5.0
    x = torch.randn(1, *trainer.model.sample_shape)
    t = torch.tensor([0.5])
    text = trainer.model.encode_text(["a cat"])
    with trainer.policies.role("ref") as module, torch.no_grad():
        guided = trainer.model.velocity(module, x, t, text)
        trainer.model.guidance = GUIDANCE
        default = trainer.model.velocity(module, x, t, text)
    assert not torch.allclose(guided, default)  # the input reaches the transformer


def test_the_flux_recipe_keeps_the_reference_nft_values(flux_dir, tmp_path):
    from fastnft.cli import default_config_path
    from fastnft.config import load_config, to_dict

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    configs = default_config_path().parent
    train = f"prompts.train={prompts}"
    flux = to_dict(load_config(configs / "flux_dev_pickscore.yaml", [f"model.path={flux_dir}", train]))
    sd35m = to_dict(load_config(configs / "sd35m_pickscore.yaml", ["model.preset=sd35m", train]))
    for section in ("nft", "old_policy", "ema", "optim", "eval", "checkpoint"):
        assert flux[section] == sd35m[section], section
    assert {**flux["rollout"], "shift": 3.0} == sd35m["rollout"] and flux["rollout"]["shift"] is None
    assert {**flux["lora"], "target_modules": []} == {**sd35m["lora"], "target_modules": []}
    assert flux["lora"]["target_modules"] == []  # the family's default (FluxAdapter.default_lora_targets)
    assert (flux["model"]["kind"], flux["model"]["t5_max_length"], flux["model"]["guidance"]) == ("flux", 512, None)


@pytest.mark.usefixtures("one_thread")  # as each torchrun rank runs
def test_fsdp2_full_fine_tuning_of_flux_matches_one_rank(flux_dir, tmp_path):
    """FLUX's double and single blocks sharded with FSDP2 on 2 processes train the weights one
    unsharded process trains."""
    end = fsdp2_full_fine_tuning_matches_one_rank(flux_overrides(flux_dir), tmp_path)
    assert any(name.startswith("single_transformer_blocks.") for name in end["policies"]["trained"])
