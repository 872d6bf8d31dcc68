"""The action side against NVIDIA's reference fixture: action_in_proj, the expert on the language
model's cache, the Euler flow-matching sampler and the rollout (main and `short` cases).

float32, highest matmul precision. Tolerances: 1e-5 relative per stage, 1e-4 on trajectories.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alpamayo_jax.action.unicycle import action_to_traj
from alpamayo_jax.config import tiny
from alpamayo_jax.inference.flow_matching import (
    euler_sample,
    flow_matching_loss,
    initial_noise,
    interpolate,
    sample_timesteps,
    time_grid,
)
from alpamayo_jax.models.kv_cache import KVCache
from alpamayo_jax.models.expert import expert_attention_bias, expert_context, run_expert, visible_cache_columns
from tests.parity import assert_close, fixture_cache

NUM_WAYPOINTS = 64
MAIN_CACHE_LENGTH, MAIN_OFFSET = 258, 258  # fixture README: offset = first <|traj_future_start|> + 1
SHORT_CACHE_LENGTH, SHORT_OFFSET = 255, 256  # no <|traj_future_start|>: offset = len(sequences)


def reference_cache(golden, length: int, capacity: int | None = None) -> KVCache:
    """The fixture's post-generation cache in this project's (L, B, K, S, H) layout, in a buffer of
    `capacity` slots of which the first `length` are filled."""
    k, v = fixture_cache(golden, "k", length), fixture_cache(golden, "v", length)
    pad = [(0, 0), (0, 0), (0, 0), (0, (capacity or length) - length), (0, 0)]
    mask = np.arange(capacity or length)[None] < length
    return KVCache(k=jnp.asarray(np.pad(k, pad)), v=jnp.asarray(np.pad(v, pad)), mask=jnp.asarray(mask),
                   length=jnp.asarray(length, jnp.int32))


def context_for(golden, cache_length, offset, capacity=None):
    cache = reference_cache(golden, cache_length, capacity)
    rope_deltas = jnp.asarray(golden["gen.rope_deltas"][:, 0])
    return expert_context(cache, jnp.array([offset]), rope_deltas, NUM_WAYPOINTS)


@pytest.fixture(scope="module")
def sampler(tiny_model):
    """Jitted Euler sampler over the model's velocity, returning every iterate."""
    graphdef, state = nnx.split(tiny_model)

    @jax.jit
    def run(state, noise, context):
        model = nnx.merge(graphdef, state)
        return euler_sample(lambda x, t: model.action_velocity(x, t, context), noise, 10, return_iterates=True)

    return lambda noise, context: run(state, noise, context)


def test_action_in_proj(tiny_model, golden):
    out = tiny_model.action_in_proj(jnp.asarray(golden["in_proj.x"]), jnp.asarray(golden["in_proj.t"]).reshape(-1))
    assert_close(out, golden["in_proj.out"], rel=1e-5, name="in_proj.out")


def test_expert_positions_and_mask_match_reference(golden):
    context = context_for(golden, MAIN_CACHE_LENGTH, MAIN_OFFSET)
    np.testing.assert_array_equal(np.asarray(context.position_ids), golden["expert.position_ids"])
    expected = golden["expert.attention_mask"]  # (1, 1, 64, S + 64)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(context.bias), expected.shape), expected)
    short = context_for(golden, SHORT_CACHE_LENGTH, SHORT_OFFSET)
    np.testing.assert_array_equal(np.asarray(short.position_ids), golden["short.expert.position_ids"])


def test_expert_first_step_per_layer(tiny_model, golden):
    context = context_for(golden, MAIN_CACHE_LENGTH, MAIN_OFFSET)
    noise, t0 = jnp.asarray(golden["diffusion.noise"]), jnp.zeros((1,))
    embeds = tiny_model.action_in_proj(noise, t0)
    assert_close(embeds, golden["expert.step0.in_embeds"], rel=1e-5, name="expert.step0.in_embeds")
    out = run_expert(tiny_model.expert, embeds, context, return_layer_outputs=True)
    for index, layer_out in enumerate(out.layer_outputs):
        assert_close(layer_out, golden[f"expert.step0.layer_out.{index}"], rel=1e-5,
                     name=f"expert.step0.layer_out.{index}")
    assert_close(out.hidden_states, golden["expert.step0.last_hidden"], rel=1e-5, name="expert.step0.last_hidden")
    velocity = tiny_model.action_velocity(noise, t0, context)
    assert_close(velocity, golden["diffusion.velocity_step0"], rel=1e-5, name="diffusion.velocity_step0")


@pytest.mark.parametrize("case", ["main", "short"])
def test_flow_matching_and_rollout(tiny_model, golden, sampler, case):
    prefix = "" if case == "main" else "short."
    length, offset = (MAIN_CACHE_LENGTH, MAIN_OFFSET) if case == "main" else (SHORT_CACHE_LENGTH, SHORT_OFFSET)
    # A buffer larger than the filled length: the unused slots must stay invisible.
    result = sampler(jnp.asarray(golden["diffusion.noise"]), context_for(golden, length, offset, capacity=300))
    assert_close(result.velocities, golden[f"{prefix}diffusion.velocity_steps"], rel=1e-5,
                 name=f"{prefix}diffusion.velocity_steps")
    if case == "main":
        assert_close(result.iterates, golden["diffusion.x_steps"], rel=1e-5, name="diffusion.x_steps")
    assert_close(result.actions, golden[f"{prefix}rollout.sampled_action"], rel=1e-5,
                 name=f"{prefix}rollout.sampled_action")
    config = tiny()
    xyz, rot = action_to_traj(result.actions, golden["input.ego_history_xyz"][:, -1],
                              golden["input.ego_history_rot"][:, -1], config.action_space,
                              tiny_model.action_space.stats())
    assert_close(xyz, golden[f"{prefix}rollout.pred_xyz"][:, 0, 0], rel=1e-4, name=f"{prefix}rollout.pred_xyz")
    assert_close(rot, golden[f"{prefix}rollout.pred_rot"][:, 0, 0], rel=1e-4, name=f"{prefix}rollout.pred_rot")


def test_rows_with_different_offsets_are_independent(tiny_model, golden):
    """Row 1 stopped earlier than row 0: its cache columns from its offset on are hidden, so it
    equals a single-row run on a cache cut at that offset."""
    cache = reference_cache(golden, MAIN_CACHE_LENGTH)
    two_rows = KVCache(k=jnp.concatenate([cache.k, cache.k], axis=1), v=jnp.concatenate([cache.v, cache.v], axis=1),
                       mask=jnp.concatenate([cache.mask, cache.mask]), length=cache.length)
    rope_deltas = jnp.asarray(np.repeat(golden["gen.rope_deltas"][:, 0], 2))
    noise = jnp.asarray(np.concatenate([golden["diffusion.noise"]] * 2))
    t = jnp.full((2,), 0.3)
    batched = tiny_model.action_velocity(
        noise, t, expert_context(two_rows, jnp.array([MAIN_OFFSET, 253]), rope_deltas, NUM_WAYPOINTS))
    alone = tiny_model.action_velocity(noise[1:], t[1:], context_for(golden, 253, 253))
    first = tiny_model.action_velocity(noise[:1], t[:1], context_for(golden, MAIN_CACHE_LENGTH, MAIN_OFFSET))
    assert_close(batched[1:], alone, rel=1e-5, name="row with the earlier offset")
    assert_close(batched[:1], first, rel=1e-5, name="row with the later offset")
    assert not np.allclose(np.asarray(batched[0]), np.asarray(batched[1]))


def test_expert_never_sees_unfilled_or_masked_slots(golden):
    cache = reference_cache(golden, MAIN_CACHE_LENGTH, capacity=270)
    bias = np.asarray(expert_attention_bias(visible_cache_columns(cache, jnp.array([300, 100])), 4))  # (2, 1, 1, 274)
    visible = bias[:, 0, 0] == 0
    assert visible[0, :MAIN_CACHE_LENGTH].all() and not visible[0, MAIN_CACHE_LENGTH:270].any()
    assert visible[1, :100].all() and not visible[1, 100:270].any()
    assert visible[:, 270:].all()


def test_time_grid_is_torch_linspace(golden):
    grid = time_grid(10)
    np.testing.assert_array_equal(grid[:-1], golden["diffusion.t_steps"])
    assert grid[0] == 0 and grid[-1] == 1
    assert len(set(np.diff(grid).tolist())) > 1  # float32 steps are not all exactly 0.1
    with pytest.raises(ValueError):
        time_grid(0)


def test_sampler_is_one_compiled_scan():
    traces = []

    def velocity(x, t):
        traces.append(1)
        return -x * t[:, None, None]

    run = jax.jit(lambda noise: euler_sample(velocity, noise, 5).actions)
    noise = jnp.ones((3, 64, 2))
    run(noise)
    run(noise + 1)
    assert len(traces) == 1 and run._cache_size() == 1  # the step body is traced once, not per step
    # Exact solution of dx/dt = -t x over [0, 1] is exp(-1/2) x0; five Euler steps approximate it.
    np.testing.assert_allclose(np.asarray(run(noise)), np.exp(-0.5), rtol=0.1)


def test_noise_from_a_key_is_reproducible():
    noise = initial_noise(jax.random.key(7), 3, NUM_WAYPOINTS)
    assert noise.shape == (3, NUM_WAYPOINTS, 2) and noise.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(noise), np.asarray(initial_noise(jax.random.key(7), 3, NUM_WAYPOINTS)))
    assert not np.allclose(np.asarray(noise), np.asarray(initial_noise(jax.random.key(8), 3, NUM_WAYPOINTS)))
    assert abs(float(noise.std()) - 1) < 0.1


def test_training_pieces():
    key = jax.random.key(0)
    t = sample_timesteps(key, (20000,))
    assert float(t.min()) > 0 and float(t.max()) <= 0.999
    # Beta(1.5, 1) has mean 0.6, so t = 0.999 (1 - s) has mean 0.3996.
    assert abs(float(t.mean()) - 0.999 * 0.4) < 0.01
    actions, noise = jnp.full((2, 3, 2), 2.0), jnp.zeros((2, 3, 2))
    np.testing.assert_allclose(np.asarray(interpolate(actions, noise, jnp.array([0.0, 1.0]))),
                               np.stack([np.zeros((3, 2)), np.full((3, 2), 2.0)]))


def test_loss_gradient_matches_finite_differences(tiny_model, golden):
    """d loss / d (expert, projection) parameters: finite, and a directional derivative agrees
    with a central finite difference."""
    context = context_for(golden, MAIN_CACHE_LENGTH, MAIN_OFFSET)
    actions = jnp.asarray(golden["rollout.sampled_action"])
    key = jax.random.key(3)
    trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vlm")))
    graphdef, params, rest = nnx.split(tiny_model, trainable, ...)

    def loss(params):
        model = nnx.merge(graphdef, params, rest)
        return flow_matching_loss(lambda x, t: model.action_velocity(x, t, context), actions, key)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
    assert any(p.startswith("expert.") for p in paths) and "action_out_proj.kernel" in paths
    assert not any("freqs" in p or p.startswith("action_space") for p in paths)  # buffers are not trained

    direction = jax.tree.map(lambda g: g / jnp.sqrt(sum(jnp.sum(x * x) for x in leaves)), grads)
    epsilon = 1e-2
    shifted = [jax.jit(loss)(jax.tree.map(lambda p, d, s=s: p + s * epsilon * d, params, direction))
               for s in (1, -1)]
    finite_difference = (shifted[0] - shifted[1]) / (2 * epsilon)
    analytic = sum(jnp.sum(g * d) for g, d in zip(leaves, jax.tree.leaves(direction)))
    print(f"loss {float(value):.5f}: directional derivative {float(analytic):.6f}, "
          f"finite difference {float(finite_difference):.6f}")
    np.testing.assert_allclose(float(finite_difference), float(analytic), rtol=2e-3)


def test_vmap_over_scenes(tiny_model, golden):
    context = context_for(golden, MAIN_CACHE_LENGTH, MAIN_OFFSET)
    scenes = jax.random.normal(jax.random.key(1), (3, 1, NUM_WAYPOINTS, 2))
    t = jnp.full((1,), 0.5)
    per_scene = jax.vmap(lambda x: tiny_model.action_velocity(x, t, context))(scenes)
    one_by_one = jnp.stack([tiny_model.action_velocity(x, t, context) for x in scenes])
    assert_close(per_scene, one_by_one, rel=1e-5, name="vmap over scenes")
