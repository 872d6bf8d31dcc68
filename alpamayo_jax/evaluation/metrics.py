"""Open-loop trajectory metrics in pure jax.numpy: the reference's distance metrics, final
displacement errors and the six comfort checks of the reference's RL reward.

Every function is pure, batched over clips and safe under `jit` and `vmap`. Positions are metres in
the t0 ego frame (x forward, y left, z up), rotations are ego-to-t0-frame 3x3 matrices, and the
waypoints are `dt` apart (0.1 s: t0 + 0.1 ... t0 + 6.4 s for W = 64). Arithmetic is elementwise
(no matmuls), so the results do not depend on the platform's matmul precision.

Shape legend: B clips; N sets of samples (the reference draws N independent sets to measure the
spread of a metric; usually N = 1); K samples per set (6); W waypoints (64); 8 box corners.

`trajectory_metrics` returns these keys; the reference's metric runner writes the same values
under `metric/<key>` (sample_ade under `sample_ade`). All are (B,) except sample_ade:

    min_ade            per set, the smallest over its K samples of the mean XY (bird's-eye) L2
                       error over all W steps; mean over the N sets
    min_ade/by_t=T     for T = 0.5, 1.0, 3.0, 5.0 s: the error of min_ade's sample (the one best
                       over the whole horizon, not a separate minimum) averaged over the first T / dt
                       steps (5, 10, 30, 50); a horizon longer than W is left out
    ade                the first sample of each set (the reference ranks samples by log-probabilities
                       that are all zero, so its argmax is sample 0); mean over the sets
    ade/by_t=3.0       the same over the first 30 steps (left out when W < 30)
    corner_distance    the 8 corners of a 4 x 3 x 2 m box (length along the ego x axis, width along
                       y, height along z) centred on each pose (xyz + rotation), 3-D distance to the
                       ground truth's corners, minimum over the K samples per (step, corner), mean
                       over the steps and corners; mean over the sets
    sample_ade         (B, N, K): every sample's mean XY error over all W steps (also for 4-D input,
                       with N = 1)
  additions of this project (not in the reference):
    fde                the final-step XY error of min_ade's sample; mean over the sets
    min_fde            the smallest final-step XY error over the K samples (possibly another
                       sample than min_ade's); mean over the sets
    comfort/<check>    the fraction of the N x K samples that pass the comfort check (`COMFORT_BOUNDS`;
                       the per-clip value of the reference's RL comfort reward); left out when W < 2
    comfort/all        the fraction of the N x K samples that pass all six checks

With N > 1 sets, min_ade, min_ade/by_t=T and corner_distance (and the additions fde and min_fde)
also get `<key>_std`, the spread over the sets computed as the reference does, in the form
sqrt(mean_N(v^2) - mean_N(v)^2) (a population standard deviation). Where rounding makes the
difference negative the reference gets NaN; here it is clamped to 0. ade gets no `_std`, as in the
reference. That form is ill-conditioned when the spread is small beside the mean: its relative
rounding error is about eps x mean^2 / std^2 (float32 eps 1.2e-7), so a spread of 0.012 m around
0.67 m is only good to ~1e-4 relative, in the reference as here, and moves by that much when the
per-set values change by one ulp (another summation order, `jit` fusion).

Comfort checks (`comfort_dynamics`, `comfort_checks`): from one trajectory of W poses the reference
derives signals by forward differences divided by dt, each difference sequence padded with a copy
of its last value so that every signal has W values:

    heading h = atan2(R[1, 0], R[0, 0]); velocity (vx, vy) = D(x), D(y); speed = |(vx, vy)|
    yaw_rate  = D(h), each difference wrapped back into [-pi, pi]     bound |.| < 0.95 rad/s
    yaw_accel = D(yaw_rate)                                          bound |.| < 1.93 rad/s^2
    lon_accel = D(vx cos h + vy sin h)                               bound -4.05 < . < 2.40 m/s^2
    lat_accel = D(-vx sin h + vy cos h)                              bound |.| < 4.89 m/s^2
    jerk      = D(D(speed))                                          bound |.| < 8.37 m/s^3
    lon_jerk  = D(lon_accel)                                         bound |.| < 4.13 m/s^3

A sample passes a check when the signal lies strictly inside the bounds at every step (NaN fails).
jerk is the second derivative of the speed, a scalar. The padding shapes the end of the horizon,
as in the reference: the velocity's last two values are equal, so

  - the accelerations of the last two steps are 0, and the jerks at step W - 3 read -accel / dt: a
    trajectory still accelerating or braking by more than 0.413 m/s^2 at its end fails lon_jerk
    (more than 0.837 m/s^2: jerk too);
  - lat_accel, the rate of change of the velocity's component across the heading, is zero on a
    steady turn except at the last two steps, where the padded velocity no longer turns with the
    heading and the signal reads about -speed x yaw rate (the centripetal acceleration).

Input checks: `trajectory_metrics` raises ValueError for wrong ranks or shapes, mismatched B or W,
K = 0, N = 0 or W = 0 (when tracing, from the static shapes). It also rejects NaN or infinite
values, on the host, when called with concrete arrays (`check_finite=True`, a small transfer); under
`jit` or `vmap` that check is skipped and non-finite input propagates NaN into the clip's metrics.
The other public functions do not check their inputs (but `comfort_dynamics` needs W >= 2).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_DT = 0.1  # seconds between waypoints
MIN_ADE_HORIZONS_S = (0.5, 1.0, 3.0, 5.0)  # the min_ade/by_t=T horizons, seconds
ADE_HORIZON_S = 3.0  # the ade/by_t=T horizon, seconds
EGO_BOX_LWH = (4.0, 3.0, 2.0)  # metres: length (ego x), width (y), height (z) of the corner-distance box

# The 8 corners of a unit box centred on the origin: the 4 bottom corners, then the 4 top ones.
_UNIT_BOX_CORNERS = np.array(
    [[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1], [-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1]],
    np.float32,
) / 2

# Keys that are a best-of-K value per set and so get `<key>_std` when N > 1.
_SPREAD_KEYS = ("min_ade", "corner_distance", "fde", "min_fde")


@dataclasses.dataclass(frozen=True)
class ComfortBound:
    """One comfort check of the reference's RL reward: `low < signal < high` at every step."""

    name: str  # the signal (`comfort_dynamics` key); the metric is `comfort/<name>`
    low: float
    high: float
    unit: str
    description: str


COMFORT_BOUNDS: tuple[ComfortBound, ...] = (
    ComfortBound("lon_accel", -4.05, 2.40, "m/s^2", "rate of change of the velocity along the heading"),
    ComfortBound("lat_accel", -4.89, 4.89, "m/s^2", "rate of change of the velocity across the heading"),
    ComfortBound("jerk", -8.37, 8.37, "m/s^3", "second derivative of the speed"),
    ComfortBound("lon_jerk", -4.13, 4.13, "m/s^3", "rate of change of lon_accel"),
    ComfortBound("yaw_accel", -1.93, 1.93, "rad/s^2", "rate of change of the yaw rate"),
    ComfortBound("yaw_rate", -0.95, 0.95, "rad/s", "rate of change of the heading"),
)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def horizon_steps(seconds: float, dt: float = DEFAULT_DT) -> int:
    """The number of whole waypoints in `seconds` (5 for 0.5 s at dt = 0.1 s)."""
    return int(seconds / dt + 1e-9)


def horizon_key(prefix: str, steps: int, dt: float = DEFAULT_DT) -> str:
    """The metric name of a horizon, as the reference spells it: `min_ade/by_t=0.5` for 5 steps."""
    return f"{prefix}/by_t={steps * dt:.1f}"


def xy_errors(pred_xyz: jax.Array, gt_xyz: jax.Array) -> jax.Array:
    """Per-step bird's-eye (XY) L2 error of every sample.

    pred_xyz (B, N, K, W, 3), gt_xyz (B, W, 3) -> (B, N, K, W) metres."""
    diff = pred_xyz[..., :2] - gt_xyz[:, None, None, :, :2]
    return jnp.sqrt(jnp.sum(diff * diff, axis=-1))


def sample_ade(pred_xyz: jax.Array, gt_xyz: jax.Array, num_steps: int | None = None) -> jax.Array:
    """Every sample's mean XY error over the first `num_steps` waypoints (all when None).

    pred_xyz (B, N, K, W, 3), gt_xyz (B, W, 3) -> (B, N, K) metres."""
    errors = xy_errors(pred_xyz, gt_xyz)
    return errors[..., :num_steps].mean(axis=-1)


def best_sample_index(pred_xyz: jax.Array, gt_xyz: jax.Array) -> jax.Array:
    """Index of each set's min-ADE sample (the first one on ties).

    pred_xyz (B, N, K, W, 3), gt_xyz (B, W, 3) -> (B, N) int32."""
    return jnp.argmin(sample_ade(pred_xyz, gt_xyz), axis=-1)


def best_sample_errors(pred_xyz: jax.Array, gt_xyz: jax.Array) -> jax.Array:
    """Per-step XY error of each set's min-ADE sample (what `plots.plot_summary` averages).

    pred_xyz (B, N, K, W, 3), gt_xyz (B, W, 3) -> (B, N, W) metres."""
    errors = xy_errors(pred_xyz, gt_xyz)
    best = jnp.argmin(errors.mean(axis=-1), axis=-1)
    return jnp.take_along_axis(errors, best[:, :, None, None], axis=2)[:, :, 0]


def box_corners(xyz: jax.Array, rot: jax.Array, lwh: Sequence[float] = EGO_BOX_LWH) -> jax.Array:
    """Corners of boxes of size `lwh` (length along the pose's x axis, width along y, height along
    z) centred on the poses: the 4 bottom corners, then the 4 top ones, each quadruple going
    (-x,-y), (+x,-y), (+x,+y), (-x,+y) in the box's own frame.

    xyz (..., 3), rot (..., 3, 3) -> (..., 8, 3) metres."""
    local = jnp.asarray(_UNIT_BOX_CORNERS) * jnp.asarray(lwh, jnp.float32)  # (8, 3)
    local = local.astype(jnp.result_type(xyz, rot))
    rotated = jnp.sum(rot[..., None, :, :] * local[:, None, :], axis=-1)  # (..., 8, 3)
    return rotated + xyz[..., None, :]


def corner_distance_by_set(
    pred_xyz: jax.Array,
    pred_rot: jax.Array,
    gt_xyz: jax.Array,
    gt_rot: jax.Array,
    lwh: Sequence[float] = EGO_BOX_LWH,
) -> jax.Array:
    """Per set, the 3-D distance of the predicted box corners to the ground truth's, the minimum over
    the K samples for every (step, corner), then the mean over steps and corners.

    pred_xyz (B, N, K, W, 3), pred_rot (B, N, K, W, 3, 3), gt_xyz (B, W, 3), gt_rot (B, W, 3, 3)
    -> (B, N) metres."""
    pred = box_corners(pred_xyz, pred_rot, lwh)  # (B, N, K, W, 8, 3)
    gt = box_corners(gt_xyz, gt_rot, lwh)  # (B, W, 8, 3)
    diff = pred - gt[:, None, None]
    distance = jnp.sqrt(jnp.sum(diff * diff, axis=-1))  # (B, N, K, W, 8)
    return distance.min(axis=2).mean(axis=(2, 3))


def summarize_sets(per_set: Mapping[str, jax.Array], *, spread_keys: Sequence[str] | None = None
                   ) -> dict[str, jax.Array]:
    """Per-set values (B, N) -> their mean over the sets (B,) under the same key, and for N > 1 and
    every key in `spread_keys` (all keys when None) the spread `<key>_std` =
    sqrt(max(mean_N(v^2) - mean_N(v)^2, 0)) (B,), the reference's formula (clamped at 0)."""
    out = {}
    for key, values in per_set.items():
        mean = values.mean(axis=1)
        out[key] = mean
        if values.shape[1] > 1 and (spread_keys is None or key in spread_keys):
            mean_sq = (values * values).mean(axis=1)
            out[f"{key}_std"] = jnp.sqrt(jnp.maximum(mean_sq - mean * mean, 0.0))
    return out


# ---------------------------------------------------------------------------------------------
# Comfort
# ---------------------------------------------------------------------------------------------


def _rate(signal: jax.Array, dt: float) -> jax.Array:
    """Forward differences along the last axis divided by dt, the last one repeated: (..., W) -> (..., W)."""
    delta = signal[..., 1:] - signal[..., :-1]
    return jnp.concatenate([delta, delta[..., -1:]], axis=-1) * (1.0 / dt)


def _yaw_rate(heading: jax.Array, dt: float) -> jax.Array:
    """`_rate` of a heading, each difference first wrapped once into [-pi, pi]."""
    delta = heading[..., 1:] - heading[..., :-1]
    delta = jnp.where(delta > math.pi, delta - 2 * math.pi, delta)
    delta = jnp.where(delta < -math.pi, delta + 2 * math.pi, delta)
    rate = delta * (1.0 / dt)
    return jnp.concatenate([rate, rate[..., -1:]], axis=-1)


def comfort_dynamics(xyz: jax.Array, rot: jax.Array, dt: float = DEFAULT_DT) -> dict[str, jax.Array]:
    """The signals the comfort checks bound (see the module docstring), keyed by `ComfortBound.name`,
    plus `speed` (m/s).

    xyz (..., W, 3), rot (..., W, 3, 3) with W >= 2 -> each (..., W)."""
    if xyz.shape[-2] < 2:
        raise ValueError(f"comfort needs at least 2 waypoints, got xyz of shape {xyz.shape}")
    heading = jnp.arctan2(rot[..., 1, 0], rot[..., 0, 0])
    vx, vy = _rate(xyz[..., 0], dt), _rate(xyz[..., 1], dt)
    speed = jnp.sqrt(vx * vx + vy * vy)
    yaw_rate = _yaw_rate(heading, dt)
    cos, sin = jnp.cos(heading), jnp.sin(heading)
    lon_accel = _rate(vx * cos + vy * sin, dt)
    return {
        "lon_accel": lon_accel,
        "lat_accel": _rate(-vx * sin + vy * cos, dt),
        "jerk": _rate(_rate(speed, dt), dt),
        "lon_jerk": _rate(lon_accel, dt),
        "yaw_accel": _rate(yaw_rate, dt),
        "yaw_rate": yaw_rate,
        "speed": speed,
    }


def comfort_checks(xyz: jax.Array, rot: jax.Array, dt: float = DEFAULT_DT) -> dict[str, jax.Array]:
    """Per trajectory, whether each comfort signal stays strictly inside its `COMFORT_BOUNDS` at every
    step, keyed `comfort/<name>`, plus `comfort/all` (every check passes).

    xyz (..., W, 3), rot (..., W, 3, 3) with W >= 2 -> each (...) bool."""
    dynamics = comfort_dynamics(xyz, rot, dt)
    out = {}
    for bound in COMFORT_BOUNDS:
        signal = dynamics[bound.name]
        out[f"comfort/{bound.name}"] = jnp.all((signal > bound.low) & (signal < bound.high), axis=-1)
    out["comfort/all"] = jnp.all(jnp.stack(list(out.values())), axis=0)
    return out


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def trajectory_metrics(
    pred_xyz: jax.typing.ArrayLike,
    pred_rot: jax.typing.ArrayLike,
    gt_xyz: jax.typing.ArrayLike,
    gt_rot: jax.typing.ArrayLike,
    *,
    dt: float = DEFAULT_DT,
    lwh: Sequence[float] = EGO_BOX_LWH,
    check_finite: bool = True,
) -> dict[str, jax.Array]:
    """All metrics of a batch of clips (keys and meanings in the module docstring).

    pred_xyz (B, K, W, 3) or (B, N, K, W, 3); pred_rot the same with (3, 3) for the last axis;
    gt_xyz (B, W, 3); gt_rot (B, W, 3, 3) (the reference's `ego_future_*[:, -1]`).
    Returns (B,) float arrays per clip, and `sample_ade` (B, N, K) (N = 1 for 4-D input).

    Raises ValueError for inconsistent shapes, K, N or W of 0, and (with concrete inputs and
    `check_finite`) NaN or infinite values. Safe under `jit` and `vmap`; `dt`, `lwh` and
    `check_finite` are Python values (static: `jax.jit(trajectory_metrics, static_argnames=("dt",
    "lwh"))` when they vary)."""
    pred_xyz, pred_rot, gt_xyz, gt_rot = _checked_inputs(pred_xyz, pred_rot, gt_xyz, gt_rot, dt,
                                                         check_finite=check_finite)
    num_steps = pred_xyz.shape[3]
    errors = xy_errors(pred_xyz, gt_xyz)  # (B, N, K, W)
    per_sample = errors.mean(axis=-1)  # (B, N, K)
    best = jnp.argmin(per_sample, axis=-1)  # (B, N)
    best_errors = jnp.take_along_axis(errors, best[:, :, None, None], axis=2)[:, :, 0]  # (B, N, W)

    per_set = {"min_ade": best_errors.mean(axis=-1)}
    for seconds in MIN_ADE_HORIZONS_S:
        steps = horizon_steps(seconds, dt)
        if 0 < steps <= num_steps:
            per_set[horizon_key("min_ade", steps, dt)] = best_errors[..., :steps].mean(axis=-1)
    per_set["corner_distance"] = corner_distance_by_set(pred_xyz, pred_rot, gt_xyz, gt_rot, lwh)
    per_set["fde"] = best_errors[..., -1]
    per_set["min_fde"] = errors[..., -1].min(axis=-1)
    spread = [key for key in per_set if key.split("/")[0] in _SPREAD_KEYS]
    out = summarize_sets(per_set, spread_keys=spread)

    first = errors[:, :, 0]  # (B, N, W): the sample the reference's dummy log-probabilities pick
    out["ade"] = first.mean(axis=-1).mean(axis=-1)
    steps = horizon_steps(ADE_HORIZON_S, dt)
    if 0 < steps <= num_steps:
        out[horizon_key("ade", steps, dt)] = first[..., :steps].mean(axis=-1).mean(axis=-1)
    out["sample_ade"] = per_sample

    if num_steps >= 2:
        checks = comfort_checks(pred_xyz, pred_rot, dt)  # each (B, N, K)
        for key, passed in checks.items():
            out[key] = passed.astype(per_sample.dtype).mean(axis=(1, 2))
    return out


def _checked_inputs(pred_xyz, pred_rot, gt_xyz, gt_rot, dt, *, check_finite: bool):
    """The four inputs as float arrays, pred in the 5-D (B, N, K, W, ...) layout; raises ValueError."""
    if isinstance(dt, bool) or not (isinstance(dt, (int, float, np.floating)) and dt > 0):
        raise ValueError(f"dt must be a positive number of seconds, got {dt!r}")
    arrays = {"pred_xyz": pred_xyz, "pred_rot": pred_rot, "gt_xyz": gt_xyz, "gt_rot": gt_rot}
    arrays = {name: _float_array(name, value) for name, value in arrays.items()}
    pred_xyz, pred_rot, gt_xyz, gt_rot = arrays.values()
    if pred_xyz.ndim not in (4, 5) or pred_xyz.shape[-1] != 3:
        raise ValueError(f"pred_xyz: expected shape (B, K, W, 3) or (B, N, K, W, 3), got {pred_xyz.shape}")
    if pred_rot.shape != pred_xyz.shape[:-1] + (3, 3):
        raise ValueError(f"pred_rot: expected shape {pred_xyz.shape[:-1] + (3, 3)} to match pred_xyz "
                         f"{pred_xyz.shape}, got {pred_rot.shape}")
    if pred_xyz.ndim == 4:  # one set of K samples
        pred_xyz, pred_rot = pred_xyz[:, None], pred_rot[:, None]
    batch, num_sets, num_samples, num_steps = pred_xyz.shape[:4]
    if gt_xyz.ndim != 3 or gt_xyz.shape[-1] != 3:
        hint = " (for the reference's (B, G, W, 3) ego_future_xyz pass gt_xyz[:, -1])" if gt_xyz.ndim == 4 else ""
        raise ValueError(f"gt_xyz: expected shape (B, W, 3), got {gt_xyz.shape}{hint}")
    if gt_rot.shape != gt_xyz.shape + (3,):
        raise ValueError(f"gt_rot: expected shape {gt_xyz.shape + (3,)} to match gt_xyz {gt_xyz.shape}, "
                         f"got {gt_rot.shape}")
    if gt_xyz.shape[0] != batch:
        raise ValueError(f"gt_xyz has {gt_xyz.shape[0]} clips, pred_xyz {batch}")
    if gt_xyz.shape[1] != num_steps:
        raise ValueError(f"gt_xyz has W = {gt_xyz.shape[1]} waypoints, pred_xyz W = {num_steps}")
    for name, count in (("K (samples per set)", num_samples), ("N (sets)", num_sets), ("W (waypoints)", num_steps)):
        if count == 0:
            raise ValueError(f"pred_xyz {pred_xyz.shape}: {name} is 0; need at least one")
    if check_finite:
        for name, value in arrays.items():
            if isinstance(value, jax.core.Tracer):
                continue  # traced: nothing to look at (see the module docstring)
            host = np.asarray(value)
            bad = ~np.isfinite(host)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(f"{name}: {int(bad.sum())} NaN or infinite value(s), the first at index {first}")
    return pred_xyz, pred_rot, gt_xyz, gt_rot


def _float_array(name: str, value) -> jax.Array:
    array = value if isinstance(value, jax.Array) else jnp.asarray(value)
    if jnp.issubdtype(array.dtype, jnp.floating):
        return array
    if jnp.issubdtype(array.dtype, jnp.integer):
        return array.astype(jnp.float32)
    raise ValueError(f"{name}: expected real numbers, got dtype {array.dtype}")
