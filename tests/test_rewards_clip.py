"""CLIP-family rewards from local directories: tiny random CLIP models saved to a temporary
directory and loaded through the same code as real ones."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from fastnft.models.presets import BASIC_WORDS, word_tokenizer
from fastnft.rewards import build_reward
from fastnft.rewards.clip import AestheticHead, ClipPreprocess
from fastnft.rewards.convert_hps import convert

PROMPTS = ["a red cat", "two blue dogs on a table", "a green tree"]


def tiny_clip(directory, *, vision_width=64, text_width=64, hidden_act="quick_gelu", seed=0, eos_token_id=3):
    tokenizer = word_tokenizer(BASIC_WORDS, 16)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=2,
            num_attention_heads=text_width // 64,
            max_position_embeddings=16,
            hidden_act=hidden_act,
            layer_norm_eps=1e-5,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            num_hidden_layers=2,
            num_attention_heads=vision_width // 64,
            image_size=48,
            patch_size=16,
            hidden_act=hidden_act,
            layer_norm_eps=1e-5,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(directory)
    return model, tokenizer


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    model, tokenizer = tiny_clip(directory)
    return directory, model, tokenizer


def uint8_images(count=3, height=40, width=56, seed=0):
    generator = np.random.default_rng(seed)
    return generator.integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


def reference_embeddings(model, tokenizer, directory, pixels_uint8, prompts):
    """The model's own embeddings, preprocessed by transformers' CLIPImageProcessor (PIL)."""
    processor = CLIPImageProcessor.from_pretrained(directory)
    pixel_values = processor(images=[Image.fromarray(a) for a in pixels_uint8], return_tensors="pt")["pixel_values"]
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixel_values)
    return out


def as_float(pixels_uint8):
    return torch.from_numpy(pixels_uint8).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize(
    ("name", "formula"),
    [
        ("clipscore", lambda out: out.logits_per_image.diagonal() / 100),
        ("pickscore", lambda out: out.logits_per_image.diagonal() / 26),
        ("hpsv2", lambda out: torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)),
    ],
)
def test_scores_follow_the_reference_formula_on_the_models_own_embeddings(clip_dir, name, formula):
    directory, model, tokenizer = clip_dir
    pixels = uint8_images()
    expected = formula(reference_embeddings(model, tokenizer, directory, pixels, PROMPTS))
    score = build_reward(name, path=str(directory))(as_float(pixels), PROMPTS, [{}] * 3).score
    torch.testing.assert_close(score, expected.float(), atol=1e-2, rtol=0)  # on-device preprocessing vs PIL


def test_on_device_preprocessing_matches_clip_image_processor(clip_dir):
    directory = clip_dir[0]
    pixels = uint8_images(height=61, width=45, seed=1)
    processor = CLIPImageProcessor.from_pretrained(directory)
    expected = processor(images=[Image.fromarray(a) for a in pixels], return_tensors="pt")["pixel_values"]
    ours = ClipPreprocess(directory)(as_float(pixels))
    assert ours.shape == expected.shape
    assert (ours - expected).abs().mean() < 0.05  # bicubic resampling differs slightly from PIL's


def test_aesthetic_is_the_mlp_on_the_normalised_image_embedding(clip_dir, tmp_path):
    directory, model, tokenizer = clip_dir
    torch.manual_seed(1)
    head = AestheticHead(width=16)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    pixels = uint8_images()
    out = reference_embeddings(model, tokenizer, directory, pixels, PROMPTS)
    expected = head.eval()(torch.nn.functional.normalize(out.image_embeds, dim=-1)).detach()
    score = build_reward("aesthetic", path=str(directory), head=str(tmp_path / "head.pth"))(
        as_float(pixels), PROMPTS, [{}] * 3
    ).score
    torch.testing.assert_close(score, expected, atol=1e-2, rtol=0)


def test_missing_directories_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"reward 'pickscore': set options\.path"):
        build_reward("pickscore")
    with pytest.raises(ValueError, match=f"options.path = {tmp_path / 'nope'} is not a directory"):
        build_reward("clipscore", path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="cannot load a CLIP model"):
        build_reward("hpsv2", path=str(tmp_path))


def open_clip_layout(model: CLIPModel) -> dict[str, torch.Tensor]:
    """The names and layouts open_clip uses for the same weights (written independently of the
    converter, from open_clip's module structure)."""
    state = model.state_dict()
    out = {
        "logit_scale": state["logit_scale"],
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].t(),
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
        "visual.proj": state["visual_projection.weight"].t(),
    }
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        for i in range(2):
            source, target = f"{tower}.encoder.layers.{i}", f"{prefix}transformer.resblocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{target}.attn.in_proj_{kind}"] = torch.cat(
                    [state[f"{source}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                )
                out[f"{target}.attn.out_proj.{kind}"] = state[f"{source}.self_attn.out_proj.{kind}"]
                out[f"{target}.ln_1.{kind}"] = state[f"{source}.layer_norm1.{kind}"]
                out[f"{target}.ln_2.{kind}"] = state[f"{source}.layer_norm2.{kind}"]
                out[f"{target}.mlp.c_fc.{kind}"] = state[f"{source}.mlp.fc1.{kind}"]
                out[f"{target}.mlp.c_proj.{kind}"] = state[f"{source}.mlp.fc2.{kind}"]
    return out


def test_hps_conversion_of_an_open_clip_state_dict(tmp_path):
    # open_clip pools the text at the highest token id (transformers' eos_token_id = 2 behaviour)
    original, tokenizer = tiny_clip(tmp_path / "original", vision_width=128, hidden_act="gelu", seed=3, eos_token_id=2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in open_clip_layout(original).items()}}, tmp_path / "hps.pt")
    out = convert(tmp_path / "hps.pt", tmp_path / "hps", tokenizer=tmp_path / "original")
    converted = CLIPModel.from_pretrained(out).eval()
    assert converted.config.vision_config.num_attention_heads == 2 and converted.config.vision_config.image_size == 48
    pixels = torch.rand(2, 3, 48, 48)
    tokens = tokenizer(PROMPTS[:2], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        a = original(**tokens, pixel_values=pixels)
        b = converted(**tokens, pixel_values=pixels)
    torch.testing.assert_close(b.logits_per_image, a.logits_per_image)
    score = build_reward("hpsv2", path=str(out))(pixels, PROMPTS[:2], [{}] * 2).score
    assert score.shape == (2,) and bool(torch.isfinite(score).all())
