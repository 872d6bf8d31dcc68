"""The synthetic driving scenes the demo model is trained on: each drive does what its scene and its
explanation say, and the pictures show the scene."""

from __future__ import annotations

import numpy as np
import pytest

from alpamayo_jax.data.driving_scenes import EXPLANATIONS, KINDS, driving_scene, driving_scenes
from alpamayo_jax.processing.clip import CAMERA_NAMES

TELE = CAMERA_NAMES.index("front_tele_30fov")


def speeds(xyz: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.diff(xyz[:, :2], axis=0), axis=-1) / 0.1


@pytest.fixture(scope="module")
def scenes():
    return {kind: driving_scene(kind, 3) for kind in KINDS}


def test_drives_follow_their_scenes(scenes):
    for kind, clip in scenes.items():
        assert clip.cot == EXPLANATIONS[kind] and clip.has_ground_truth
        history, future = speeds(clip.ego_history_xyz), speeds(np.concatenate([[[0, 0, 0]], clip.ego_future_xyz]))
        np.testing.assert_allclose(history, history[0], rtol=1e-4)  # steady before t0
        end_y = float(clip.ego_future_xyz[-1, 1])
        if kind in ("cruise", "curve_left", "curve_right"):
            np.testing.assert_allclose(future, history[0], rtol=1e-3)
        if kind == "cruise":
            assert abs(end_y) < 1e-3
        if kind == "curve_left":
            assert end_y > 10
        if kind == "curve_right":
            assert end_y < -10
        if kind in ("lead_braking", "stop_line"):
            assert future[-1] < 0.3 * history[0] and np.all(np.diff(future) <= 1e-3)
    stop_clip = scenes["stop_line"]
    assert speeds(stop_clip.ego_future_xyz)[-1] < 1e-3  # at a standstill by 6.4 s


def red_pixels(frame: np.ndarray) -> int:
    r, g, b = frame.astype(int)
    return int(((r > 200) & (g < 120) & (b < 110)).sum())


def white_pixels_above_centre(frame: np.ndarray) -> int:
    """Bright pixels in the band just below the horizon (where a stop line far ahead shows)."""
    band = frame[:, frame.shape[1] // 2: frame.shape[1] * 3 // 4, frame.shape[2] // 4: frame.shape[2] * 3 // 4]
    return int((band.min(axis=0) > 150).sum())


def test_pictures_show_the_scene(scenes):
    tele = {kind: clip.camera_frames[TELE][-1] for kind, clip in scenes.items()}
    assert red_pixels(tele["lead_braking"]) > 0  # brake lights in the telephoto view
    assert all(red_pixels(tele[kind]) == 0 for kind in KINDS if kind != "lead_braking")
    assert white_pixels_above_centre(tele["stop_line"]) > white_pixels_above_centre(tele["cruise"])
    for clip in scenes.values():
        frames = clip.camera_frames
        assert frames.dtype == np.uint8 and frames.shape == (4, 4, 3, 48, 64)
        assert not np.array_equal(frames[:, 0], frames[:, -1])  # the view moves with the ego


def test_scene_sets_are_balanced_and_deterministic():
    first, again = driving_scenes(10, seed=4), driving_scenes(10, seed=4)
    assert [name for name, _ in first] == [name for name, _ in again]
    np.testing.assert_array_equal(first[0][1].camera_frames, again[0][1].camera_frames)
    kinds = [name.rsplit("_", 1)[0] for name, _ in first]
    assert sorted(kinds) == sorted(list(KINDS) * 2)
    with pytest.raises(ValueError, match="unknown scene kind"):
        driving_scene("fog", 0)
