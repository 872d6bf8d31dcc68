"""Synthetic clips: valid, deterministic, and their histories are the arcs they claim."""

from __future__ import annotations

import numpy as np
import pytest

from alpamayo_jax.processing.clip import CAMERA_NAMES, FRAME_TIMESTAMPS, validate_clip
from alpamayo_jax.processing.synthetic import synthetic_clip


def test_synthetic_clip_is_valid_and_deterministic():
    clip = synthetic_clip(7, image_size=(20, 30))
    validate_clip(clip)
    assert clip.camera_frames.shape == (4, 4, 3, 20, 30)
    assert clip.camera_frames.std() > 10  # not a blank image
    again = synthetic_clip(7, image_size=(20, 30))
    for name in ("camera_frames", "ego_history_xyz", "ego_history_rot", "timestamps"):
        np.testing.assert_array_equal(getattr(again, name), getattr(clip, name))
    assert clip.camera_names == CAMERA_NAMES
    np.testing.assert_array_equal(clip.timestamps, FRAME_TIMESTAMPS)
    assert not np.array_equal(synthetic_clip(8, image_size=(20, 30)).camera_frames, clip.camera_frames)
    np.testing.assert_array_equal(clip.ego_history_xyz[-1], 0.0)
    np.testing.assert_array_equal(clip.ego_history_rot[-1], np.eye(3))


@pytest.mark.parametrize("speed, curvature", [(8.0, 0.01), (12.0, -0.05), (3.0, 0.0)])
def test_synthetic_history_is_an_arc(speed, curvature):
    clip = synthetic_clip(speed=speed, curvature=curvature)
    xyz, rot = clip.ego_history_xyz.astype(np.float64), clip.ego_history_rot.astype(np.float64)
    steps = np.diff(xyz, axis=0)
    np.testing.assert_allclose(np.linalg.norm(steps, axis=1) / 0.1, speed, rtol=0.01)
    np.testing.assert_array_equal(xyz[:, 2], 0.0)
    assert (xyz[:-1, 0] < 0).all()  # driving forward (+x) into the origin
    if curvature == 0.0:
        np.testing.assert_array_equal(xyz[:, 1], 0.0)
    else:
        radius = 1.0 / curvature  # centre (0, radius): left of the car for a left turn
        np.testing.assert_allclose(np.hypot(xyz[:, 0], xyz[:, 1] - radius), abs(radius), rtol=1e-5)
    yaw = np.arctan2(rot[:, 1, 0], rot[:, 0, 0])
    np.testing.assert_allclose(rot[:, 2], [[0.0, 0.0, 1.0]] * 16, atol=0)  # yaw only
    # The chord between two poses points along their mean heading.
    np.testing.assert_allclose(np.arctan2(steps[:, 1], steps[:, 0]), (yaw[1:] + yaw[:-1]) / 2, atol=1e-5)
    np.testing.assert_allclose(np.diff(yaw), curvature * speed * 0.1, atol=1e-6)
