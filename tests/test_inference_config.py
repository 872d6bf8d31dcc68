"""`InferenceConfig`: defaults from the checkpoint, stated once; every value checked; hashable."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from alpamayo_jax.config import tiny
from alpamayo_jax.inference.inference_config import DEFAULT_NUM_SAMPLES, InferenceConfig
from alpamayo_jax.inference.sampling import REFERENCE_SAMPLING, SamplingParams

CONFIG = tiny()


def test_defaults_come_from_the_checkpoint():
    settings = InferenceConfig.from_model(CONFIG)
    assert settings.num_flow_steps == CONFIG.flow_matching.num_inference_steps == 10
    assert settings.max_new_tokens == CONFIG.tokens_per_future_traj == 128
    assert settings.sampling == REFERENCE_SAMPLING == SamplingParams(temperature=0.6, top_p=0.98, top_k=None)
    assert settings.num_samples == DEFAULT_NUM_SAMPLES == 1
    # Another checkpoint's values are its defaults.
    other = dataclasses.replace(CONFIG, tokens_per_future_traj=40,
                                flow_matching=dataclasses.replace(CONFIG.flow_matching, num_inference_steps=6))
    assert (InferenceConfig.from_model(other).num_flow_steps, InferenceConfig.from_model(other).max_new_tokens) == (6, 40)


def test_overrides_and_greedy():
    settings = InferenceConfig.from_model(CONFIG, num_samples=6, temperature=1.2, top_p=1.0, top_k=5,
                                          max_new_tokens=256, num_flow_steps=5)
    assert settings.sampling == SamplingParams(do_sample=True, temperature=1.2, top_p=1.0, top_k=5)
    assert (settings.num_samples, settings.max_new_tokens, settings.num_flow_steps) == (6, 256, 5)
    assert InferenceConfig.from_model(CONFIG, top_k=0).sampling.top_k is None  # 0 disables it
    greedy = InferenceConfig.from_model(CONFIG, greedy=True)
    assert not greedy.sampling.do_sample
    assert greedy.to_json() == {"num_samples": 1, "greedy": True, "temperature": None, "top_p": None, "top_k": None,
                                "max_new_tokens": 128, "num_flow_steps": 10}
    assert settings.to_json()["top_k"] == 5


def test_hashable_and_a_static_argument():
    a, b = InferenceConfig.from_model(CONFIG, num_samples=2), InferenceConfig.from_model(CONFIG, num_samples=2)
    assert a == b and hash(a) == hash(b)
    traced = jax.jit(lambda x, settings: x * settings.num_flow_steps, static_argnames="settings")
    assert int(traced(2, settings=a)) == 20
    generation = a.generation_config(CONFIG, pad_token_id=480)
    assert (generation.max_new_tokens, generation.sampling, generation.pad_token_id) == (128, a.sampling, 480)


@pytest.mark.parametrize("options, message", [
    ({"num_samples": 0}, "num_samples must be a whole number >= 1, got 0"),
    ({"num_samples": 2.5}, "num_samples must be a whole number >= 1, got 2.5"),
    ({"num_samples": True}, "num_samples must be a whole number >= 1, got True"),
    ({"max_new_tokens": -3}, "max_new_tokens must be a whole number >= 1"),
    ({"num_flow_steps": 0}, "num_flow_steps must be a whole number >= 1"),
    ({"temperature": float("inf")}, "temperature must be a finite number > 0, got inf"),
    ({"temperature": -1.0}, "temperature must be a finite number > 0"),
    ({"temperature": "hot"}, "temperature must be a finite number > 0, got 'hot'"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": float("nan")}, "top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k must be a whole number >= 0"),
    ({"top_k": 1.5}, "top_k must be a whole number >= 0"),
    ({"greedy": True, "top_p": 0.9}, "top_p cannot be given with it"),
    ({"greedy": True, "temperature": 0.6, "top_k": 3}, "temperature, top_k cannot be given with it"),
])
def test_bad_values_are_named(options, message):
    with pytest.raises(ValueError) as error:
        InferenceConfig.from_model(CONFIG, **options)
    assert message in str(error.value)
