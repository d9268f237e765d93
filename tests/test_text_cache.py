"""Prompt embeddings cached at start (model.text_encoding: cached) and offloaded text encoders."""

import pytest
import torch

from fastnft.config import ConfigError
from fastnft.trainer import Trainer
from tests.helpers import tiny_config


def count_text_encoder_calls(trainer: Trainer) -> dict[str, int]:
    calls = dict.fromkeys(trainer.model.text_encoders(), 0)
    for name, module in trainer.model.text_encoders().items():
        module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def test_cached_embeddings_equal_encoded_ones_and_no_encoder_runs_in_an_iteration():
    cached = Trainer(tiny_config(["model.text_encoding=cached"]), progress=False)
    plain = Trainer(tiny_config(), progress=False)
    prompts = cached.train_prompts.prompts[:3]
    from_cache, encoded = cached.rollout.conditioning(prompts), plain.model.encode_text(prompts)
    torch.testing.assert_close(from_cache.sequence, encoded.sequence, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_cache.pooled, encoded.pooled, rtol=1e-5, atol=1e-6)
    every_prompt = {*cached.train_prompts.prompts, *cached.eval_prompts.prompts, ""}
    assert len(cached.rollout.conditioning.cache) == len(every_prompt)

    calls = count_text_encoder_calls(cached)
    row_cached, row_plain = cached.run_iteration(), plain.run_iteration()
    assert set(calls.values()) == {0}
    for key in ("reward_mean", "loss", "grad_norm"):
        assert row_cached[key] == pytest.approx(row_plain[key], rel=1e-4), key


def test_new_prompts_are_encoded_until_the_encoders_are_offloaded():
    trainer = Trainer(tiny_config(["model.text_encoding=cached"]), progress=False)
    calls = count_text_encoder_calls(trainer)
    assert len(trainer.rollout.conditioning(["a prompt nobody cached"])) == 1
    assert min(calls.values()) == 1
    before = len(trainer.rollout.conditioning.cache)
    trainer.rollout.conditioning(["a prompt nobody cached"])
    assert len(trainer.rollout.conditioning.cache) == before and min(calls.values()) == 1  # cached now

    offloaded = Trainer(tiny_config(["model.text_encoding=cached", "model.offload_text_encoders=true"]), progress=False)
    offloaded.run_iteration()
    with pytest.raises(ValueError, match=r"was not cached at start.*offload_text_encoders"):
        offloaded.rollout.conditioning(["a prompt nobody cached"])


def test_offloading_without_the_cache_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.offload_text_encoders: needs model.text_encoding: cached"):
        tiny_config(["model.offload_text_encoders=true"])
