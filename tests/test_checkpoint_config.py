"""A checkpoint whose `config.json` sets the optional reference arguments to values other than the
fixture's converts, loads and runs with those values in effect: each one changes the computation
where it should, and only there.

The weights are the fixture's (none of these arguments changes a tensor shape); every value is
checked against a restatement of what the reference computes with it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpamayo_jax.action.unicycle import action_to_traj
from alpamayo_jax.inference.flow_matching import euler_sample
from alpamayo_jax.inference.generation import generate
from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import Pipeline, sample_from_inputs
from alpamayo_jax.io.convert import convert_checkpoint
from alpamayo_jax.processing.clip import Clip
from tests.parity import assert_close

CHANGES = {
    "diffusion_cfg": {"num_inference_steps": 6},
    "hist_traj_tokenizer_cfg": {"ego_xyz_min": [-3.0, -2.5, -1.0], "ego_xyz_max": [5.0, 2.5, 1.0]},
    "action_space_cfg": {"v_lambda": 1e-3, "v_ridge": 1e-2, "theta_lambda": 1e-4},
    "tokens_per_future_traj": 20,
}


@pytest.fixture(scope="module")
def changed(fixture_dir, tmp_path_factory):
    """(pipeline of the converted non-default checkpoint, pipeline of the fixture itself)."""
    root = tmp_path_factory.mktemp("nondefault")
    hf = root / "hf"
    shutil.copytree(fixture_dir / "hf", hf)
    shutil.copytree(fixture_dir / "vlm", root / "vlm")  # vlm_name_or_path is "../vlm"
    config = json.loads((hf / "config.json").read_text())
    for section, values in CHANGES.items():
        if isinstance(values, dict):
            config[section].update(values)
        else:
            config[section] = values
    (hf / "config.json").write_text(json.dumps(config))
    convert_checkpoint(hf, root / "vlm", root / "bundle")
    return Pipeline.load(root / "bundle"), Pipeline.load(fixture_dir / "hf", processor_dir=fixture_dir / "vlm")


@pytest.fixture(scope="module")
def clip(golden):
    return Clip.create(golden["input.image_frames"], golden["input.ego_history_xyz"][0, 0],
                       golden["input.ego_history_rot"][0, 0])


def test_the_values_reach_the_config(changed):
    pipeline, fixture = changed
    config = pipeline.config
    assert config.flow_matching.num_inference_steps == 6 != fixture.config.flow_matching.num_inference_steps
    assert config.history_tokenizer.xyz_min == (-3.0, -2.5, -1.0)
    assert config.history_tokenizer.xyz_max == (5.0, 2.5, 1.0)
    assert (config.action_space.v_lambda, config.action_space.v_ridge, config.action_space.theta_lambda) == (
        1e-3, 1e-2, 1e-4)
    assert config.tokens_per_future_traj == 20
    settings = InferenceConfig.from_model(config)
    assert (settings.num_flow_steps, settings.max_new_tokens) == (6, 20)


def test_history_tokens_follow_the_reference_formula(changed, clip):
    """DeltaTrajectoryTokenizer: per-step deltas from a zero point, each axis quantised as
    clip(round_half_even((d - min) / (max - min) * (bins - 1)), 0, bins - 1), + the id offset."""
    pipeline, fixture = changed
    config = pipeline.config
    xyz = np.asarray(clip.ego_history_xyz, np.float32)
    deltas = np.diff(xyz, axis=0, prepend=np.zeros((1, 3), np.float32))
    lo, hi = (np.asarray(v, np.float32) for v in CHANGES["hist_traj_tokenizer_cfg"].values())
    bins = config.history_tokenizer.num_bins
    expected = np.clip(np.round((deltas - lo) / (hi - lo) * (bins - 1)), 0, bins - 1).astype(np.int64).reshape(-1)
    ids = pipeline.prepare(clip).input_ids[0]
    fixture_ids = fixture.prepare(clip).input_ids[0]
    placeholders = np.flatnonzero((fixture_ids >= config.history_token_start_idx)
                                  & (fixture_ids < config.traj_token_start_idx + config.traj_vocab_size))
    assert placeholders.size == 48
    np.testing.assert_array_equal(ids[placeholders] - config.history_token_start_idx, expected)
    assert not np.array_equal(ids[placeholders], fixture_ids[placeholders])  # other bounds, other tokens


def test_flow_steps_and_action_space_take_effect(changed, clip, golden):
    pipeline, fixture = changed
    config = pipeline.config
    settings = InferenceConfig.from_model(config, greedy=True, max_new_tokens=8)
    noise = golden["diffusion.noise"]
    samples = sample_from_inputs(pipeline, pipeline.prepare(clip), jax.random.key(0), settings, noise=noise)

    # The same rollout by hand: 6 Euler steps on the cache of the reasoning rollout.
    inputs = pipeline.prepare(clip)
    result = generate(pipeline.split, inputs, config=settings.generation_config(
        config, pad_token_id=pipeline.tokenizer.pad_token_id))
    context = result.expert_context(config.n_waypoints)
    model = pipeline.model

    def sample(steps):
        return euler_sample(lambda x, t: model.action_velocity(x, t, context), jnp.asarray(noise), steps).actions

    assert_close(samples.actions[0], sample(6), 1e-6, "actions vs euler_sample(..., 6)")
    ten = sample(10)
    assert float(jnp.abs(ten - sample(6)).max()) > 1e-3  # the step count matters at this scale

    history = inputs.ego_history_xyz, inputs.ego_history_rot
    xyz, _ = action_to_traj(jnp.asarray(samples.actions[0]), *history, config.action_space,
                            model.action_space.stats())
    assert_close(samples.xyz[0], xyz, 1e-6, "xyz vs action_to_traj with the checkpoint's action space")
    default_space = dataclasses.replace(config.action_space, v_lambda=1e-6, v_ridge=1e-4, theta_lambda=1e-6)
    other, _ = action_to_traj(jnp.asarray(samples.actions[0]), *history, default_space, model.action_space.stats())
    assert float(jnp.abs(other - xyz).max()) > 1e-4  # the solver weights change the initial speed
