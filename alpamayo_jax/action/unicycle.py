"""The unicycle action space: normalised (acceleration, curvature) per step <-> trajectories.

Reproduces `UnicycleAccelCurvatureActionSpace` (SPEC §9.3-9.5) as pure functions, batched over
any leading axes and safe under `jit`, `vmap` and `grad`. Everything is computed in float32.

The static `ActionSpaceConfig` (dt, regularisation weights, bounds, N) is passed as `cfg` (mark it
static under `jit`); the normalisation statistics are passed separately as `ActionStats`, because
the model fills them from checkpoint buffers, which in a bf16 checkpoint hold bf16-rounded values.

Trajectories are in the ego frame at t0: the last history pose is the origin with zero yaw.

Shape legend: `...` leading batch axes (broadcast between history and actions/future);
H history poses (16); N future waypoints (`cfg.n_waypoints`, 64).

Non-finite input: nothing raises inside `jit`. NaN and inf propagate through the arithmetic
and stay within their batch element: a non-finite position poisons that trajectory's fitted
speeds, actions and rolled-out x, y and heading, while every other trajectory of the batch is
computed bit for bit as without it (the solvers pick their ridge per element and do not retry a
non-finite system, see `solvers.cholesky_ridge`). Call `validate_trajectory` on the host to
reject such input with a clear message instead.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from alpamayo_jax.action import solvers
from alpamayo_jax.config import ActionSpaceConfig


class ActionStats(NamedTuple):
    """Normalisation statistics of the actions: four 0-d arrays. Any float dtype; bf16 values
    promote exactly to the float32 arithmetic, as the reference's 0-d bf16 buffers do."""

    accel_mean: jax.Array
    accel_std: jax.Array
    curvature_mean: jax.Array
    curvature_std: jax.Array

    @classmethod
    def from_config(cls, cfg: ActionSpaceConfig) -> ActionStats:
        """The config's values, rounded to float32 (a float32 checkpoint's buffers)."""
        return cls(*(jnp.asarray(getattr(cfg, name), jnp.float32) for name in cls._fields))


def validate_trajectory(**arrays: jax.typing.ArrayLike) -> None:
    """Host-side check that every named array is finite; raises ValueError naming the first
    offending array, how many entries are bad and where the first one is.

    Example: `validate_trajectory(hist_xyz=hist_xyz, hist_rot=hist_rot)`.
    """
    for name, value in arrays.items():
        value = np.asarray(value)
        bad = ~np.isfinite(value)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite value(s) out of {value.size}; "
                f"the first is {value[first]} at index {first}"
            )


def unwrap_angle(angle: jax.Array) -> jax.Array:
    """Unwraps angles (..., T) along the last axis: every step is replaced by its equivalent in
    [-π, π] (atan2(sin Δ, cos Δ)) and the steps are re-accumulated from the first angle."""
    step = jnp.diff(angle, axis=-1)
    step = jnp.arctan2(jnp.sin(step), jnp.cos(step))
    return jnp.concatenate([angle[..., :1], angle[..., :1] + jnp.cumsum(step, axis=-1)], axis=-1)


def yaw_of(rot: jax.Array) -> jax.Array:
    """Yaw (...,) of rotation matrices (..., 3, 3): atan2(R[1,0], R[0,0])."""
    return jnp.arctan2(rot[..., 1, 0], rot[..., 0, 0])


def yaw_rotation(yaw: jax.Array) -> jax.Array:
    """Rotation matrices (..., 3, 3) about z by yaw (...,)."""
    c, s = jnp.cos(yaw), jnp.sin(yaw)
    zero, one = jnp.zeros_like(yaw), jnp.ones_like(yaw)
    return jnp.stack(
        [jnp.stack([c, -s, zero], -1), jnp.stack([s, c, zero], -1), jnp.stack([zero, zero, one], -1)], -2
    )


def denormalize(actions: jax.Array, stats: ActionStats) -> tuple[jax.Array, jax.Array]:
    """Normalised actions (..., N, 2) -> acceleration (..., N) [m/s²], curvature (..., N) [1/m]."""
    actions = jnp.asarray(actions, jnp.float32)
    accel = actions[..., 0] * stats.accel_std + stats.accel_mean
    curvature = actions[..., 1] * stats.curvature_std + stats.curvature_mean
    return accel, curvature


def normalize(accel: jax.Array, curvature: jax.Array, stats: ActionStats) -> jax.Array:
    """Acceleration and curvature (..., N) -> normalised actions (..., N, 2)."""
    return jnp.stack(
        [
            (accel - stats.accel_mean) / stats.accel_std,
            (curvature - stats.curvature_mean) / stats.curvature_std,
        ],
        axis=-1,
    )


def is_within_bounds(actions: jax.Array, cfg: ActionSpaceConfig, stats: ActionStats) -> jax.Array:
    """Whether every step of normalised actions (..., N, 2) has acceleration and curvature inside
    `cfg.accel_bounds` / `cfg.curvature_bounds` (inclusive) -> bool (...,)."""
    accel, curvature = denormalize(actions, stats)
    (a_lo, a_hi), (k_lo, k_hi) = cfg.accel_bounds, cfg.curvature_bounds
    inside = (accel >= a_lo) & (accel <= a_hi) & (curvature >= k_lo) & (curvature <= k_hi)
    return jnp.all(inside, axis=-1)


def estimate_t0_states(hist_xyz: jax.Array, hist_rot: jax.Array, cfg: ActionSpaceConfig) -> jax.Array:
    """Speed at t0 (...,) [m/s] from the history hist_xyz (..., H, 3), hist_rot (..., H, 3, 3):
    the last of the H speeds fitted by `solvers.solve_speeds` to the history's displacements and
    unwrapped headings. Negative when the vehicle reverses."""
    hist_xyz = jnp.asarray(hist_xyz, jnp.float32)
    theta = unwrap_angle(yaw_of(jnp.asarray(hist_rot, jnp.float32)))
    dxy = jnp.diff(hist_xyz[..., :2], axis=-2)
    v = solvers.solve_speeds(dxy, theta, dt=cfg.dt, lam=cfg.v_lambda, ridge=cfg.v_ridge)
    return v[..., -1]


def action_to_traj(
    actions: jax.Array,
    hist_xyz: jax.Array,
    hist_rot: jax.Array,
    cfg: ActionSpaceConfig,
    stats: ActionStats,
) -> tuple[jax.Array, jax.Array]:
    """Rolls normalised actions (..., N, 2) out into the future trajectory.

    A `lax.scan` over the N steps of a unicycle integrated with the trapezoid rule, starting at
    the origin with zero yaw and the speed `estimate_t0_states` fits to the history:
    v' = v + a dt,  θ' = θ + κ v dt + κ a dt²/2,  x' = x + (v cos θ + v' cos θ') dt/2 (y with sin).
    The reference evaluates the same equations as sums of separate cumulative sums; the different
    summation order changes the result only at float32 rounding level.

    Returns xyz (..., N, 3), with z the last history z, and yaw-only rotations (..., N, 3, 3).
    """
    hist_xyz = jnp.asarray(hist_xyz, jnp.float32)
    accel, curvature = denormalize(actions, stats)
    batch = jnp.broadcast_shapes(accel.shape[:-1], hist_xyz.shape[:-2])
    v0 = jnp.broadcast_to(estimate_t0_states(hist_xyz, hist_rot, cfg), batch)
    controls = (
        jnp.moveaxis(jnp.broadcast_to(accel, batch + accel.shape[-1:]), -1, 0),
        jnp.moveaxis(jnp.broadcast_to(curvature, batch + curvature.shape[-1:]), -1, 0),
    )
    dt = cfg.dt
    half_dt, half_dt2 = 0.5 * dt, 0.5 * dt**2

    def step(state, control):
        v, theta, x, y = state
        a, kappa = control
        v_next = v + a * dt
        theta_next = theta + kappa * v * dt + kappa * a * half_dt2
        x_next = x + v * jnp.cos(theta) * half_dt + v_next * jnp.cos(theta_next) * half_dt
        y_next = y + v * jnp.sin(theta) * half_dt + v_next * jnp.sin(theta_next) * half_dt
        return (v_next, theta_next, x_next, y_next), (x_next, y_next, theta_next)

    zero = jnp.zeros_like(v0)
    _, (x, y, theta) = jax.lax.scan(step, (v0, zero, zero, zero), controls)
    x, y, theta = (jnp.moveaxis(t, 0, -1) for t in (x, y, theta))
    z = jnp.broadcast_to(hist_xyz[..., -1:, 2], x.shape)
    return jnp.stack([x, y, z], axis=-1), yaw_rotation(theta)


def traj_to_action(
    hist_xyz: jax.Array,
    hist_rot: jax.Array,
    fut_xyz: jax.Array,
    fut_rot: jax.Array,
    cfg: ActionSpaceConfig,
    stats: ActionStats,
    return_states: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Fits normalised actions (..., N, 2) to a future trajectory (the inverse of `action_to_traj`).

    hist_xyz (..., H, 3), hist_rot (..., H, 3, 3), fut_xyz (..., N, 3), fut_rot (..., N, 3, 3).
    In order (`solvers` has the maths): the t0 speed from the history; headings θ (..., N+1)
    smoothed from the future's unwrapped yaw; speeds v (..., N+1) from the xy displacements with
    v_0 fixed to the t0 speed; accelerations from the speed differences; curvatures from the
    heading differences over the arc length v dt + a dt²/2. Each least-squares solve is a
    Cholesky solve that, like the reference, retries with a 10× larger ridge if the
    factorisation fails (`solvers.solve_spd`): identical to a single attempt when that
    succeeds, finite whenever the input is finite.

    With `return_states`, also returns stack([v_0..v_{N-1}, normalised accel, θ_0..θ_{N-1}]) (..., N, 3):
    the reference stacks the acceleration after normalising it, and so does this function.
    """
    hist_xyz = jnp.asarray(hist_xyz, jnp.float32)
    fut_xyz = jnp.asarray(fut_xyz, jnp.float32)
    if fut_xyz.shape[-2] != cfg.n_waypoints:
        raise ValueError(
            f"fut_xyz has {fut_xyz.shape[-2]} waypoints, the action space expects {cfg.n_waypoints}"
        )
    batch = jnp.broadcast_shapes(hist_xyz.shape[:-2], fut_xyz.shape[:-2])
    dt = cfg.dt

    # The trajectory starts at the last history point (the origin of the t0 frame).
    start = jnp.broadcast_to(hist_xyz[..., -1:, :2], batch + (1, 2))
    xy = jnp.concatenate([start, jnp.broadcast_to(fut_xyz[..., :2], batch + fut_xyz.shape[-2:-1] + (2,))], -2)
    dxy = jnp.diff(xy, axis=-2)

    heading = unwrap_angle(yaw_of(jnp.asarray(fut_rot, jnp.float32)))
    theta = solvers.smooth_heading(heading, dt=dt, lam=cfg.theta_lambda, ridge=cfg.theta_ridge)
    v0 = estimate_t0_states(hist_xyz, hist_rot, cfg)
    v = solvers.solve_speeds(dxy, theta, dt=dt, lam=cfg.v_lambda, ridge=cfg.v_ridge, v0=v0)

    dv = (v[..., 1:] - v[..., :-1]) / dt
    accel = solvers.solve_scaled(jnp.ones_like(dv), dv, dt=dt, lam=cfg.a_lambda, ridge=cfg.a_ridge)
    arc = dt * v[..., :-1] + (dt**2 / 2.0) * accel
    dtheta = theta[..., 1:] - theta[..., :-1]
    curvature = solvers.solve_scaled(arc, dtheta, dt=dt, lam=cfg.kappa_lambda, ridge=cfg.kappa_ridge)

    actions = normalize(accel, curvature, stats)
    if not return_states:
        return actions
    return actions, jnp.stack([v[..., :-1], actions[..., 0], theta[..., :-1]], axis=-1)
