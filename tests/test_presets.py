"""The bench's presets of published models (SD3.5-Medium, FLUX.1-dev, Qwen-Image, Wan 2.1 T2V 1.3B
and 14B), checked on CPU without allocating them (meta device)."""

import pytest
import torch

from fastnft.bench.switches import preset_path
from fastnft.config import check_recipe, load_config
from fastnft.models import build_model, check_model_rules, resolve_kind
from fastnft.models.presets import build_preset
from fastnft.models.synthetic import synthetic_text
from fastnft.sampling import timestep_grid


def test_the_sd35m_preset_has_sd35_mediums_size_and_layout():
    components = build_preset("sd35m", seed=0, device="meta")
    transformer, vae = components["transformer"], components["vae"]
    assert next(transformer.parameters()).device.type == "meta"
    assert sum(p.numel() for p in transformer.parameters()) == pytest.approx(2.243e9, rel=1e-3)
    assert len(transformer.transformer_blocks) == 24
    assert sum(block.attn2 is not None for block in transformer.transformer_blocks) == 13  # MMDiT-X
    assert vae.config.latent_channels == 16 and vae.config.shift_factor == pytest.approx(0.0609)


def test_synthetic_prompt_embeddings_have_the_real_shapes_and_depend_on_the_prompt_alone():
    options = dict(sequence_length=77 + 128, width=4096, pooled_width=2048, device=torch.device("cpu"))
    both = synthetic_text(["a cat", "a dog"], dtype=torch.float32, **options)
    assert both.sequence.shape == (2, 205, 4096) and both.pooled.shape == (2, 2048)
    alone = synthetic_text(["a dog"], dtype=torch.float32, **options)
    assert torch.equal(alone.sequence[0], both.sequence[1]) and torch.equal(alone.pooled[0], both.pooled[1])
    assert not torch.equal(both.sequence[0], both.sequence[1])
    assert synthetic_text(["a cat"], dtype=torch.bfloat16, **options).sequence.dtype == torch.bfloat16


@pytest.mark.parametrize(("preset", "resolution", "images"), [("sd35m", 512, 36), ("sd35m-1024", 1024, 18)])
def test_the_bench_presets_are_valid_trainer_configs(preset, resolution, images):
    config = load_config(preset_path(preset))
    assert config.model.preset == "sd35m" and config.model.resolution == resolution
    assert config.rollout.groups * config.rollout.group_size == images
    assert config.nft.kl_coef == pytest.approx(1e-4)  # the reference recipe's


def test_the_flux_dev_preset_has_flux1_devs_size_and_layout():
    components = build_preset("flux-dev", seed=0, device="meta")
    transformer, vae = components["transformer"], components["vae"]
    assert sum(p.numel() for p in transformer.parameters()) == pytest.approx(11.90e9, rel=1e-3)
    assert len(transformer.transformer_blocks) == 19 and len(transformer.single_transformer_blocks) == 38
    assert transformer.config.guidance_embeds and components["scheduler"].config.use_dynamic_shifting
    assert vae.config.scaling_factor == pytest.approx(0.3611) and vae.config.shift_factor == pytest.approx(0.1159)


@pytest.mark.parametrize(("preset", "resolution"), [("flux-dev", 1024), ("flux-dev-512", 512)])
def test_the_flux_bench_presets_divide_over_1_2_4_and_8_processes(preset, resolution):
    config = load_config(preset_path(preset))
    check_model_rules(config)
    assert resolve_kind(config.model) == "flux" and config.model.resolution == resolution
    for processes in (1, 2, 4, 8):
        check_recipe(config, processes)


def test_the_flux_dev_preset_runs_a_forward_on_the_meta_device_with_real_shapes():
    """The synthetic-text FLUX adapter on FLUX.1-dev's real config: packing, ids and the guidance
    input line up (shapes only, nothing allocated)."""
    config = load_config(preset_path("flux-dev-512"))
    model = build_model(config.model, 0, torch.device("meta"), torch.bfloat16)
    assert model.sample_shape == (16, 64, 64)
    text = model.encode_text(["a cat"])
    assert text.sequence.shape == (1, 512, 4096) and text.pooled.shape == (1, 768)
    x = torch.randn(2, *model.sample_shape, device="meta")
    velocity = model.velocity(model.transformer, x, torch.tensor([0.5, 0.9], device="meta"), text.repeat_interleave(2))
    assert velocity.shape == x.shape


def linear(inputs: int, outputs: int) -> int:
    """Parameters of a linear layer with bias."""
    return inputs * outputs + outputs


def qwen_image_parameters(*, heads: int, head_dim: int, layers: int, joint: int, channels: int, patch: int) -> int:
    """QwenImageTransformer2DModel's parameter count written out from its architecture: each block
    has an image and a text stream, each with a 6D modulation, q, k, v and output projections and a
    4x MLP; RMS norms of q and k per head in both streams; LayerNorms without weights."""
    d = heads * head_dim
    block = 2 * linear(d, 6 * d) + 8 * linear(d, d) + 4 * head_dim + 2 * (linear(d, 4 * d) + linear(4 * d, d))
    embed = linear(4 * channels, d) + joint + linear(joint, d) + linear(256, d) + linear(d, d)  # img_in, txt_*, time
    head = linear(d, 2 * d) + linear(d, patch * patch * channels)  # AdaLN-continuous, proj_out
    return layers * block + embed + head


def wan_parameters(*, heads: int, head_dim: int, layers: int, ffn: int, text: int, freq: int, channels: int) -> int:
    """WanTransformer3DModel's (text-to-video, 1x2x2 patches): each block has self- and
    cross-attention (q, k, v, out; RMS norms of q and k across heads), the affine cross-attention
    norm, an FFN and a 6D modulation table; around them the patch embedding, time and text
    embeddings, the 6D time projection, the output projection and its 2D table."""
    d, patch = heads * head_dim, 4
    block = 8 * linear(d, d) + 4 * d + 2 * d + linear(d, ffn) + linear(ffn, d) + 6 * d
    embed = (
        channels * patch * d + d + linear(freq, d) + linear(d, d) + linear(d, 6 * d) + linear(text, d) + linear(d, d)
    )
    head = linear(d, channels * patch) + 2 * d
    return layers * block + embed + head


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_qwen_image_preset_has_qwen_images_size_and_layout():
    components = build_preset("qwen-image", seed=0, device="meta", dtype=torch.bfloat16)
    transformer, vae, scheduler = components["transformer"], components["vae"], components["scheduler"]
    expected = qwen_image_parameters(heads=24, head_dim=128, layers=60, joint=3584, channels=16, patch=2)
    assert parameters(transformer) == expected == 20_430_401_088  # "20B" (Qwen-Image's report: 20.4 B)
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}  # built in the frozen weights' dtype
    assert len(transformer.transformer_blocks) == 60 and not transformer.config.guidance_embeds
    assert vae.config.z_dim == 16 and len(vae.config.latents_mean) == len(vae.config.latents_std) == 16
    assert next(vae.parameters()).dtype == torch.float32
    config = scheduler.config
    assert config.use_dynamic_shifting and (config.base_shift, config.max_shift) == (0.5, 0.9)
    assert (config.base_image_seq_len, config.max_image_seq_len, config.shift_terminal) == (256, 8192, 0.02)


@pytest.mark.parametrize(
    ("preset", "heads", "layers", "ffn", "size"),
    [("wan2.1-1.3b", 12, 30, 8960, 1_418_996_800), ("wan2.1-14b", 40, 40, 13824, 14_288_491_584)],
)
def test_the_wan21_presets_have_their_published_sizes(preset, heads, layers, ffn, size):
    components = build_preset(preset, seed=0, device="meta", dtype=torch.bfloat16)
    transformer = components["transformer"]
    expected = wan_parameters(heads=heads, head_dim=128, layers=layers, ffn=ffn, text=4096, freq=256, channels=16)
    assert parameters(transformer) == expected == size
    assert len(transformer.blocks) == layers
    # as from_pretrained(torch_dtype=bf16) loads Wan: modulation, time embedding and norms in float32
    float32 = {name for name, p in transformer.named_parameters() if p.dtype == torch.float32}
    assert "scale_shift_table" in float32 and "blocks.0.norm2.weight" in float32
    assert "condition_embedder.time_embedder.linear_1.weight" in float32
    assert transformer.patch_embedding.weight.dtype == transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    vae, scheduler = components["vae"], components["scheduler"]
    assert next(vae.parameters()).dtype == torch.float32  # the VAE stays float32, as WanAdapter keeps it
    assert (vae.config.scale_factor_temporal, vae.config.scale_factor_spatial, vae.config.z_dim) == (4, 8, 16)
    assert len(vae.config.latents_mean) == 16 and vae.config.latents_std[0] == pytest.approx(2.8184)
    assert type(scheduler).__name__ == "UniPCMultistepScheduler"
    assert scheduler.config.use_flow_sigmas and scheduler.config.flow_shift == 3.0  # Wan's 480p setting


@pytest.mark.parametrize(
    ("preset", "kind", "resolution", "frames"),
    [("qwen-image", "qwen-image", 1024, 1), ("wan2.1-1.3b", "wan", 640, 33), ("wan2.1-14b", "wan", 640, 33)],
)
def test_the_qwen_image_and_wan_bench_presets_divide_over_1_2_4_and_8_processes(preset, kind, resolution, frames):
    config = load_config(preset_path(preset))
    check_model_rules(config)  # the family's rules, from the preset's configs (no directory)
    assert config.model.preset == preset and resolve_kind(config.model) == kind
    assert config.model.resolution == resolution and (config.model.frames or 1) == frames
    assert config.nft.kl_coef == pytest.approx(1e-4) and config.model.t5_max_length == 512
    for processes in (1, 2, 4, 8):
        check_recipe(config, processes)


def test_the_qwen_image_preset_runs_a_forward_on_the_meta_device_with_real_shapes():
    """Random Qwen2.5-VL embeddings of the real width with a mask, packing and img_shapes line up
    on Qwen-Image's real config; its dynamic grid is the scheduler's (shapes only, nothing allocated)."""
    config = load_config(preset_path("qwen-image"))
    model = build_model(config.model, 0, torch.device("meta"), torch.bfloat16)
    assert type(model).__name__ == "SyntheticTextQwenImageAdapter" and model.sample_shape == (16, 128, 128)
    text = model.encode_text(["a cat", "a dog"])
    assert text.sequence.shape == (2, 512, 3584) and text.pooled.shape == (2, 0) and text.mask.shape == (2, 512)
    assert text.sequence.dtype == torch.bfloat16
    x = torch.randn(2, *model.sample_shape, device="meta")
    assert model.velocity(model.transformer, x, torch.tensor([0.5, 0.9], device="meta"), text).shape == x.shape
    grid = model.timestep_grid(10, None)
    assert grid[0] == 1.0 and grid[-2].item() == pytest.approx(0.02) and grid[-1] == 0.0  # shift_terminal


@pytest.mark.parametrize("preset", ["wan2.1-1.3b", "wan2.1-14b"])
def test_the_wan21_presets_run_a_forward_on_the_meta_device_with_real_shapes(preset):
    """Random UMT5 embeddings (512 x 4096) feed Wan's real config at 33 frames; the inputs take the
    patch embedding's dtype though the first parameter is kept in float32."""
    config = load_config(preset_path(preset))
    model = build_model(config.model, 0, torch.device("meta"), torch.bfloat16)
    assert type(model).__name__ == "SyntheticTextWanAdapter" and model.sample_shape == (16, 9, 80, 80)
    text = model.encode_text(["a cat"])
    assert text.sequence.shape == (1, 512, 4096) and text.pooled.shape == (1, 0) and text.mask is None
    assert text.sequence.dtype == torch.bfloat16 and next(model.transformer.parameters()).dtype == torch.float32
    x = torch.randn(1, *model.sample_shape, device="meta")
    assert model.velocity(model.transformer, x, torch.tensor([0.5], device="meta"), text).shape == x.shape
    assert model.tokens == 9 * 40 * 40  # 640^2 / (8 x 2)^2 a frame: 480p's 832 x 480 makes 9 * 52 * 30
    assert model.default_shift == 3.0  # the UniPC scheduler's flow_shift, Wan's 480p setting
    assert torch.equal(model.timestep_grid(10, None), timestep_grid(10, 3.0))
    assert not torch.equal(model.timestep_grid(10, None), timestep_grid(10, 5.0))
