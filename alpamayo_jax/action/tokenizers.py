"""Trajectory tokenizers: quantised ego history (prompt tokens) and quantised future actions.

* History (`DeltaTrajectoryTokenizer`, SPEC §9.1): per-step xyz displacements, each axis
  quantised to `num_bins` bins over [xyz_min, xyz_max]. The first displacement is taken from a
  zero point, so it is the absolute position of the oldest history pose relative to t0 and
  usually saturates. With an even `num_bins` (160, 1000), a zero displacement is a rounding tie
  that goes to the upper of the two middle bins: a decoded flat history climbs by half a bin
  per step, as in the reference.
* Future (`DiscreteTrajectoryTokenizer`, SPEC §9.2): the normalised actions `traj_to_action`
  fits to the future, each quantised to `num_bins` bins over [dims_min, dims_max]. Used for
  training and autoregressive decoding only; the diffusion inference path never calls it.

Bins are returned before the vocabulary offset is added. Quantisation is
clip(round_half_to_even((value − min) / (max − min) · (num_bins − 1)), 0, num_bins − 1), in float32.
Bins of non-finite input are unspecified; use `unicycle.validate_trajectory` first.

For the future tokenizer, pass `ActionStats.from_config(cfg.action_space)`: the reference builds
that tokenizer's action space from the config as a plain object, outside the model's modules,
so its statistics are never replaced by (bf16) checkpoint buffers.

Shape legend: `...` leading batch axes; T history poses (16); N future waypoints (64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alpamayo_jax.action import unicycle
from alpamayo_jax.config import FutureTokenizerConfig, HistoryTokenizerConfig

# Heading of decoded history poses: derivative of a cubic fitted to x(t) and y(t) over a sliding
# window of 10 poses (fixed in the reference, not configurable).
YAW_FIT_WINDOW = 10
YAW_FIT_ORDER = 3


def _quantize(value: jax.Array, lo, hi, num_bins: int) -> jax.Array:
    lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    scaled = (value - lo) / (hi - lo) * (num_bins - 1)
    # Clipping before the integer cast keeps out-of-range values well defined.
    return jnp.clip(jnp.round(scaled), 0, num_bins - 1).astype(jnp.int32)


def _dequantize(bins: jax.Array, lo, hi, num_bins: int) -> jax.Array:
    lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    return bins.astype(jnp.float32) / (num_bins - 1) * (hi - lo) + lo


def encode_history(hist_xyz: jax.Array, cfg: HistoryTokenizerConfig) -> jax.Array:
    """History positions (..., T, 3) -> bins (..., 3T) int32, ordered (dx_0, dy_0, dz_0, dx_1, ...)."""
    xyz = jnp.asarray(hist_xyz, jnp.float32)
    deltas = jnp.diff(xyz, axis=-2, prepend=jnp.zeros_like(xyz[..., :1, :]))
    bins = _quantize(deltas, cfg.xyz_min, cfg.xyz_max, cfg.num_bins)
    return bins.reshape(bins.shape[:-2] + (-1,))


def decode_history(bins: jax.Array, cfg: HistoryTokenizerConfig) -> tuple[jax.Array, jax.Array]:
    """Bins (..., 3T) -> positions (..., T, 3) (cumulative displacements) and yaw-only rotations
    (..., T, 3, 3) whose yaw is the direction of motion from a sliding cubic fit of x(t), y(t)."""
    bins = jnp.asarray(bins)
    deltas = _dequantize(bins.reshape(bins.shape[:-1] + (-1, 3)), cfg.xyz_min, cfg.xyz_max, cfg.num_bins)
    xyz = jnp.cumsum(deltas, axis=-2)
    velocity = jnp.einsum(
        "ts,...sc->...tc",
        _fit_derivative_matrix(xyz.shape[-2]),
        xyz[..., :2],
        precision=jax.lax.Precision.HIGHEST,
    )
    return xyz, unicycle.yaw_rotation(jnp.arctan2(velocity[..., 1], velocity[..., 0]))


@functools.cache
def _fit_derivative_matrix(n: int) -> np.ndarray:
    """(n, n) float32 matrix W such that (W @ x)_i is the derivative, at sample i, of the
    least-squares cubic fitted to x over the window of YAW_FIT_WINDOW samples around i.

    The fit is linear in the samples and the window's time grid is always 0..w−1, so the whole
    sliding fit collapses into one constant matrix. Windows start half a window before i and
    are shifted inwards at both ends; with fewer samples than a window, all samples are used.
    """
    window = min(YAW_FIT_WINDOW, n)
    t = np.arange(window, dtype=np.float64)
    fit = np.linalg.pinv(np.vander(t, YAW_FIT_ORDER + 1))  # coefficients, highest power first
    powers = np.arange(YAW_FIT_ORDER, -1, -1)
    w = np.zeros((n, n))
    for i in range(n):
        start = min(max(0, i - YAW_FIT_WINDOW // 2), n - window)
        center = i - start
        derivative = np.where(powers > 0, powers * float(center) ** np.maximum(powers - 1, 0), 0.0)
        w[i, start : start + window] = derivative @ fit
    return w.astype(np.float32)


def encode_future(
    hist_xyz: jax.Array,
    hist_rot: jax.Array,
    fut_xyz: jax.Array,
    fut_rot: jax.Array,
    cfg: FutureTokenizerConfig,
    stats: unicycle.ActionStats,
) -> jax.Array:
    """History (..., T, 3), (..., T, 3, 3) and future (..., N, 3), (..., N, 3, 3) -> bins
    (..., 2N) int32 of the fitted normalised actions, ordered (accel_0, curvature_0, accel_1, ...)."""
    actions = unicycle.traj_to_action(hist_xyz, hist_rot, fut_xyz, fut_rot, cfg.action_space, stats)
    bins = _quantize(actions, cfg.dims_min, cfg.dims_max, cfg.num_bins)
    return bins.reshape(bins.shape[:-2] + (-1,))


def decode_future(
    bins: jax.Array,
    hist_xyz: jax.Array,
    hist_rot: jax.Array,
    cfg: FutureTokenizerConfig,
    stats: unicycle.ActionStats,
) -> tuple[jax.Array, jax.Array]:
    """Bins (..., 2N) -> future positions (..., N, 3) and rotations (..., N, 3, 3), rolled out
    from the history (..., T, 3), (..., T, 3, 3) by `action_to_traj`."""
    bins = jnp.asarray(bins)
    actions = _dequantize(bins.reshape(bins.shape[:-1] + (-1, 2)), cfg.dims_min, cfg.dims_max, cfg.num_bins)
    return unicycle.action_to_traj(actions, hist_xyz, hist_rot, cfg.action_space, stats)
