"""The shipped SD3.5-Medium recipes' own choices, loaded on CPU with random-init components named by
`model.preset` (no pipeline directory, nothing allocated)."""

import pytest

from fastnft.cli import default_config_path
from fastnft.config import check_recipe, load_config
from fastnft.sampling import timestep_grid

CONFIGS = default_config_path().parent


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return path


def test_multireward_recipe_samples_25_steps_and_trains_on_24_times_per_image(prompt_file):
    # The DiffusionNFT reference code's multi-reward config (config/nft.py, sd3_multi_reward) sets
    # sample.num_steps = 25, where its other SD3.5-M recipes keep 10.
    config = load_config(CONFIGS / "sd35m_multireward.yaml", ["model.preset=sd35m", f"prompts.train={prompt_file}"])
    assert config.model.path is None and config.model.preset == "sd35m"
    assert (config.rollout.sampler, config.rollout.steps, config.nft.beta) == ("dpm2m", 25, 0.1)
    assert len(timestep_grid(config.rollout.steps, config.rollout.shift)) == 26  # 25 grid times and the final 0
    # the trainer's count (fastnft/trainer.py, Trainer.train): int(timestep_fraction * steps) per image
    assert config.nft.timestep_fraction == 0.99
    assert int(config.nft.timestep_fraction * config.rollout.steps) == 24
    # the recipe divides: 48 prompts x 24 images into optimizer steps x processes x micro-batches of 9,
    # on 1 to 8 processes (the README launches it on 8); load_config checks 1 process itself
    images = config.rollout.groups * config.rollout.group_size
    assert (images, config.optim.steps_per_iteration, config.nft.micro_batch_size) == (1152, 1, 9)
    for processes in (1, 2, 4, 8):
        assert images % (config.optim.steps_per_iteration * processes * config.nft.micro_batch_size) == 0


@pytest.mark.parametrize(
    ("recipe", "preset"),
    [
        ("flux_dev_lora_1x24gb", "flux-dev"),
        ("flux_dev_lora_1x80gb", "flux-dev"),
        ("qwen_image_lora_2x80gb", "qwen-image"),
        ("qwen_image_lora_1x80gb", "qwen-image"),
        ("wan21_1.3b_lora_1x24gb", "wan2.1-1.3b"),
        ("sd35m_full_1x80gb_8bit", "sd35m"),
    ],
)
def test_the_few_gpu_recipes_load_and_divide_over_their_processes(prompt_file, recipe, preset):
    config = load_config(CONFIGS / f"{recipe}.yaml", [f"model.preset={preset}", f"prompts.train={prompt_file}"])
    processes = 2 if config.dist.strategy == "fsdp2" else 1
    check_recipe(config, world_size=processes)
    assert config.model.gradient_checkpointing  # every few-GPU recipe's plan counts on it
    assert config.model.quantize == "none" or config.lora.enabled
