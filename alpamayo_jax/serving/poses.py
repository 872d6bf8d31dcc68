"""Poses on the host (numpy only): unit quaternions, and the model's ego history from timed poses.

Quaternions are (x, y, z, w), scalar last: the order of the egodriver wire, of SciPy, and of the
PhysicalAI-AV egomotion tables. Times are integer microseconds. Positions are metres in one fixed
frame (AlpaSim's `local` frame, say); `ego_history` samples them every `dt_us` up to `t0_us` and
expresses the samples in the ego frame at t0, as `processing.clip` wants them:
p_local = R_t0^-1 (p - p_t0), R_local = R_t0^-1 R (the reference's, and AlpaSim's own driver's,
construction). Between two poses, positions are interpolated linearly and rotations by slerp.

Shapes: N poses, T history poses (16).
"""

from __future__ import annotations

import numpy as np

# Largest accepted | |q| - 1 | of a quaternion that should be a unit quaternion. float32 rounding
# of a unit quaternion is ~1e-7; anything past 1e-3 is not a rotation but a data error (another
# component order, degrees, a scaled vector).
QUATERNION_TOLERANCE = 1e-3


class HistoryUnavailable(ValueError):
    """The poses do not (yet) cover the history window; the message says what is missing."""


def check_unit_quaternions(quat: np.ndarray, *, name: str = "quaternion") -> np.ndarray:
    """(N, 4) quaternions, finite and of unit length within `QUATERNION_TOLERANCE`, normalised,
    float64. Raises ValueError naming `name` and the index of the first bad one."""
    quat = np.asarray(quat, np.float64)
    if quat.ndim != 2 or quat.shape[1] != 4:
        raise ValueError(f"{name}: expected (N, 4) quaternions (x, y, z, w), got shape {quat.shape}")
    norm = np.linalg.norm(quat, axis=1)
    bad = ~np.isfinite(norm) | (np.abs(norm - 1.0) > QUATERNION_TOLERANCE)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(f"{name}[{first}]: (qx, qy, qz, qw) must be a unit quaternion (|q| = 1 within "
                         f"{QUATERNION_TOLERANCE}), got |q| = {norm[first]:.6g}")
    return quat / norm[:, None]


def quaternion_to_matrix(quat: np.ndarray) -> np.ndarray:
    """(N, 4) unit quaternions (x, y, z, w) -> (N, 3, 3) rotation matrices, float64."""
    x, y, z, w = np.moveaxis(np.asarray(quat, np.float64), -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=-1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=-1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=-1),
    ], axis=-2)


def _slerp(q0: np.ndarray, q1: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Spherical interpolation of unit quaternions, row by row ((N, 4), (N, 4), (N,))."""
    dot = np.sum(q0 * q1, axis=1)
    q1 = np.where(dot[:, None] < 0, -q1, q1)  # the shorter way round
    dot = np.abs(dot)
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    sin = np.sin(theta)
    near = sin < 1e-9  # (almost) the same rotation: linear is exact enough
    safe = np.where(near, 1.0, sin)
    w0 = np.where(near, 1 - alpha, np.sin((1 - alpha) * theta) / safe)
    w1 = np.where(near, alpha, np.sin(alpha * theta) / safe)
    q = w0[:, None] * q0 + w1[:, None] * q1
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def ego_history(
    times_us,  # (N,) int, strictly increasing
    positions,  # (N, 3) metres in one fixed frame
    quaternions,  # (N, 4) (x, y, z, w) orientations in that frame
    t0_us: int,
    *,
    num_poses: int = 16,
    dt_us: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """The poses at t0 - (T - 1) dt ... t0, oldest first, in the ego frame at t0: (T, 3) float32
    positions and (T, 3, 3) float32 rotations (the last the origin and the identity).

    Raises `HistoryUnavailable` when the poses do not span [t0 - (T - 1) dt, t0] (fewer than two
    poses, none as old as the window's start, or none as recent as t0), and ValueError for poses
    that are not finite, not unit quaternions or not in strictly increasing time order."""
    times = np.asarray(times_us, np.int64)
    positions = np.asarray(positions, np.float64)
    if times.ndim != 1 or positions.shape != (len(times), 3):
        raise ValueError(f"expected (N,) times and (N, 3) positions, got {times.shape} and {positions.shape}")
    start_us = int(t0_us) - (num_poses - 1) * int(dt_us)
    span_s = (num_poses - 1) * dt_us / 1e6
    if len(times) < 2:
        raise HistoryUnavailable(f"ego history: {len(times)} pose(s) received, need poses spanning the "
                                 f"{span_s:g} s before the latest camera frame")
    if not (np.diff(times) > 0).all():
        raise ValueError("ego poses must be in strictly increasing time order")
    if times[-1] < t0_us:
        raise HistoryUnavailable(f"ego history: the latest pose ({times[-1]} us) is older than the latest "
                                 f"camera frame ({t0_us} us)")
    if times[0] > start_us:
        raise HistoryUnavailable(f"ego history: {(times[-1] - times[0]) / 1e6:g} s of poses received "
                                 f"(from {times[0]} us), need {span_s:g} s before the latest camera frame "
                                 f"(from {start_us} us)")
    if not np.isfinite(positions).all():
        raise ValueError("ego poses hold non-finite positions")
    quats = check_unit_quaternions(quaternions, name="ego pose quaternion")
    targets = start_us + np.arange(num_poses, dtype=np.int64) * int(dt_us)
    upper = np.clip(np.searchsorted(times, targets, side="left"), 1, len(times) - 1)
    lower = upper - 1
    alpha = (targets - times[lower]) / (times[upper] - times[lower])
    xyz = positions[lower] + alpha[:, None] * (positions[upper] - positions[lower])
    rot = quaternion_to_matrix(_slerp(quats[lower], quats[upper], alpha))
    rot_t0_inv = rot[-1].T
    local_xyz = (xyz - xyz[-1]) @ rot_t0_inv.T
    local_rot = rot_t0_inv[None] @ rot
    return local_xyz.astype(np.float32), local_rot.astype(np.float32)
