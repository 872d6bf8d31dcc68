"""Trajectory metrics: parity with the reference's recorded metric tensors, hand-computed cases,
comfort checks, jit / vmap, and input errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from alpamayo_jax.evaluation.metrics import (
    COMFORT_BOUNDS,
    box_corners,
    comfort_checks,
    comfort_dynamics,
    corner_distance_by_set,
    trajectory_metrics,
)
from alpamayo_jax.processing.synthetic import arc_future

W = 64
# The hand-computed cases run jitted: one compilation per shape instead of one per operation.
fast_metrics = jax.jit(trajectory_metrics)
fast_checks = jax.jit(comfort_checks)
fast_dynamics = jax.jit(comfort_dynamics)


@pytest.fixture(scope="module")
def recorded(fixture_dir) -> dict[str, np.ndarray]:
    tensors = load_file(fixture_dir / "train" / "train_golden.safetensors")
    return {key: value for key, value in tensors.items() if key.startswith("metrics.")}


def _recorded_outputs(recorded, group: str) -> dict[str, np.ndarray]:
    """The reference's outputs for `group` ("n1" / "n2"), keyed without `metric/`."""
    prefix = f"metrics.{group}."
    return {key[len(prefix):].removeprefix("metric/"): value for key, value in recorded.items()
            if key.startswith(prefix) and not key.startswith(prefix + "pred_")}


def _metrics_of(recorded, group: str, **kwargs) -> dict[str, jax.Array]:
    return trajectory_metrics(recorded[f"metrics.{group}.pred_xyz"], recorded[f"metrics.{group}.pred_rot"],
                              recorded["metrics.gt_xyz"][:, -1], recorded["metrics.gt_rot"][:, -1], **kwargs)


def _assert_rtol(actual, expected, name: str, rtol: float = 1e-5) -> None:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    abs_err = np.abs(actual - expected)
    rel_err = float(np.max(abs_err / np.maximum(np.abs(expected), 1e-30)))
    message = f"{name}: max abs error {abs_err.max():.3e}, max relative {rel_err:.3e} (rtol {rtol:.0e})"
    print(message)
    assert rel_err <= rtol, message


def _assert_same_metrics(actual: dict, expected: dict, name: str, rtol: float = 1e-6) -> None:
    """Two evaluations of the same metrics, up to float32 rounding. A spread `<key>_std` comes from
    the difference of squares mean(v^2) - mean(v)^2, whose rounding error is about eps * mean(v^2):
    one ulp of a per-set value moves a small spread by far more than 1e-6 relative (3e-4 for the
    fixture's min_ade/by_t=3.0 of clip 1, where sets differ by 0.012 m around 0.666 m), so spreads
    are compared as variances to that bound."""
    assert set(actual) == set(expected), name
    eps = float(np.finfo(np.float32).eps)
    for key, value in expected.items():
        a, e = np.asarray(actual[key], np.float64), np.asarray(value, np.float64)
        if key.endswith("_std"):
            mean = np.asarray(expected[key.removesuffix("_std")], np.float64)
            variance_error = np.abs(a * a - e * e)
            bound = 16 * eps * (e * e + mean * mean)
            print(f"{name} {key}: variance error {variance_error.max():.2e}, bound {bound.min():.2e}")
            assert (variance_error <= bound).all(), f"{name} {key}: {a} != {e}"
        else:
            np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-7, err_msg=f"{name} {key}")


# ---------------------------------------------------------------------------------------------
# Parity with the reference's recorded tensors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["n1", "n2"])
def test_every_recorded_metric_matches_the_reference(recorded, group):
    expected = _recorded_outputs(recorded, group)
    assert "sample_ade" in expected and "min_ade" in expected
    if group == "n2":
        assert "min_ade_std" in expected and "corner_distance_std" in expected
    out = _metrics_of(recorded, group)
    missing = sorted(set(expected) - set(out))
    assert not missing, f"keys the reference writes but trajectory_metrics does not: {missing}"
    for key, value in expected.items():
        _assert_rtol(out[key], value, f"{group} {key}")
    # With one set the reference writes no spreads; neither do we.
    if group == "n1":
        assert not [key for key in out if key.endswith("_std")]
    else:
        assert not {"ade_std", "ade/by_t=3.0_std"} & set(out)


def test_jitted_metrics_match_the_reference(recorded):
    # Under jit XLA fuses and orders the sums differently; the values stay within float32 rounding
    # of the reference's, the spreads within the rounding of their difference of squares.
    out = fast_metrics(recorded["metrics.n2.pred_xyz"], recorded["metrics.n2.pred_rot"],
                       recorded["metrics.gt_xyz"][:, -1], recorded["metrics.gt_rot"][:, -1])
    _assert_same_metrics({key: out[key] for key in _recorded_outputs(recorded, "n2")},
                         _recorded_outputs(recorded, "n2"), "jit vs reference", rtol=1e-5)


def test_four_d_predictions_are_one_set(recorded):
    five = _metrics_of(recorded, "n1")
    four = trajectory_metrics(recorded["metrics.n1.pred_xyz"][:, 0], recorded["metrics.n1.pred_rot"][:, 0],
                              recorded["metrics.gt_xyz"][:, -1], recorded["metrics.gt_rot"][:, -1])
    assert set(four) == set(five)
    for key in five:
        np.testing.assert_array_equal(np.asarray(four[key]), np.asarray(five[key]), err_msg=key)
    assert four["sample_ade"].shape == (3, 1, 6)


def test_comfort_matches_the_reference_rl_reward(recorded):
    # Per-clip comfort values of the reference's RL reward (`compute_comfort`) on the fixture's
    # N=2 predictions, computed with the reference's code: pass fractions over the 12 samples.
    expected = {
        "lon_accel": [1.0, 1.0, 1.0],
        "lat_accel": [1.0, 1.0, 11 / 12],
        "jerk": [1.0, 1.0, 11 / 12],
        "lon_jerk": [9 / 12, 4 / 12, 8 / 12],
        "yaw_accel": [1.0, 1.0, 1.0],
        "yaw_rate": [1.0, 1.0, 1.0],
    }
    out = _metrics_of(recorded, "n2")
    for name, values in expected.items():
        _assert_rtol(out[f"comfort/{name}"], values, f"comfort/{name}", rtol=1e-6)
    passed_all = comfort_checks(jnp.asarray(recorded["metrics.n2.pred_xyz"]),
                                jnp.asarray(recorded["metrics.n2.pred_rot"]))["comfort/all"]
    np.testing.assert_allclose(np.asarray(out["comfort/all"]), np.asarray(passed_all).mean(axis=(1, 2)))


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------


def _straight(num_steps: int = W, speed: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """A straight drive along +x: (W, 3) positions, (W, 3, 3) identity rotations."""
    t = np.arange(1, num_steps + 1, dtype=np.float32) * 0.1
    xyz = np.stack([speed * t, np.zeros_like(t), np.zeros_like(t)], axis=-1).astype(np.float32)
    return xyz, np.broadcast_to(np.eye(3, dtype=np.float32), (num_steps, 3, 3)).copy()


def _shifted(xyz: np.ndarray, dy) -> np.ndarray:
    out = xyz.copy()
    out[:, 1] += dy
    return out


def test_lateral_offsets_give_exact_ade_fde_and_corner_distance():
    gt_xyz, gt_rot = _straight()
    offsets = [2.0, -0.5, 1.0]
    pred_xyz = np.stack([_shifted(gt_xyz, d) for d in offsets])[None]  # (1, 3, W, 3)
    pred_rot = np.broadcast_to(gt_rot, pred_xyz.shape[:-1] + (3, 3))
    out = fast_metrics(pred_xyz, pred_rot, gt_xyz[None], gt_rot[None])
    np.testing.assert_allclose(np.asarray(out["sample_ade"]), [[[2.0, 0.5, 1.0]]], rtol=1e-6)
    for key in ("min_ade", "min_ade/by_t=0.5", "min_ade/by_t=1.0", "min_ade/by_t=3.0", "min_ade/by_t=5.0",
                "fde", "min_fde", "corner_distance"):
        np.testing.assert_allclose(np.asarray(out[key]), [0.5], rtol=1e-6, err_msg=key)
    for key in ("ade", "ade/by_t=3.0"):  # the first sample
        np.testing.assert_allclose(np.asarray(out[key]), [2.0], rtol=1e-6, err_msg=key)


def test_horizons_and_fde_follow_the_min_ade_sample():
    gt_xyz, gt_rot = _straight()
    steps = np.arange(1, W + 1, dtype=np.float32)
    constant = _shifted(gt_xyz, 1.0)  # ADE 1, FDE 1
    converging = _shifted(gt_xyz, 3.0 - 3.0 * steps / W)  # ADE 3 - 3 (W + 1) / (2 W) > 1, FDE 0
    pred_xyz = np.stack([converging, constant])[None]
    pred_rot = np.broadcast_to(gt_rot, pred_xyz.shape[:-1] + (3, 3))
    out = fast_metrics(pred_xyz, pred_rot, gt_xyz[None], gt_rot[None])
    converging_ade = 3.0 - 3.0 * (W + 1) / (2 * W)
    np.testing.assert_allclose(np.asarray(out["sample_ade"])[0, 0], [converging_ade, 1.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["min_ade"]), [1.0], rtol=1e-6)
    # The horizons take min_ade's sample, not each horizon's own best (the converging sample's
    # first 5 steps are 2.77 m off, more than 1 m, but at 5 s it is 0.66 m off on average).
    for key in ("min_ade/by_t=0.5", "min_ade/by_t=5.0", "fde"):
        np.testing.assert_allclose(np.asarray(out[key]), [1.0], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(np.asarray(out["min_fde"]), [0.0], atol=1e-6)
    # ade is the first sample, whatever its error.
    np.testing.assert_allclose(np.asarray(out["ade"]), [converging_ade], rtol=1e-6)
    first_30 = np.mean(3.0 - 3.0 * steps[:30] / W)
    np.testing.assert_allclose(np.asarray(out["ade/by_t=3.0"]), [first_30], rtol=1e-6)


def test_height_is_ignored_by_ade_but_not_by_corner_distance():
    gt_xyz, gt_rot = _straight()
    raised = gt_xyz.copy()
    raised[:, 2] += 5.0
    out = fast_metrics(raised[None, None], gt_rot[None, None], gt_xyz[None], gt_rot[None])
    np.testing.assert_allclose(np.asarray(out["min_ade"]), [0.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["corner_distance"]), [5.0], rtol=1e-6)


def _yaw(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], np.float32)


def test_box_corners_of_the_ego_box():
    corners = np.asarray(box_corners(jnp.zeros(3), jnp.eye(3)))
    assert corners.shape == (8, 3)
    np.testing.assert_array_equal(np.abs(corners), np.broadcast_to([2.0, 1.5, 1.0], (8, 3)))
    assert (corners[:4, 2] < 0).all() and (corners[4:, 2] > 0).all()  # bottom, then top
    assert len({tuple(c) for c in corners.tolist()}) == 8
    # A quarter turn left maps the front-right-bottom corner (2, -1.5, -1) to (1.5, 2, -1), shifted.
    turned = np.asarray(box_corners(jnp.asarray([10.0, 0.0, 0.0]), jnp.asarray(_yaw(math.pi / 2))))
    np.testing.assert_allclose(turned[1], [11.5, 2.0, -1.0], atol=1e-6)


@pytest.mark.parametrize("angle", [math.pi / 2, 0.3, math.pi])
def test_corner_distance_of_a_yaw_rotated_box(angle):
    # Same centre, yawed by `angle`: every corner is 2.5 m (half the 4 x 3 m diagonal) from the
    # vertical axis, so it moves 2 * 2.5 * sin(angle / 2).
    gt_xyz, gt_rot = _straight()
    pred_rot = np.broadcast_to(_yaw(angle), gt_rot.shape)
    distance = corner_distance_by_set(jnp.asarray(gt_xyz)[None, None, None], jnp.asarray(pred_rot)[None, None, None],
                                      jnp.asarray(gt_xyz)[None], jnp.asarray(gt_rot)[None])
    np.testing.assert_allclose(np.asarray(distance), [[5.0 * math.sin(angle / 2)]], rtol=1e-6)


def test_corner_distance_takes_the_minimum_per_step_and_corner():
    # Two samples, each 1 m off for half of the horizon and exact for the other half: the
    # minimum per (step, corner) is 0 everywhere, although each sample alone averages 0.5 m.
    gt_xyz, gt_rot = _straight()
    first = _shifted(gt_xyz, np.where(np.arange(W) < W // 2, 1.0, 0.0))
    second = _shifted(gt_xyz, np.where(np.arange(W) < W // 2, 0.0, 1.0))
    pred_xyz = np.stack([first, second])[None]
    pred_rot = np.broadcast_to(gt_rot, pred_xyz.shape[:-1] + (3, 3))
    out = fast_metrics(pred_xyz, pred_rot, gt_xyz[None], gt_rot[None])
    np.testing.assert_allclose(np.asarray(out["corner_distance"]), [0.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["min_ade"]), [0.5], rtol=1e-6)


def test_spread_over_sets():
    gt_xyz, gt_rot = _straight()
    sets = np.stack([_shifted(gt_xyz, 1.0)[None], _shifted(gt_xyz, 3.0)[None]])[None]  # (1, 2, 1, W, 3)
    pred_rot = np.broadcast_to(gt_rot, sets.shape[:-1] + (3, 3))
    out = fast_metrics(sets, pred_rot, gt_xyz[None], gt_rot[None])
    for key in ("min_ade", "min_ade/by_t=3.0", "corner_distance", "fde", "min_fde"):
        np.testing.assert_allclose(np.asarray(out[key]), [2.0], rtol=1e-6, err_msg=key)
        np.testing.assert_allclose(np.asarray(out[f"{key}_std"]), [1.0], rtol=1e-6, err_msg=key)
    assert out["sample_ade"].shape == (1, 2, 1)
    # Equal sets: the spread is 0, never NaN (the difference of squares can round below zero).
    same = np.stack([_shifted(gt_xyz, 0.1)[None]] * 3)[None]
    out = fast_metrics(same, np.broadcast_to(gt_rot, same.shape[:-1] + (3, 3)), gt_xyz[None], gt_rot[None])
    assert np.isfinite(np.asarray(out["min_ade_std"])).all()
    np.testing.assert_allclose(np.asarray(out["min_ade_std"]), [0.0], atol=1e-3)


def test_short_horizons_are_left_out():
    gt_xyz, gt_rot = _straight(20)
    out = fast_metrics(gt_xyz[None, None], gt_rot[None, None], gt_xyz[None], gt_rot[None])
    assert {"min_ade/by_t=0.5", "min_ade/by_t=1.0"} <= set(out)
    assert not {"min_ade/by_t=3.0", "min_ade/by_t=5.0", "ade/by_t=3.0"} & set(out)
    gt_xyz, gt_rot = _straight(1)
    out = fast_metrics(gt_xyz[None, None], gt_rot[None, None], gt_xyz[None], gt_rot[None])
    assert not [key for key in out if key.startswith("comfort/")]
    assert float(out["fde"][0]) == 0.0


# ---------------------------------------------------------------------------------------------
# Comfort checks
# ---------------------------------------------------------------------------------------------


def _checks(xyz: np.ndarray, rot: np.ndarray) -> dict[str, bool]:
    return {key.removeprefix("comfort/"): bool(value)
            for key, value in fast_checks(jnp.asarray(xyz), jnp.asarray(rot)).items()}


def _accelerating(accel: float, speed: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(1, W + 1) * 0.1
    x = speed * t + 0.5 * accel * t**2
    xyz = np.stack([x, np.zeros_like(x), np.zeros_like(x)], -1).astype(np.float32)
    return xyz, np.broadcast_to(np.eye(3, dtype=np.float32), (W, 3, 3)).copy()


def test_comfort_bounds_are_the_reference_values():
    bounds = {b.name: (b.low, b.high, b.unit) for b in COMFORT_BOUNDS}
    assert bounds == {
        "lon_accel": (-4.05, 2.40, "m/s^2"), "lat_accel": (-4.89, 4.89, "m/s^2"),
        "jerk": (-8.37, 8.37, "m/s^3"), "lon_jerk": (-4.13, 4.13, "m/s^3"),
        "yaw_accel": (-1.93, 1.93, "rad/s^2"), "yaw_rate": (-0.95, 0.95, "rad/s"),
    }


def test_steady_driving_is_comfortable():
    checks = _checks(*_straight())
    assert all(checks.values()), checks
    checks = _checks(*arc_future(8.0, 0.01))  # yaw rate 0.08 rad/s
    assert all(checks.values()), checks


@pytest.mark.parametrize("accel, passes", [(2.0, True), (3.0, False), (-3.0, True), (-5.0, False)])
def test_longitudinal_acceleration_bound(accel, passes):
    xyz, rot = _accelerating(accel)
    dynamics = fast_dynamics(jnp.asarray(xyz), jnp.asarray(rot))
    # The padding (each difference sequence ends with a copy of its last value) makes the velocity's
    # last two steps equal, so the acceleration of the last two steps is 0, as in the reference.
    np.testing.assert_allclose(np.asarray(dynamics["lon_accel"])[:-2], accel, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dynamics["lon_accel"])[-2:], 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dynamics["yaw_rate"]), 0.0, atol=1e-6)
    checks = _checks(xyz, rot)
    assert checks["lon_accel"] is passes
    assert checks["lat_accel"] and checks["yaw_rate"] and checks["yaw_accel"]


@pytest.mark.parametrize("accel, lon_jerk_passes, jerk_passes", [(0.3, True, True), (-0.3, True, True),
                                                                 (0.5, False, True), (1.0, False, False)])
def test_the_end_of_the_horizon_shows_a_jerk_of_minus_ten_times_the_acceleration(accel, lon_jerk_passes,
                                                                                  jerk_passes):
    # That step of the acceleration to 0 (see above) reads as a jerk of -accel / dt at step W - 3:
    # a steady acceleration above 0.413 m/s^2 fails lon_jerk (4.13 m/s^3), above 0.837 m/s^2 jerk.
    xyz, rot = _accelerating(accel)
    dynamics = fast_dynamics(jnp.asarray(xyz), jnp.asarray(rot))
    np.testing.assert_allclose(np.asarray(dynamics["lon_jerk"])[W - 3], -10 * accel, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(dynamics["lon_jerk"])[:W - 4], 0.0, atol=2e-2)
    checks = _checks(xyz, rot)
    assert checks["lon_jerk"] is lon_jerk_passes and checks["jerk"] is jerk_passes
    assert checks["lon_accel"]


def test_yaw_rate_bound_and_heading_wraparound():
    # 10 m/s on a 10 m radius: 1 rad/s, over the 0.95 rad/s bound.
    xyz, rot = arc_future(10.0, 0.1)
    dynamics = fast_dynamics(jnp.asarray(xyz), jnp.asarray(rot))
    np.testing.assert_allclose(np.asarray(dynamics["yaw_rate"]), 1.0, rtol=1e-3)
    # The lateral signal (the rate of the velocity across the heading) is zero on a steady turn,
    # except at the last two steps: there the padded velocity no longer turns with the heading,
    # which reads as -speed x yaw rate (the centripetal acceleration, 10 m/s^2 > 4.89 m/s^2).
    lateral = np.asarray(dynamics["lat_accel"])
    np.testing.assert_allclose(lateral[:-2], 0.0, atol=1e-2)
    np.testing.assert_allclose(lateral[-2:], -10.0, rtol=1e-2)
    checks = _checks(xyz, rot)
    assert not checks["yaw_rate"] and not checks["lat_accel"] and not checks["all"]
    assert checks["lon_accel"] and checks["jerk"] and checks["lon_jerk"] and checks["yaw_accel"]
    # 6 m/s on a 10 m radius: 0.6 rad/s and 3.6 m/s^2, inside both bounds.
    assert all(_checks(*arc_future(6.0, 0.1)).values())
    # A gentle turn through heading +-pi: the wrap does not show up as a jump in yaw rate.
    xyz, rot = arc_future(5.0, 0.1)  # 0.5 rad/s
    turn = _yaw(3.0)
    xyz, rot = (xyz @ turn.T).astype(np.float32), (turn @ rot).astype(np.float32)
    heading = np.arctan2(rot[:, 1, 0], rot[:, 0, 0])
    assert np.abs(np.diff(heading)).max() > 6.0  # the heading wraps from +pi to -pi
    dynamics = fast_dynamics(jnp.asarray(xyz), jnp.asarray(rot))
    np.testing.assert_allclose(np.asarray(dynamics["yaw_rate"]), 0.5, rtol=1e-3)
    assert all(_checks(xyz, rot).values())


def test_non_finite_trajectories_fail_the_checks():
    xyz, rot = _straight()
    xyz[10, 0] = np.nan
    checks = _checks(xyz, rot)
    assert not checks["lon_accel"] and not checks["all"]


def test_comfort_checks_keep_leading_axes():
    xyz, rot = _straight()
    checks = comfort_checks(jnp.broadcast_to(jnp.asarray(xyz), (2, 3, W, 3)),
                            jnp.broadcast_to(jnp.asarray(rot), (2, 3, W, 3, 3)))
    assert set(checks) == {f"comfort/{b.name}" for b in COMFORT_BOUNDS} | {"comfort/all"}
    assert all(value.shape == (2, 3) and value.dtype == jnp.bool_ for value in checks.values())
    with pytest.raises(ValueError, match="at least 2 waypoints"):
        comfort_dynamics(jnp.zeros((1, 3)), jnp.eye(3)[None])


# ---------------------------------------------------------------------------------------------
# jit and vmap
# ---------------------------------------------------------------------------------------------


def test_jit_matches_eager(recorded):
    eager = _metrics_of(recorded, "n2")
    jitted = jax.jit(trajectory_metrics)(
        recorded["metrics.n2.pred_xyz"], recorded["metrics.n2.pred_rot"],
        recorded["metrics.gt_xyz"][:, -1], recorded["metrics.gt_rot"][:, -1])
    _assert_same_metrics(jitted, eager, "jit")


def test_vmap_over_an_extra_axis(recorded):
    pred_xyz, pred_rot = recorded["metrics.n2.pred_xyz"], recorded["metrics.n2.pred_rot"]
    gt_xyz, gt_rot = recorded["metrics.gt_xyz"][:, -1], recorded["metrics.gt_rot"][:, -1]
    stacked = [np.stack([a, a[::-1]]) for a in (pred_xyz, pred_rot, gt_xyz, gt_rot)]
    mapped = jax.jit(jax.vmap(trajectory_metrics))(*stacked)
    eager = _metrics_of(recorded, "n2")
    _assert_same_metrics({key: value[0] for key, value in mapped.items()}, eager, "vmap[0]")
    _assert_same_metrics({key: value[1] for key, value in mapped.items()},
                         {key: np.asarray(value)[::-1] for key, value in eager.items()}, "vmap[1]")


def test_under_jit_non_finite_input_propagates_instead_of_raising():
    gt_xyz, gt_rot = _straight()
    pred = gt_xyz.copy()
    pred[3, 0] = np.nan
    out = jax.jit(trajectory_metrics)(pred[None, None], gt_rot[None, None], gt_xyz[None], gt_rot[None])
    assert np.isnan(np.asarray(out["min_ade"])).all()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _valid(batch: int = 3, sets: int = 2, samples: int = 6, steps: int = W):
    """Identical predictions and ground truth, in the fixture's n2 shapes (so eager calls reuse its
    compiled operations)."""
    gt_xyz, gt_rot = _straight(steps)
    pred_xyz = np.broadcast_to(gt_xyz, (batch, sets, samples, steps, 3)).copy()
    pred_rot = np.broadcast_to(gt_rot, (batch, sets, samples, steps, 3, 3)).copy()
    return pred_xyz, pred_rot, np.broadcast_to(gt_xyz, (batch, steps, 3)).copy(), \
        np.broadcast_to(gt_rot, (batch, steps, 3, 3)).copy()


def test_valid_input_is_accepted():
    out = trajectory_metrics(*_valid())
    assert out["min_ade"].shape == (3,)
    np.testing.assert_allclose(np.asarray(out["min_ade"]), 0.0, atol=1e-6)
    out = fast_metrics(*(a.astype(np.float64) for a in _valid()))  # other real dtypes convert
    assert out["min_ade"].dtype == jnp.float32
    out = fast_metrics(*(np.round(a).astype(np.int32) for a in _valid()))
    assert out["min_ade"].dtype == jnp.float32


@pytest.mark.parametrize("change, match", [
    (lambda p, r, g, gr: (p[..., :2], r, g, gr), r"pred_xyz: expected shape \(B, K, W, 3\)"),
    (lambda p, r, g, gr: (p[0, 0, 0], r, g, gr), "pred_xyz: expected shape"),
    (lambda p, r, g, gr: (p, r[..., 0], g, gr), "pred_rot: expected shape"),
    (lambda p, r, g, gr: (p, r, g[:, :-1], gr[:, :-1]), "W = 63 waypoints, pred_xyz W = 64"),
    (lambda p, r, g, gr: (p, r, g[:1], gr[:1]), "gt_xyz has 1 clips, pred_xyz 3"),
    (lambda p, r, g, gr: (p, r, g[:, None], gr[:, None]), r"pass gt_xyz\[:, -1\]"),
    (lambda p, r, g, gr: (p, r, g, gr[..., :2]), "gt_rot: expected shape"),
    (lambda p, r, g, gr: (p[:, :, :0], r[:, :, :0], g, gr), "K .samples per set. is 0"),
    (lambda p, r, g, gr: (p[:, :0], r[:, :0], g, gr), r"N \(sets\) is 0"),
    (lambda p, r, g, gr: (p[:, :, :, :0], r[:, :, :, :0], g[:, :0], gr[:, :0]), r"W \(waypoints\) is 0"),
    (lambda p, r, g, gr: (p.astype(np.complex64), r, g, gr), "pred_xyz: expected real numbers"),
])
def test_bad_shapes_raise(change, match):
    with pytest.raises(ValueError, match=match):
        trajectory_metrics(*change(*_valid()))


@pytest.mark.parametrize("name, index, value", [("pred_xyz", 0, np.nan), ("pred_rot", 1, np.inf),
                                                ("gt_xyz", 2, -np.inf), ("gt_rot", 3, np.nan)])
def test_non_finite_input_raises(name, index, value):
    arrays = list(_valid())
    arrays[index].reshape(-1)[7] = value
    with pytest.raises(ValueError, match=f"{name}: 1 NaN or infinite value"):
        trajectory_metrics(*arrays)
    trajectory_metrics(*arrays, check_finite=False)  # opted out: no error


@pytest.mark.parametrize("dt", [0.0, -0.1, "0.1"])
def test_bad_dt_raises(dt):
    with pytest.raises(ValueError, match="dt must be a positive number"):
        trajectory_metrics(*_valid(), dt=dt)

