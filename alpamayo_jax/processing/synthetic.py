"""Synthetic clips (numpy only): deterministic camera frames, ego histories and futures for demos and tests.

`arc_history` is the history of a car driving at constant speed on a circle into the t0 pose and
`arc_future` the same drive continued past t0 (one formula, `_arc_poses`); `synthetic_clip` adds
smooth, slowly drifting colour-gradient frames for all cameras, and optionally the future as ground
truth (the `Clip` itself is described in `alpamayo_jax.processing.clip`).
"""

from __future__ import annotations

import numpy as np

from alpamayo_jax.processing.clip import CAMERA_NAMES, FRAME_TIMESTAMPS, HISTORY_DT, Clip


def arc_poses(arc_length, curvature: float) -> tuple[np.ndarray, np.ndarray]:
    """Poses at signed distances `arc_length` (S,) metres (< 0 before t0) along a circle of signed
    `curvature` (1/m, > 0 turns left) through the t0 pose (the origin, heading +x): (S, 3)
    float32 positions and (S, 3, 3) yaw-only rotations in the t0 frame."""
    arc_length = np.asarray(arc_length, dtype=np.float64)
    num_poses = len(arc_length)
    yaw = curvature * arc_length
    # sin(yaw)/k and (1 - cos(yaw))/k written with sinc, which stays exact as k -> 0 (a straight line).
    x = arc_length * np.sinc(yaw / np.pi)
    y = arc_length * (yaw / 2) * np.sinc(yaw / (2 * np.pi)) ** 2
    xyz = np.stack([x, y, np.zeros_like(x)], axis=-1)
    cos, sin = np.cos(yaw), np.sin(yaw)
    rot = np.zeros((num_poses, 3, 3))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = cos, -sin, sin, cos, 1.0
    return xyz.astype(np.float32), rot.astype(np.float32)


def _arc_poses(speed: float, curvature: float, steps, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """`arc_poses` of a car driving at constant `speed` (m/s, < 0 reversing), at times `steps` *
    `dt` relative to t0 (integer `steps`, < 0 the past)."""
    return arc_poses(speed * dt * np.asarray(steps, dtype=np.float64), curvature)


def arc_history(
    speed: float, curvature: float, *, num_history: int = 16, dt: float = HISTORY_DT
) -> tuple[np.ndarray, np.ndarray]:
    """Ego history of constant `speed` (m/s, < 0 reversing) on a circle of signed `curvature`
    (1/m, > 0 turns left) ending at t0: (T, 3) float32 positions and (T, 3, 3) yaw-only rotations
    in the t0 frame (`_arc_poses` at steps 1 - T ... 0)."""
    return _arc_poses(speed, curvature, np.arange(1 - num_history, 1), dt)


def arc_future(
    speed: float, curvature: float, *, num_future: int = 64, dt: float = HISTORY_DT
) -> tuple[np.ndarray, np.ndarray]:
    """The drive of `arc_history(speed, curvature)` continued past t0: the poses at t0 + dt ...
    t0 + N dt, (N, 3) float32 positions and (N, 3, 3) yaw-only rotations in the t0 frame
    (`_arc_poses` at steps 1 ... N)."""
    return _arc_poses(speed, curvature, np.arange(1, num_future + 1), dt)


def synthetic_clip(
    seed: int = 0,
    *,
    image_size: tuple[int, int] = (32, 48),
    speed: float = 8.0,
    curvature: float = 0.01,
    with_future: bool = False,
) -> Clip:
    """A deterministic 4-camera, 4-frame clip for demos and tests: smooth colour gradients with a
    little noise, drifting from frame to frame, and `arc_history(speed, curvature)`; with
    `with_future`, `arc_future(speed, curvature)` (64 poses) as its ground truth. Frames are
    (4, 4, 3, *image_size) uint8; timestamps and camera names are the canonical ones. The frames do
    not depend on `with_future`."""
    rng = np.random.default_rng(seed)
    height, width = image_size
    rows = np.linspace(0.0, 1.0, height)[:, None]
    cols = np.linspace(0.0, 1.0, width)[None, :]
    frames = np.empty((len(CAMERA_NAMES), len(FRAME_TIMESTAMPS), 3, height, width), np.uint8)
    for c in range(frames.shape[0]):
        base = rng.uniform(40, 200, size=(3, 1, 1))
        slope = rng.uniform(-60, 60, size=(3, 2, 1, 1))
        for f in range(frames.shape[1]):
            shift = 0.1 * f  # the scene slides a little between frames, as it would when driving
            noise = rng.normal(0.0, 4.0, (3, height, width))
            image = base + slope[:, 0] * (rows + shift) + slope[:, 1] * cols + noise
            frames[c, f] = np.clip(np.round(image), 0, 255)
    xyz, rot = arc_history(speed, curvature)
    future_xyz, future_rot = arc_future(speed, curvature) if with_future else (None, None)
    return Clip.create(
        frames,
        xyz,
        rot,
        timestamps=FRAME_TIMESTAMPS,
        camera_names=CAMERA_NAMES,
        ego_future_xyz=future_xyz,
        ego_future_rot=future_rot,
    )
