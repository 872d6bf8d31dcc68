"""The history and future trajectory tokenizers against NVIDIA's reference fixture, plus their
quantisation semantics and round trips. float32, highest matmul precision."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from alpamayo_jax.action import tokenizers, unicycle
from alpamayo_jax.config import tiny
from tests.parity import assert_close, max_errors

jax.config.update("jax_default_matmul_precision", "highest")

CONFIG = tiny()
HISTORY_CFG = CONFIG.history_tokenizer
FUTURE_CFG = CONFIG.future_tokenizer
FUTURE_STATS = unicycle.ActionStats.from_config(FUTURE_CFG.action_space)

encode_future = jax.jit(tokenizers.encode_future, static_argnames="cfg")
decode_future = jax.jit(tokenizers.decode_future, static_argnames="cfg")


def _fixture_trajectories(golden):
    return tuple(golden[f"action_space.{name}"] for name in ("hist_xyz", "hist_rot", "fut_xyz", "fut_rot"))


def test_history_bins_match_reference(golden):
    bins = tokenizers.encode_history(golden["input.ego_history_xyz"][0], HISTORY_CFG)
    assert bins.dtype == np.int32
    expected = golden["hist_tokens.raw"]
    np.testing.assert_array_equal(
        bins, expected, err_msg=f"{int((np.asarray(bins) != expected).sum())} bins differ"
    )


def test_future_bins_match_reference(golden):
    bins = encode_future(*_fixture_trajectories(golden), FUTURE_CFG, FUTURE_STATS)
    assert bins.dtype == np.int32
    expected = golden["traj_tokenizer.future_tokens"]
    np.testing.assert_array_equal(
        bins, expected, err_msg=f"{int((np.asarray(bins) != expected).sum())} bins differ"
    )


def test_history_quantisation_rounds_half_to_even_and_clamps():
    # With 9 bins over [-4, 4] a displacement d lands at scaled value d + 4, exactly in float32
    # for these multiples of 1/8: ties (x.5) must go to the even bin, out-of-range values clamp.
    cfg = dataclasses.replace(HISTORY_CFG, num_bins=9, xyz_min=(-4.0,) * 3, xyz_max=(4.0,) * 3)
    deltas = np.array([-3.5, -2.5, 0.5, 1.5, 0.375, 0.625, 100.0, -100.0, 0.0], np.float64)
    deltas = np.stack([deltas, -deltas, np.roll(deltas, 1)], axis=-1)
    positions = np.cumsum(deltas, axis=0).astype(np.float32)
    expected = np.clip(np.round(deltas + 4), 0, 8).astype(np.int32).reshape(-1)  # numpy rounds half to even
    np.testing.assert_array_equal(tokenizers.encode_history(positions, cfg), expected)


def _sliding_cubic_yaw(xy: np.ndarray, window: int = tokenizers.YAW_FIT_WINDOW) -> np.ndarray:
    """The reference's history headings, evaluated directly: at each pose, the direction of the
    derivative of cubics fitted to x(t), y(t) over a window of poses around it."""
    n = len(xy)
    yaw = np.empty(n)
    for i in range(n):
        start = max(0, min(i - window // 2, n - window))
        segment = xy[start : start + window].astype(np.float64)
        t = np.arange(len(segment))
        dx, dy = (np.polyval(np.polyder(np.polyfit(t, segment[:, k], 3)), i - start) for k in (0, 1))
        yaw[i] = np.arctan2(dy, dx)
    return yaw


def test_history_decode_round_trip(golden):
    # A slow history, so that even the first displacement (from t0 to the oldest pose) fits
    # the tokenizer's range: each decoded pose is off by at most half a bin per displacement.
    # The bound is attained on z: with an even number of bins a zero displacement is a tie
    # ((0 + 10) / 20 · 159 = 79.5), rounded to bin 80, so a flat history climbs half a bin per step.
    hist_xyz = 0.15 * golden["action_space.hist_xyz"]
    assert np.abs(hist_xyz[:, 0]).max() < 4.0
    xyz, rot = tokenizers.decode_history(tokenizers.encode_history(hist_xyz, HISTORY_CFG), HISTORY_CFG)
    half_bin = (
        0.5 * (np.array(HISTORY_CFG.xyz_max) - np.array(HISTORY_CFG.xyz_min)) / (HISTORY_CFG.num_bins - 1)
    )
    bound = np.arange(1, hist_xyz.shape[-2] + 1)[:, None] * half_bin + 1e-5
    error = np.abs(np.asarray(xyz) - hist_xyz)
    print(
        f"history round trip: max abs error {error.max():.3e} m, max error/bound {(error / bound).max():.3f}"
    )
    assert (error <= bound).all()

    expected_rot = unicycle.yaw_rotation(np.stack([_sliding_cubic_yaw(p[:, :2]) for p in np.asarray(xyz)]))
    assert_close(rot, expected_rot, rel=1e-5, name="decoded history rotations vs direct cubic fits")


@pytest.mark.parametrize("num_bins", [FUTURE_CFG.num_bins, 3000], ids=["tiny_96_bins", "r1_3000_bins"])
def test_future_round_trip_within_quantisation_bound(golden, num_bins):
    """decode(encode(future)) stays within the error that half a bin of acceleration and
    curvature per step can cause. To first order, errors h_a, h_κ per step move the speed by
    h_a·t, the heading by h_κ·s (s the arc length) and the position by h_a·t²/2 + h_κ·s²/2;
    the solvers' smoothing adds the (separately bounded) unquantised round-trip error."""
    cfg = dataclasses.replace(FUTURE_CFG, num_bins=num_bins)
    hist_xyz, hist_rot, fut_xyz, fut_rot = _fixture_trajectories(golden)
    bins = encode_future(hist_xyz, hist_rot, fut_xyz, fut_rot, cfg, FUTURE_STATS)
    assert bins.shape == (4, 2 * cfg.action_space.n_waypoints)
    assert 0 <= int(bins.min()) and int(bins.max()) < num_bins
    xyz, _ = decode_future(bins, hist_xyz, hist_rot, cfg, FUTURE_STATS)

    space = cfg.action_space
    actions, states = jax.jit(unicycle.traj_to_action, static_argnames=("cfg", "return_states"))(
        hist_xyz, hist_rot, fut_xyz, fut_rot, space, FUTURE_STATS, return_states=True
    )
    unquantised, _ = jax.jit(unicycle.action_to_traj, static_argnames="cfg")(
        actions, hist_xyz, hist_rot, space, FUTURE_STATS
    )
    smoothing_error, _ = max_errors(unquantised, fut_xyz)
    assert smoothing_error <= 1e-2, f"unquantised round trip off by {smoothing_error:.3e} m"

    half_bin = 0.5 * (cfg.dims_max[0] - cfg.dims_min[0]) / (num_bins - 1)
    h_accel, h_curvature = half_bin * space.accel_std, half_bin * space.curvature_std
    t = space.dt * np.arange(1, space.n_waypoints + 1)
    arc = np.abs(np.asarray(states)[..., 0]).max(axis=-1, keepdims=True) * t
    bound = h_accel * t**2 / 2 + h_curvature * arc**2 / 2 + smoothing_error
    error = np.linalg.norm(np.asarray(xyz)[..., :2] - fut_xyz[..., :2], axis=-1)
    print(
        f"{num_bins} bins: max position error {error.max():.3e} m, max error/bound {(error / bound).max():.3f}"
    )
    assert (error <= bound).all(), f"max error/bound {(error / bound).max():.3f}"
