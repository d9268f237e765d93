"""The bench's SD3.5-Medium and FLUX.1-dev presets, checked on CPU without allocating them (meta device)."""

import pytest
import torch

from fastnft.bench.switches import preset_path
from fastnft.config import check_recipe, load_config
from fastnft.models import build_model, check_model_rules, resolve_kind
from fastnft.models.presets import build_preset
from fastnft.models.synthetic import synthetic_text


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
