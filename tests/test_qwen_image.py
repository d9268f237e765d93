"""Qwen-Image through `model.path` with `model.kind: auto`: a tiny QwenImagePipeline directory
written by the pipeline's own save_pretrained (Qwen2.5-VL text encoder with the pipeline's chat
template, a 3-D VAE with per-channel latents_mean/std, a dynamic-shift scheduler with Qwen-Image's
config) trains, resumes bit-exactly, and an exported LoRA reproduces `fastnft sample` inside
diffusers' QwenImagePipeline, with and without true CFG."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastnft.cli import main
from fastnft.models import TextEmbedding
from fastnft.models.flux import pack, unpack
from fastnft.models.presets import BASIC_WORDS, QWEN_IMAGE_SCHEDULER, seeded
from fastnft.rng import keyed_randn
from fastnft.run import train
from fastnft.trainer import Trainer
from tests.helpers import assert_resume_is_bit_exact, metrics_rows, tiny_config, train_fails
from tests.test_distributed import (
    fsdp2_full_fine_tuning_matches_one_rank,
    one_thread,  # noqa: F401 (a fixture, used by name)
)

# QwenImagePipeline's prompt template (its prompt_template_encode), from which it drops 34 tokens
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROPPED = 34  # QwenImagePipeline.prompt_template_encode_start_idx: the system prefix under Qwen's BPE


def qwen_word_tokenizer():
    """A word-level stand-in for Qwen2Tokenizer that splits the template's system prefix into the
    34 tokens Qwen's BPE makes of it: <|im_start|> and <|im_end|> special, "\\n" a token of its
    own (without it the prefix is 31 tokens and a blank negative prompt fails in the pipeline).
    No BOS or EOS is added, as Qwen2's tokenizer adds none; padding on the right."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "\n"])}
    for word in [
        *re.findall(r"\w+|[^\w\s]+", TEMPLATE.replace("<|im_start|>", "").replace("<|im_end|>", "")),
        *BASIC_WORDS,
    ]:
        vocab.setdefault(word.lower(), len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")]
    )
    tokenizer.add_tokens([AddedToken("\n", normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=1024
    )


def tiny_qwen_image_components(seed: int) -> dict[str, object]:
    """Qwen-Image's layout in miniature: the MMDiT with 2x2-patch input, a 3-D VAE (2x spatial,
    one frame) with z_dim entries of latents_mean/std, Qwen2.5-VL with multimodal RoPE sections
    summing to half its head dim and a tiny vision tower, and Qwen-Image's scheduler config."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_word_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 16: mrope_section sums to 8
        num_key_value_heads=1,
        max_position_embeddings=1200,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        bos_token_id=None,
        eos_token_id=3,
        pad_token_id=0,
    )
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]
    )
    with seeded(seed):
        return {
            "transformer": QwenImageTransformer2DModel(
                patch_size=2,
                in_channels=16,  # 4 latent channels in 2x2 patches
                out_channels=4,
                num_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                axes_dims_rope=(4, 6, 6),
            ),
            "vae": AutoencoderKLQwenImage(
                base_dim=8,
                z_dim=4,
                dim_mult=[1, 2],
                num_res_blocks=1,
                temperal_downsample=[False],
                latents_mean=[0.1, -0.2, 0.3, 0.05],
                latents_std=[1.5, 2.0, 0.8, 1.2],
            ),
            "text_encoder": Qwen2_5_VLForConditionalGeneration(
                Qwen2_5_VLConfig(text_config=text, vision_config=vision)
            ),
            "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        }


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from diffusers import QwenImagePipeline

    path = tmp_path_factory.mktemp("qwen-image-tiny")
    QwenImagePipeline(**tiny_qwen_image_components(seed=7)).save_pretrained(path)
    return path


def qwen_overrides(path, *extra: str) -> list[str]:
    """configs/tiny.yaml on the Qwen-Image directory: the kind comes from its model_index.json."""
    return ["model.kind=auto", "model.preset=null", f"model.path={path}", *extra]


def load_pipeline(path):
    from diffusers import QwenImagePipeline

    pipeline = QwenImagePipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_the_directory_has_qwen_image_layout(qwen_dir):
    index = json.loads((qwen_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    for component in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (qwen_dir / component).is_dir()
    pipeline = load_pipeline(qwen_dir)
    assert pipeline.prompt_template_encode == TEMPLATE and pipeline.prompt_template_encode_start_idx == DROPPED
    prefix = TEMPLATE[: TEMPLATE.index("{}")]
    assert len(pipeline.tokenizer(prefix).input_ids) == DROPPED  # the tokenizer drops what the pipeline drops


def test_text_embeddings_are_the_pipelines_and_pad_across_batches(qwen_dir):
    """encode_text is encode_prompt (mask included), and embeddings of batches of different
    lengths joined by TextEmbedding.cat (the text cache) give the velocity each gives alone."""
    trainer = Trainer(tiny_config(qwen_overrides(qwen_dir)), progress=False)
    model = trainer.model
    prompts = ["a red circle", "two blue squares on the left of a big tree"]
    text = model.encode_text(prompts)
    expected, mask = load_pipeline(qwen_dir).encode_prompt(prompts, max_sequence_length=16)
    assert text.pooled.shape == (2, 0) and text.mask is not None
    assert torch.equal(text.sequence, expected) and torch.equal(text.mask, mask)
    assert model.encode_text(["a red circle"]).mask is None  # unpadded: the pipeline passes no mask
    assert text.mask.sum(1).tolist() == [5 + 3, 5 + 10]  # the prompt's words and the template's 5 closing tokens

    short, long = model.encode_text(prompts[:1]), model.encode_text(prompts[1:])
    table = TextEmbedding.cat([short, long])
    assert torch.equal(table.mask, text.mask)  # the same padding as one batch of both
    torch.testing.assert_close(table.sequence, text.sequence)  # up to the encoder's batched arithmetic
    x = torch.randn(1, *model.sample_shape)
    t = torch.tensor([0.7])
    with trainer.policies.role("ref") as module, torch.no_grad():
        alone = model.velocity(module, x, t, short)
        padded = model.velocity(module, x, t, table.index([0]))
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)


def test_trains_through_model_path_and_resumes_bit_exactly(qwen_dir, tmp_path):
    overrides = qwen_overrides(qwen_dir, "eval.every=0", "model.text_encoding=cached")
    straight = assert_resume_is_bit_exact(overrides, tmp_path)
    assert type(straight.model).__name__ == "QwenImageAdapter" and straight.model.sample_shape == (4, 16, 16)
    trained = straight.policies.trained_parameters()
    for block in range(2):
        for projection in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            adapted = any(f"transformer_blocks.{block}.attn.{projection}.lora_A" in name for name in trained)
            # all but the last block's text queries and output: the transformer discards what they make
            assert adapted == (block == 0 or projection not in ("add_q_proj", "to_add_out")), (block, projection)
    assert all(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n)  # each adapted layer learnt

    rows = metrics_rows(tmp_path / "straight")
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows)


def test_full_fine_tuning_resumes_bit_exactly_though_some_layers_get_no_gradient(qwen_dir, tmp_path):
    """The last block's text-stream output layers (to_add_out, txt_mlp) make what the transformer
    discards: the loss never reaches them. They step with a zero gradient, so the checkpointed
    optimizer state covers them and a resume loads."""
    overrides = qwen_overrides(qwen_dir, "eval.every=0", "lora.enabled=false")
    straight = assert_resume_is_bit_exact(overrides, tmp_path)
    optimizer = straight.update.optimizer
    assert all(p in optimizer.state for group in optimizer.param_groups for p in group["params"])


def test_text_embeddings_of_different_lengths_join_padded_and_masked():
    short = TextEmbedding(torch.ones(1, 2, 3), torch.zeros(1, 0))  # no mask: every token counts
    long = TextEmbedding(torch.full((2, 4, 3), 2.0), torch.zeros(2, 0), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    table = TextEmbedding.cat([short, long])
    assert table.sequence.shape == (3, 4, 3) and table.pooled.shape == (3, 0)
    assert table.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert torch.equal(table.sequence[0, 2:], torch.zeros(2, 3))  # zeros, as the pipeline pads
    picked = table.index([2, 0]).repeat_interleave(2).cast(torch.float64).to(torch.device("cpu"))
    assert picked.mask.tolist() == [[1, 1, 1, 1]] * 2 + [[1, 1, 0, 0]] * 2 and picked.mask.dtype == torch.long
    # SD3 and FLUX: one fixed length and no mask stay as they were
    fixed = TextEmbedding.cat([TextEmbedding(torch.ones(1, 4, 3), torch.ones(1, 2))] * 2)
    assert fixed.mask is None and fixed.sequence.shape == (2, 4, 3)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32) / 255


def test_exported_lora_reproduces_fastnft_sample_in_qwen_image_pipeline(qwen_dir, tmp_path):
    """Without CFG and with true CFG (--cfg 4 against true_cfg_scale 4 and the negative prompt
    " "): every pixel within 1.5/255 of the pipeline with the exported LoRA loaded."""
    overrides = qwen_overrides(qwen_dir, "optim.lr=0.05", "eval.sampler=euler", "eval.steps=4", "eval.every=0")
    config = tiny_config(overrides, iterations=1)
    run = tmp_path / "run"
    trainer = train(config, run)
    pipeline = load_pipeline(qwen_dir)
    pipeline.load_lora_weights(run / "export")
    # The evaluation's initial noise, [C, H, W] keyed as the sampler draws it, packed the pipeline's way.
    latents = pack(keyed_randn(trainer.model.sample_shape, config.eval.seed, 0, [0], "eval_noise"))

    def generate(cfg: float) -> torch.Tensor:
        image = pipeline(
            prompt="a red circle",
            negative_prompt=" " if cfg > 1 else None,
            true_cfg_scale=cfg,
            latents=latents,
            num_inference_steps=4,
            height=32,
            width=32,
            max_sequence_length=config.model.t5_max_length,
            output_type="pt",
        ).images[0]
        return image.permute(1, 2, 0).float().clamp(0, 1)

    for cfg in (1.0, 4.0):
        out = tmp_path / f"sampled-{cfg}"
        arguments = ["sample", str(run), "--prompts", "a red circle", "--cfg", str(cfg), "--out", str(out)]
        assert main(arguments) == 0
        expected = generate(cfg)
        difference = np.abs(_pixels(out / "0000.png") - (expected * 255).round().numpy() / 255).max()
        print(f"cfg {cfg}: max pixel difference {difference * 255:.2f}/255")
        assert difference <= 1.5 / 255, f"cfg {cfg}: max pixel difference {difference * 255:.2f}/255"

    with_lora = generate(1.0)
    pipeline.unload_lora_weights()  # and the LoRA is what makes the difference
    moved = (generate(1.0) - with_lora).abs().max()
    print(f"unloading the LoRA moves pixels by up to {moved * 255:.1f}/255")
    assert moved > 3 / 255  # well past the tolerance above


def test_guided_velocity_is_the_pipelines_true_cfg(qwen_dir):
    """The trainer's guided field (Velocity with TextConditioning's empty prompt, here " ")
    against the pipeline's true-CFG arithmetic on the same inputs: two separate transformer
    calls, the conditional unpadded, combined and rescaled per packed token."""
    trainer = Trainer(tiny_config(qwen_overrides(qwen_dir, "model.text_encoding=cached")), progress=False)
    model, velocity = trainer.model, trainer.update.velocity
    pipeline = load_pipeline(qwen_dir)
    prompts = ["a red circle", "two blue squares on the left of a big tree"]
    x = torch.randn(2, *model.sample_shape)
    t = torch.tensor([0.8, 0.3])
    scale = 4.0
    with trainer.policies.role("ref") as module, torch.no_grad():
        guided = velocity.field(module, model.encode_text(prompts), scale)(x, t)
        expected = []
        for row, prompt in enumerate(prompts):  # as the pipeline runs one prompt
            predictions = []
            for text in (prompt, " "):
                embeds, mask = pipeline.encode_prompt(text, max_sequence_length=16)
                predictions.append(
                    module(
                        hidden_states=pack(x[row : row + 1]),
                        timestep=t[row : row + 1],
                        encoder_hidden_states=embeds,
                        encoder_hidden_states_mask=mask,
                        img_shapes=[[(1, 8, 8)]],
                        return_dict=False,
                    )[0]
                )
            conditional, negative = predictions
            combined = negative + scale * (conditional - negative)
            rescaled = combined * (
                torch.norm(conditional, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True)
            )
            expected.append(unpack(rescaled, 16, 16))
    assert trainer.rollout.conditioning.cache.row.keys() >= {" "}  # the negative prompt is cached, not ""
    torch.testing.assert_close(guided, torch.cat(expected), rtol=0, atol=1e-5)
    unscaled = velocity.field(module, model.encode_text(prompts), 1.0)(x, t)
    assert not torch.allclose(guided, unscaled, atol=1e-3)


@pytest.mark.parametrize("resolution", [32, 64])
def test_the_grid_is_the_pipeline_schedulers_at_that_resolution(qwen_dir, resolution):
    steps = 6
    trainer = Trainer(tiny_config(qwen_overrides(qwen_dir, f"model.resolution={resolution}")), progress=False)
    grid = trainer.model.timestep_grid(steps, None)
    assert torch.equal(trainer.rollout.grid, trainer.model.timestep_grid(4, None))  # rollout.steps of tiny.yaml

    pipeline = load_pipeline(qwen_dir)
    pipeline(
        prompt="a cat",
        true_cfg_scale=1.0,
        num_inference_steps=steps,
        height=resolution,
        width=resolution,
        max_sequence_length=16,
        output_type="latent",
    )
    assert torch.equal(grid, pipeline.scheduler.sigmas.float())

    # The closed form: mu linear in the token count between (256, 0.5) and (8192, 0.9), the
    # exponential shift exp(mu) / (exp(mu) + 1 / s - 1) of linspace(1, 1/steps, steps), then
    # stretched so that the last nonzero sigma is shift_terminal 0.02, then 0.
    tokens = (resolution // 2 // 2) ** 2
    mu = 0.5 + (tokens - 256) * (0.9 - 0.5) / (8192 - 256)
    shifted = np.array([math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in np.linspace(1.0, 1.0 / steps, steps)])
    stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.02))
    assert np.allclose(grid.numpy(), [*stretched, 0.0], atol=1e-6)


def test_packing_and_latent_normalisation_are_the_pipelines(qwen_dir):
    from diffusers import QwenImagePipeline

    latents = torch.randn(2, 4, 6, 8)
    packed = pack(latents)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(latents, 2, 4, 6, 8))
    # _unpack_latents takes the image size and the VAE's factor (2 here) and adds the frame axis
    assert torch.equal(QwenImagePipeline._unpack_latents(packed, 12, 16, 2)[:, :, 0], unpack(packed, 6, 8))

    trainer = Trainer(tiny_config(qwen_overrides(qwen_dir)), progress=False)
    model = trainer.model
    images = torch.rand(2, 3, 32, 32)
    latents = model.encode_images(images)
    assert latents.shape == (2, *model.sample_shape)
    raw = model.vae.encode((images * 2 - 1).unsqueeze(2)).latent_dist.mode()[:, :, 0]
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.05]), torch.tensor([1.5, 2.0, 0.8, 1.2])
    torch.testing.assert_close(latents, (raw - mean.view(4, 1, 1)) / std.view(4, 1, 1))
    decoded = model.vae.decode((latents * std.view(4, 1, 1) + mean.view(4, 1, 1)).unsqueeze(2)).sample[:, :, 0]
    torch.testing.assert_close(model.decode(latents), (decoded / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("component", ["text_encoder", "tokenizer", "vae"])
def test_a_missing_component_is_named_before_anything_loads(capsys, tmp_path, qwen_dir, component):
    path = tmp_path / "qwen"
    shutil.copytree(qwen_dir, path)
    shutil.rmtree(path / component)
    line = train_fails(capsys, tmp_path, *qwen_overrides(path))
    assert line.startswith("fastnft: error: ")
    assert f"model.path: {path} has no {component}/ directory (a Qwen-Image pipeline directory holds" in line


def test_an_index_alone_is_a_missing_component(capsys, tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    assert f"model.path: {path} has no transformer/ directory" in train_fails(capsys, tmp_path, *qwen_overrides(path))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.resolution=34", "model.resolution: 34 is not a multiple of 4 (the VAE's 2x downsampling"),
        ("model.resolution=30", "model.resolution: 30 is not a multiple of 4 (the VAE's 2x downsampling"),
        ("rollout.shift=3.0", "rollout.shift: this qwen-image model shifts its grid by the image size"),
        ("model.kind=flux", "model.kind: flux loads a FluxPipeline directory, but"),
        ("model.t5_max_length=1025", "model.t5_max_length: Qwen-Image encodes at most 1024 text tokens"),
        ("model.guidance=3.5", "model.guidance: this qwen-image transformer takes no guidance input"),
        ("model.vae_channels_last=true", "model.vae_channels_last: the Qwen-Image VAE is 3-D"),
    ],
)
def test_bad_qwen_image_settings_name_their_field(capsys, tmp_path, qwen_dir, override, message):
    assert message in train_fails(capsys, tmp_path, *qwen_overrides(qwen_dir), override)


def test_the_qwen_image_recipe_keeps_the_reference_nft_values(qwen_dir, tmp_path):
    from fastnft.cli import default_config_path
    from fastnft.config import load_config, to_dict

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    configs = default_config_path().parent
    train_prompts = f"prompts.train={prompts}"
    qwen = to_dict(load_config(configs / "qwen_image_pickscore.yaml", [f"model.path={qwen_dir}", train_prompts]))
    sd35m = to_dict(load_config(configs / "sd35m_pickscore.yaml", ["model.preset=sd35m", train_prompts]))
    for section in ("nft", "old_policy", "ema", "optim", "eval", "checkpoint"):
        assert qwen[section] == sd35m[section], section
    assert {**qwen["rollout"], "shift": 3.0} == sd35m["rollout"] and qwen["rollout"]["shift"] is None
    assert {**qwen["lora"], "target_modules": []} == {**sd35m["lora"], "target_modules": []}
    assert qwen["lora"]["target_modules"] == []  # the family's default (QwenImageAdapter.default_lora_targets)
    assert (qwen["model"]["kind"], qwen["model"]["t5_max_length"]) == ("qwen-image", 512)


@pytest.mark.usefixtures("one_thread")  # as each torchrun rank runs
def test_fsdp2_full_fine_tuning_of_qwen_image_matches_one_rank(qwen_dir, tmp_path):
    """Qwen-Image's blocks sharded with FSDP2 (adapter.repeated_blocks) on 2 processes train the
    weights one unsharded process trains, the last block's text-only layers (no gradient) included."""
    end = fsdp2_full_fine_tuning_matches_one_rank(qwen_overrides(qwen_dir), tmp_path)
    assert "transformer_blocks.1.attn.to_add_out.weight" in end["policies"]["trained"]
