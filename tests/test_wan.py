"""Wan text-to-video through `model.path` with `model.kind: auto`: tiny WanPipeline directories
written by the pipeline's own save_pretrained, in Wan 2.1's layout (a causal 3-D VAE with
per-channel latent statistics, UMT5, one transformer) and Wan 2.2 TI2V-5B's (a residual VAE that
patchifies, a time per latent token), train, resume bit-exactly, and an exported LoRA reproduces
`fastnft sample` inside diffusers' WanPipeline on every pixel of every frame."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastnft.cli import main
from fastnft.models.presets import BASIC_WORDS, seeded, word_tokenizer
from fastnft.models.wan import input_dtype
from fastnft.rewards import WeightedRewards, build_reward
from fastnft.rng import keyed_randn
from fastnft.run import train
from fastnft.sampling import timestep_grid
from fastnft.trainer import Trainer, build_rewards
from fastnft.visual import even_frames
from tests.helpers import assert_resume_is_bit_exact, metrics_rows, tiny_config, train_fails
from tests.test_distributed import (
    fsdp2_full_fine_tuning_matches_one_rank,
    one_thread,  # noqa: F401 (a fixture, used by name)
)

FRAMES = 9  # 3 latent frames through the VAE's 4x temporal stride
SHIFT = 3.0  # the tiny directory scheduler's; Wan 2.1 ships flow_shift 3.0 for 480p


def tiny_wan_components(seed: int, ti2v: bool = False) -> dict[str, object]:
    """Wan's layout in miniature. The VAE's scale_factor_spatial / scale_factor_temporal are its
    real strides (AutoencoderKLWan and WanPipeline trust the config): two stages, each halving
    space and time, so 4x and 4x; Wan 2.2's residual VAE also patchifies 2x2 pixels, so 8x.
    Non-trivial latents_mean and latents_std, so the normalisation is exercised."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = word_tokenizer(BASIC_WORDS, 512)
    channels = 8 if ti2v else 4
    residual = {"is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12, "decoder_base_dim": 12}
    with seeded(seed):
        return {
            "transformer": WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=12,
                in_channels=channels,
                out_channels=channels,
                text_dim=32,
                freq_dim=16,
                ffn_dim=32,
                num_layers=2,
                rope_max_seq_len=32,
            ),
            "vae": AutoencoderKLWan(
                base_dim=8,
                z_dim=channels,
                dim_mult=[1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[True, True],
                latents_mean=[0.1 * i - 0.2 for i in range(channels)],
                latents_std=[0.5 + 0.25 * i for i in range(channels)],
                scale_factor_temporal=4,
                scale_factor_spatial=8 if ti2v else 4,
                **(residual if ti2v else {}),
            ),
            "text_encoder": UMT5EncoderModel(
                UMT5Config(
                    vocab_size=len(tokenizer),
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
            "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
        }


def _write(path, ti2v: bool):
    from diffusers import WanPipeline

    WanPipeline(**tiny_wan_components(seed=7, ti2v=ti2v), expand_timesteps=ti2v).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("wan21-tiny"), ti2v=False)


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("wan22-ti2v-tiny"), ti2v=True)


def wan_overrides(path, *extra: str) -> list[str]:
    """configs/tiny.yaml on the Wan directory: the kind comes from its model_index.json."""
    return ["model.kind=auto", "model.preset=null", f"model.path={path}", f"model.frames={FRAMES}", *extra]


def test_the_directories_have_wans_layouts(wan_dir, wan22_dir):
    for path, expand in ((wan_dir, False), (wan22_dir, True)):
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"] == "WanPipeline" and index["expand_timesteps"] is expand
        assert index["boundary_ratio"] is None and index["transformer_2"] == [None, None]
    assert json.loads((wan22_dir / "vae" / "config.json").read_text())["is_residual"] is True


def test_trains_through_model_path_and_resumes_bit_exactly(wan_dir, tmp_path):
    overrides = wan_overrides(wan_dir, "eval.every=0")
    straight = assert_resume_is_bit_exact(overrides, tmp_path)
    assert type(straight.model).__name__ == "WanAdapter" and straight.model.sample_shape == (4, 3, 8, 8)
    trained = straight.policies.trained_parameters()
    for name in ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v"):
        assert any(f"blocks.1.{name}.lora_A" in key for key in trained), name
    assert not any("ffn" in key for key in trained)
    assert any(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n)  # the LoRA learnt

    rows = metrics_rows(tmp_path / "straight")
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows)
    grid = Image.open(tmp_path / "straight" / "samples" / "rollout_000002.png")  # 8 videos, a strip each
    assert grid.size[0] == 8 * 160 and grid.size[1] > 8 * 160


def _strip_frames(path, frames: int) -> np.ndarray:
    """[F, H, W, 3] in [0, 1] from a frame strip (the frames side by side)."""
    strip = np.asarray(Image.open(path), dtype=np.float32) / 255
    return np.stack(np.split(strip, frames, axis=1))


@pytest.mark.parametrize("layout", ["wan21", "wan22-ti2v"])
def test_exported_lora_reproduces_fastnft_sample_in_wan_pipeline(wan_dir, wan22_dir, tmp_path, layout):
    from diffusers import WanPipeline

    path = wan_dir if layout == "wan21" else wan22_dir
    overrides = wan_overrides(path, "optim.lr=0.05", "eval.sampler=euler", "eval.steps=4", "eval.every=0")
    config = tiny_config(overrides, iterations=1)
    run = tmp_path / "run"
    trainer = train(config, run)
    out = tmp_path / "sampled"
    assert main(["sample", str(run), "--prompts", "a red circle", "--out", str(out)]) == 0
    sampled = _strip_frames(out / "0000.png", FRAMES)
    gif = Image.open(out / "0000.gif")
    assert gif.n_frames == FRAMES and gif.size == (32, 32)

    pipeline = WanPipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(run / "export")
    latents = keyed_randn(trainer.model.sample_shape, config.eval.seed, 0, [0], "eval_noise")  # the sampler's

    def generate():
        return pipeline(
            prompt="a red circle",
            latents=latents,
            guidance_scale=1.0,  # no CFG, as the evaluation (WanPipeline's default is 5.0)
            num_inference_steps=4,
            height=32,
            width=32,
            num_frames=FRAMES,
            max_sequence_length=config.model.t5_max_length,
            output_type="pt",
        ).frames[0]  # [F, 3, H, W]

    video = generate()
    expected = (video.permute(0, 2, 3, 1).float().clamp(0, 1) * 255).round().numpy() / 255
    assert expected.shape == sampled.shape == (FRAMES, 32, 32, 3)
    difference = np.abs(sampled - expected).max()
    assert difference <= 1.5 / 255, f"max pixel difference {difference * 255:.2f}/255"

    pipeline.unload_lora_weights()  # and the LoRA is what makes the difference
    assert (generate() - video).abs().max() > 3 / 255  # well past the tolerance above


def test_the_grid_is_the_pipeline_schedulers(wan_dir, tmp_path):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    steps = 6
    trainer = Trainer(tiny_config(wan_overrides(wan_dir)), progress=False)
    assert trainer.model.default_shift == SHIFT
    grid = trainer.model.timestep_grid(steps, None)
    assert torch.equal(trainer.rollout.grid, trainer.model.timestep_grid(4, None))  # rollout.steps of tiny.yaml

    pipeline = WanPipeline.from_pretrained(wan_dir)
    pipeline.set_progress_bar_config(disable=True)
    pipeline(
        prompt="a cat",
        num_inference_steps=steps,
        height=32,
        width=32,
        num_frames=FRAMES,
        guidance_scale=1.0,
        max_sequence_length=16,
        output_type="latent",
    )
    assert torch.equal(grid, pipeline.scheduler.sigmas.float())
    assert torch.equal(grid, timestep_grid(steps, SHIFT))  # the shifted grid every family steps on

    # rollout.shift rebuilds the scheduler with that shift, as diffusers' Wan examples do
    rebuilt = WanPipeline.from_pretrained(wan_dir)
    rebuilt.scheduler = type(rebuilt.scheduler).from_config(rebuilt.scheduler.config, shift=5.0)
    rebuilt.scheduler.set_timesteps(steps)
    assert torch.equal(trainer.model.timestep_grid(steps, 5.0), rebuilt.scheduler.sigmas.float())

    # Wan's own directories ship UniPC with flow sigmas: its flow_shift is the static shift
    unipc = tmp_path / "unipc"
    shutil.copytree(wan_dir, unipc)
    shutil.rmtree(unipc / "scheduler")
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    scheduler.save_pretrained(unipc / "scheduler")
    index = json.loads((unipc / "model_index.json").read_text())
    (unipc / "model_index.json").write_text(
        json.dumps({**index, "scheduler": ["diffusers", "UniPCMultistepScheduler"]})
    )
    model = Trainer(tiny_config(wan_overrides(unipc)), progress=False).model
    assert model.default_shift == 5.0
    assert torch.equal(model.timestep_grid(steps, None), timestep_grid(steps, 5.0))


def test_the_text_encoding_is_the_pipelines(wan_dir):
    from diffusers import WanPipeline

    model = Trainer(tiny_config(wan_overrides(wan_dir, "model.t5_max_length=12")), progress=False).model
    prompts = ["a red circle", "two  yellow stars on the left"]
    text = model.encode_text(prompts)
    pipeline = WanPipeline.from_pretrained(wan_dir)
    with torch.no_grad():  # as the adapter encodes (autograd takes other kernels: 1e-6 apart)
        expected, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=12)
    assert torch.equal(text.sequence, expected) and text.pooled.shape == (2, 0)
    assert text.sequence.shape[1] == 12
    assert (text.sequence[0, 5:] == 0).all() and (text.sequence[0, :5] != 0).any(dim=-1).all()  # <bos> 3 <eos>


def test_bf16_weights_take_bf16_inputs_though_diffusers_keeps_some_in_float32(wan_dir):
    """model.precision bf16 (the recipe's): from_pretrained keeps Wan's modulation tables, time
    embedding and norms in float32, the first parameter among them; the inputs take the patch
    embedding's dtype, so the velocity runs (a float32 input would meet bf16 convolution weights)."""
    model = Trainer(tiny_config(wan_overrides(wan_dir, "model.precision=bf16")), progress=False).model
    transformer = model.transformer
    assert next(transformer.parameters()).dtype == torch.float32  # scale_shift_table
    assert transformer.patch_embedding.weight.dtype == torch.bfloat16 == input_dtype(transformer)
    x = torch.randn(2, *model.sample_shape)
    with torch.no_grad():
        velocity = model.velocity(transformer, x, torch.tensor([0.3, 0.8]), model.encode_text(["a cat", "a dog"]))
    assert velocity.shape == x.shape and velocity.dtype == torch.bfloat16 and velocity.isfinite().all()


def test_even_frames():
    assert even_frames(9, 2) == [0, 8]
    assert even_frames(9, 3) == [0, 4, 8]
    assert even_frames(81, 4) == [0, 27, 53, 80]
    assert even_frames(5, 5) == [0, 1, 2, 3, 4]
    assert even_frames(9, 1) == [4]  # one frame: the middle one
    with pytest.raises(ValueError):
        even_frames(4, 5)


def test_a_video_reward_is_the_mean_of_the_image_reward_on_evenly_picked_frames(wan_dir):
    videos = torch.rand(3, 3, FRAMES, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts, metadata = ["a cat", "a dog", "a red circle"], [{}, {}, {}]
    config = tiny_config(wan_overrides(wan_dir, "rewards=[{name: jpeg_incompressibility, frames: 2}]"))
    rewards = build_rewards(config)
    assert rewards.frames == [2]
    scored = rewards(videos, prompts, metadata)

    image_reward = build_reward("jpeg_incompressibility")
    first, last = (image_reward(videos[:, :, frame], prompts, metadata).score.double() for frame in (0, FRAMES - 1))
    assert torch.allclose(scored.score.double(), (first + last) / 2, atol=1e-6)
    assert torch.allclose(scored.extras["reward_jpeg_incompressibility"].double(), (first + last) / 2, atol=1e-6)

    every = WeightedRewards([("jpeg_incompressibility", 1.0, {})])(videos, prompts, metadata)  # None: every frame
    each = torch.stack([image_reward(videos[:, :, f], prompts, metadata).score.double() for f in range(FRAMES)])
    assert torch.allclose(every.score.double(), each.mean(0), atol=1e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.frames=8", "model.frames: 8 frames do not fit the VAE's 4x temporal stride (frames - 1 must be"),
        ("model.resolution=36", "model.resolution: 36 is not a multiple of 8 (the VAE's 4x downsampling"),
        ("rewards=[{name: jpeg_incompressibility, frames: 10}]", "rewards[0].frames: 10 frames of 9-frame videos"),
        ("model.kind=flux", "model.kind: flux loads a FluxPipeline directory, but"),
        ("model.vae_channels_last=true", "model.vae_channels_last: applies to 2-D VAEs; Wan's is 3-D"),
    ],
)
def test_bad_wan_settings_name_their_field(capsys, tmp_path, wan_dir, override, message):
    line = train_fails(capsys, tmp_path, *wan_overrides(wan_dir), override)
    assert line.startswith("fastnft: error: ") and message in line, line


def test_the_wan22_vae_strides_name_their_own_numbers(capsys, tmp_path, wan22_dir):
    line = train_fails(capsys, tmp_path, *wan_overrides(wan22_dir), "model.resolution=40")
    assert "model.resolution: 40 is not a multiple of 16 (the VAE's 8x downsampling times the transformer's 2x2" in line


def test_a_missing_component_is_named_before_anything_loads(capsys, tmp_path, wan_dir):
    path = tmp_path / "wan"
    shutil.copytree(wan_dir, path)
    shutil.rmtree(path / "text_encoder")
    line = train_fails(capsys, tmp_path, *wan_overrides(path))
    assert f"model.path: {path} has no text_encoder/ directory (a Wan pipeline directory holds" in line


def test_two_experts_are_refused(capsys, tmp_path, wan_dir):
    """Wan 2.2 A14B's layout: transformer_2 switched at boundary_ratio."""
    path = tmp_path / "wan-a14b"
    shutil.copytree(wan_dir, path)
    shutil.copytree(path / "transformer", path / "transformer_2")
    index = json.loads((path / "model_index.json").read_text())
    index.update(boundary_ratio=0.875, transformer_2=["diffusers", "WanTransformer3DModel"])
    (path / "model_index.json").write_text(json.dumps(index))
    line = train_fails(capsys, tmp_path, *wan_overrides(path))
    assert "holds two experts (transformer_2, switched at boundary_ratio: Wan 2.2 A14B)" in line


def test_an_image_family_takes_one_frame(capsys, tmp_path):
    line = train_fails(capsys, tmp_path, "model.frames=5")
    assert line == "fastnft: error: model.frames: this sd3 model makes images (1 frame); got 5"
    line = train_fails(capsys, tmp_path, "rewards=[{name: jpeg_incompressibility, frames: 2}]")
    assert "rewards[0].frames: 2 frames of images (this sd3 model's samples)" in line


def test_the_wan_recipe_keeps_the_reference_nft_values(wan_dir, tmp_path):
    from fastnft.cli import default_config_path
    from fastnft.config import load_config, to_dict
    from fastnft.models import check_model_rules

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    configs = default_config_path().parent
    train_prompts = f"prompts.train={prompts}"
    wan = load_config(configs / "wan21_1.3b_pickscore.yaml", [f"model.path={wan_dir}", train_prompts])
    check_model_rules(wan)  # its frames and resolution fit Wan's strides
    wan = to_dict(wan)
    sd35m = to_dict(load_config(configs / "sd35m_pickscore.yaml", ["model.preset=sd35m", train_prompts]))
    for section in ("nft", "old_policy", "ema", "optim", "checkpoint"):
        assert wan[section] == sd35m[section], section
    assert wan["rollout"]["shift"] is None  # the directory's (Wan 2.1 1.3B: UniPC's flow_shift 3.0)
    assert wan["lora"]["target_modules"] == []  # the family's default (attn1 and attn2 projections)
    assert (wan["model"]["kind"], wan["model"]["t5_max_length"]) == ("wan", 512)
    assert wan["rewards"][0]["name"] == "pickscore" and wan["rewards"][0]["frames"] is not None


@pytest.mark.usefixtures("one_thread")  # as each torchrun rank runs
def test_fsdp2_full_fine_tuning_of_wan_matches_one_rank(wan_dir, tmp_path):
    """Wan's blocks sharded with FSDP2 (adapter.repeated_blocks) on 2 processes train the weights
    one unsharded process trains."""
    end = fsdp2_full_fine_tuning_matches_one_rank(wan_overrides(wan_dir), tmp_path)
    assert any(name.startswith("blocks.1.ffn.") for name in end["policies"]["trained"])  # full fine-tuning
