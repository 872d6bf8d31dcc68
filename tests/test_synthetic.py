"""Synthetic clips: valid, deterministic, and their histories and futures are the arcs they claim."""

from __future__ import annotations

import numpy as np
import pytest

from alpamayo_jax.processing.clip import CAMERA_NAMES, FRAME_TIMESTAMPS, validate_clip
from alpamayo_jax.processing.synthetic import arc_future, arc_history, synthetic_clip


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


def _yaw(rot):
    return np.arctan2(rot[:, 1, 0], rot[:, 0, 0])


def test_synthetic_clip_with_future_is_valid_and_keeps_the_frames():
    clip = synthetic_clip(7, with_future=True)
    validate_clip(clip)
    assert clip.has_ground_truth and not synthetic_clip(7).has_ground_truth
    assert clip.ego_future_xyz.shape == (64, 3) and clip.ego_future_rot.shape == (64, 3, 3)
    assert clip.ego_future_xyz.dtype == np.float32 and clip.ego_future_rot.dtype == np.float32
    without = synthetic_clip(7)
    for name in ("camera_frames", "ego_history_xyz", "ego_history_rot", "timestamps"):
        np.testing.assert_array_equal(getattr(clip, name), getattr(without, name))
    np.testing.assert_array_equal(synthetic_clip(7, with_future=True).ego_future_xyz, clip.ego_future_xyz)


@pytest.mark.parametrize("speed, curvature", [(8.0, 0.01), (12.0, -0.05), (3.0, 0.0), (-4.0, 0.02)])
def test_synthetic_future_continues_the_history(speed, curvature):
    clip = synthetic_clip(speed=speed, curvature=curvature, with_future=True)
    history = clip.ego_history_xyz.astype(np.float64)
    future = clip.ego_future_xyz.astype(np.float64)
    path = np.concatenate([history, future])  # t0 - 1.5 s ... t0 + 6.4 s, the origin at index 15
    steps = np.diff(path, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    # The first future step (t0 -> t0 + 0.1 s) is as long as a history step, and so are all others.
    np.testing.assert_allclose(np.linalg.norm(future[0]), lengths[14], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lengths, abs(speed) * 0.1, rtol=1e-3)
    np.testing.assert_array_equal(future[:, 2], 0.0)
    if speed > 0:
        assert future[0, 0] > 0  # driving forward: the future lies ahead (+x)
    if curvature != 0.0:  # the same circle as the history, centre (0, 1 / curvature)
        radius = 1.0 / curvature
        np.testing.assert_allclose(np.hypot(path[:, 0], path[:, 1] - radius), abs(radius), rtol=1e-5)
    # The heading keeps turning at the same rate across t0, and the chords follow the mean heading.
    rot = np.concatenate([clip.ego_history_rot, clip.ego_future_rot]).astype(np.float64)
    yaw = np.unwrap(_yaw(rot))  # 12 m/s at curvature -0.05 turns by more than pi in 7.9 s
    np.testing.assert_allclose(np.diff(yaw), curvature * speed * 0.1, atol=1e-6)
    np.testing.assert_allclose(yaw[16], curvature * speed * 0.1, atol=1e-7)  # one step after t0
    np.testing.assert_allclose(rot[:, 2], [[0.0, 0.0, 1.0]] * 80, atol=0)  # yaw only
    if speed > 0:
        off = np.arctan2(steps[:, 1], steps[:, 0]) - (yaw[1:] + yaw[:-1]) / 2
        np.testing.assert_allclose(np.angle(np.exp(1j * off)), 0.0, atol=1e-5)


def test_future_and_history_are_one_formula():
    # Driving forward into the future retraces, in reverse order, a history of reversing at the same
    # speed: both come from the same arc, so they agree bit for bit.
    future_xyz, future_rot = arc_future(9.0, 0.03, num_future=64)
    back_xyz, back_rot = arc_history(-9.0, 0.03, num_history=65)
    np.testing.assert_array_equal(future_xyz, back_xyz[::-1][1:])
    np.testing.assert_array_equal(future_rot, back_rot[::-1][1:])
    xyz, rot = arc_future(9.0, 0.03, num_future=5)
    np.testing.assert_array_equal(xyz, future_xyz[:5])
    np.testing.assert_array_equal(rot, future_rot[:5])
