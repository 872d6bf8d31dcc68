"""Clips and precomputed model inputs: construction checks, file round trips and their errors."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from alpamayo_jax.processing.clip import (
    CAMERA_NAMES,
    FRAME_TIMESTAMPS,
    Clip,
    ClipError,
    ModelInputs,
    arc_history,
    load_clip,
    load_model_inputs,
    save_clip,
    save_model_inputs,
    synthetic_clip,
    validate_clip,
)


def _frames(shape=(4, 4, 3, 8, 12), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _history(n=16):
    return arc_history(5.0, 0.02, num_history=n)


def _rot_with(pose, matrix):
    rot = _history()[1].copy()
    rot[pose] = matrix
    return rot


def _xyz_with_nan(pose):
    xyz = _history()[0].copy()
    xyz[pose, 1] = np.nan
    return xyz


def _assert_clips_equal(a: Clip, b: Clip):
    assert len(a.camera_frames) == len(b.camera_frames)
    for camera_a, camera_b in zip(a.camera_frames, b.camera_frames, strict=True):
        np.testing.assert_array_equal(camera_a, camera_b)
    np.testing.assert_array_equal(a.ego_history_xyz, b.ego_history_xyz)
    np.testing.assert_array_equal(a.ego_history_rot, b.ego_history_rot)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert a.camera_names == b.camera_names


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    clip = synthetic_clip(3)
    path = tmp_path / "clip.npz"
    save_clip(path, clip)
    loaded = load_clip(path)
    _assert_clips_equal(loaded, clip)
    assert loaded.camera_frames.dtype == np.uint8 and loaded.ego_history_xyz.dtype == np.float32
    assert loaded.camera_names == CAMERA_NAMES


def test_optional_fields_may_be_absent(tmp_path):
    xyz, rot = _history()
    clip = Clip.create(_frames(), xyz, rot)
    save_clip(tmp_path / "clip.npz", clip)
    with np.load(tmp_path / "clip.npz") as archive:
        assert sorted(archive.files) == ["camera_frames", "ego_history_rot", "ego_history_xyz"]
    loaded = load_clip(tmp_path / "clip.npz")
    assert loaded.timestamps is None and loaded.camera_names is None
    _assert_clips_equal(loaded, clip)


def test_channels_last_input_is_converted(tmp_path):
    frames = _frames()
    xyz, rot = _history()
    channels_last = frames.transpose(0, 1, 3, 4, 2)  # (C, F, H, W, 3)
    np.testing.assert_array_equal(Clip.create(channels_last, xyz, rot).camera_frames, frames)
    nested = [[np.ascontiguousarray(f) for f in camera] for camera in channels_last]
    np.testing.assert_array_equal(Clip.create(nested, xyz, rot).camera_frames, frames)

    path = tmp_path / "hwc.npz"
    np.savez(path, camera_frames=channels_last, ego_history_xyz=xyz, ego_history_rot=rot)
    np.testing.assert_array_equal(load_clip(path).camera_frames, frames)


def test_cameras_of_different_sizes_round_trip(tmp_path):
    xyz, rot = _history()
    cameras = [_frames((4, 3, 8, 12), seed=c) for c in range(3)] + [_frames((4, 3, 16, 24), seed=3)]
    clip = Clip.create(cameras, xyz, rot)
    assert isinstance(clip.camera_frames, tuple)
    assert [c.shape for c in clip.camera_frames] == [(4, 3, 8, 12)] * 3 + [(4, 3, 16, 24)]
    path = tmp_path / "mixed.npz"
    save_clip(path, clip)
    with np.load(path) as archive:
        assert "camera_frames_3" in archive.files and "camera_frames" not in archive.files
    _assert_clips_equal(load_clip(path), clip)


def test_clip_arrays_are_read_only_and_histories_copied():
    xyz, rot = _history()
    frames = _frames()
    clip = Clip.create(frames, xyz, rot)
    assert not clip.camera_frames.flags.writeable and not clip.ego_history_xyz.flags.writeable
    assert frames.flags.writeable  # the caller's array keeps its flags
    xyz[0, 0] = np.nan
    assert np.isfinite(clip.ego_history_xyz).all()


def test_fixture_inputs_form_a_valid_clip(golden):
    clip = Clip.create(
        golden["input.image_frames"],
        golden["input.ego_history_xyz"][0, 0],
        golden["input.ego_history_rot"][0, 0],
        timestamps=FRAME_TIMESTAMPS,
        camera_names=CAMERA_NAMES,
    )
    np.testing.assert_array_equal(clip.camera_frames, golden["input.image_frames"])
    validate_clip(clip)


def test_counts_are_configurable():
    xyz, rot = _history(8)
    clip = Clip.create(_frames((2, 3, 3, 8, 12)), xyz, rot, num_cameras=2, num_frames=3, num_history=8)
    validate_clip(clip, num_cameras=None, num_frames=None, num_history=None)
    with pytest.raises(ClipError, match="camera_frames: expected 4 cameras, got 2"):
        validate_clip(clip)


# ---------------------------------------------------------------------------------------------
# Synthetic clips
# ---------------------------------------------------------------------------------------------


def test_synthetic_clip_is_valid_and_deterministic():
    clip = synthetic_clip(7, image_size=(20, 30))
    validate_clip(clip)
    assert clip.camera_frames.shape == (4, 4, 3, 20, 30)
    assert clip.camera_frames.std() > 10  # not a blank image
    _assert_clips_equal(synthetic_clip(7, image_size=(20, 30)), clip)
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


# ---------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------

_FRAME = np.zeros((3, 8, 12), np.uint8)
_UNEVEN_CAMERA = [_FRAME] * 3 + [np.zeros((3, 8, 16), np.uint8)]


def _args(**changes):
    xyz, rot = _history()
    args = dict(camera_frames=_frames(), ego_history_xyz=xyz, ego_history_rot=rot,
                timestamps=FRAME_TIMESTAMPS, camera_names=CAMERA_NAMES)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"camera_frames": _frames((3, 4, 3, 8, 12))}, "camera_frames: expected 4 cameras, got 3"),
        ({"camera_frames": _frames((4, 5, 3, 8, 12))}, r"camera_frames\[0\]: expected 4 frames, got 5"),
        ({"camera_frames": [[_FRAME] * 4] * 3 + [[_FRAME] * 3]},
         r"camera_frames\[3\]: expected 4 frames, got 3"),
        ({"camera_frames": _frames((4, 3, 8, 12))}, r"camera_frames: expected a 5-D"),
        ({"camera_frames": [[_FRAME, _FRAME[0], _FRAME, _FRAME]] * 4},
         r"camera_frames\[0\]\[1\]: expected a 3-D"),
        ({"camera_frames": _frames().astype(np.float32)},
         r"camera_frames: expected uint8 pixels, got dtype float32 \(convert .*astype\(np.uint8\)"),
        ({"camera_frames": [[_FRAME.astype(np.int64)] * 4] * 4}, r"camera_frames\[0\]\[0\]: expected uint8"),
        ({"camera_frames": _frames((4, 4, 3, 0, 12))}, r"camera_frames\[0\]: frames are empty"),
        ({"camera_frames": [[np.zeros((3, 8, 0), np.uint8)] * 4] * 4},
         r"camera_frames\[0\]\[0\]: image is empty"),
        ({"camera_frames": _frames((4, 4, 4, 8, 12))}, r"camera_frames: expected 3 \(RGB\) channels"),
        ({"camera_frames": [[_FRAME] * 4, _UNEVEN_CAMERA, [_FRAME] * 4, [_FRAME] * 4]},
         r"camera_frames\[1\]: frames have different sizes"),
        ({"ego_history_xyz": _history()[0][:, :2]},
         r"ego_history_xyz: expected shape \(T, 3\), got \(16, 2\)"),
        ({"ego_history_xyz": _history()[0][None, None]},
         r"ego_history_xyz: expected shape \(T, 3\).*drop the leading batch axes: x\[0, 0\]"),
        ({"ego_history_xyz": _history(15)[0], "ego_history_rot": _history(15)[1]},
         "ego_history_xyz: expected 16 poses, got 15"),
        ({"ego_history_rot": _history()[1][:15]}, r"ego_history_rot: expected shape \(16, 3, 3\)"),
        ({"ego_history_xyz": np.full((16, 3), "a")}, "ego_history_xyz: expected real numbers"),
        ({"ego_history_xyz": _xyz_with_nan(5)},
         r"ego_history_xyz: NaN or infinite values at pose\(s\) \[5\]"),
        ({"ego_history_rot": _rot_with(2, np.full((3, 3), np.inf))},
         r"ego_history_rot: NaN or infinite values at pose\(s\) \[2\]"),
        ({"ego_history_rot": _rot_with(3, 1.01 * np.eye(3))},
         r"ego_history_rot: pose\(s\) \[3\] are not rotations: max \|R R\^T - I\|"),
        ({"ego_history_rot": _rot_with(9, np.eye(3) + np.diag([0.0, 2e-3, 0.0]))},
         r"ego_history_rot: pose\(s\) \[9\] are not rotations"),
        ({"ego_history_rot": _rot_with(7, np.diag([1.0, 1.0, -1.0]))},
         r"ego_history_rot: pose\(s\) \[7\] are not proper rotations: det R = \[-1.0\]"),
        ({"timestamps": (-0.2, -0.1, 0.0)},
         r"timestamps: expected shape \(4,\) \(one per frame\), got \(3,\)"),
        ({"timestamps": (-0.3, -0.1, -0.2, 0.0)}, "timestamps: expected strictly increasing"),
        ({"timestamps": (-0.3, -0.1, -0.1, 0.0)}, "timestamps: expected strictly increasing"),
        ({"timestamps": (-0.3, np.nan, -0.1, 0.0)},
         r"timestamps: NaN or infinite values at frame\(s\) \[1\]"),
        ({"camera_names": CAMERA_NAMES[:3]}, "camera_names: expected 4 names"),
        ({"camera_names": "front_wide_120fov"}, "camera_names: expected a sequence of names"),
        ({"camera_names": ("a", "b", 3, "d")}, "camera_names: expected strings"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_invalid_clip_raises(changes, match):
    with pytest.raises(ClipError, match=match):
        Clip.create(**_args(**changes))


def test_rotation_tolerance_accepts_float_rounding():
    # |R R^T - I| = 4e-4, within ROTATION_TOLERANCE = 1e-3 (the 2e-3 case above gives 4e-3).
    rot = _rot_with(4, np.eye(3) + np.diag([0.0, 2e-4, 0.0]))
    validate_clip(Clip.create(**_args(ego_history_rot=rot)))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"camera_frames": _frames().transpose(0, 1, 3, 4, 2)},
         r"camera_frames\[0\]: expected channels-first .* \(use Clip.create"),
        ({"camera_frames": [_frames()[0]] * 4}, "camera_frames: expected an array or a tuple"),
        ({"ego_history_xyz": _history()[0].tolist()}, "ego_history_xyz: expected a numpy array"),
        ({"timestamps": np.zeros(4, np.int64)}, "timestamps: expected floating-point values"),
    ],
)
def test_validate_clip_checks_directly_built_clips(changes, match):
    with pytest.raises(ClipError, match=match):
        validate_clip(Clip(**_args(**changes)))


# ---------------------------------------------------------------------------------------------
# File errors and atomic saving
# ---------------------------------------------------------------------------------------------


def _write_npz(path, **changes):
    xyz, rot = _history()
    arrays = dict(camera_frames=_frames(), ego_history_xyz=xyz, ego_history_rot=rot)
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"ego_history_rot": None}, r"missing key\(s\) \['ego_history_rot'\]"),
        ({"camera_frames": None}, r"missing key\(s\) \['camera_frames'\]"),
        ({"speed": np.zeros(3)}, r"unknown key\(s\) \['speed'\]"),
        ({"camera_frames_0": _frames()[0]}, "both camera_frames and camera_frames_<c>"),
        ({"camera_frames": None, "camera_frames_0": _frames()[0], "camera_frames_2": _frames()[1]},
         r"missing key\(s\) \['camera_frames_1'\]"),
        ({"camera_names": np.array(CAMERA_NAMES, dtype=object)}, "camera_names: cannot read the array"),
        ({"camera_names": np.arange(4)}, "camera_names: expected a 1-D str array"),
        ({"ego_history_xyz": _xyz_with_nan(0)},
         r"ego_history_xyz: NaN or infinite values at pose\(s\) \[0\]"),
        ({"camera_frames": _frames().astype(np.int16)}, "camera_frames: expected uint8"),
        ({"timestamps": np.array([0.0, 0.1])}, r"timestamps: expected shape \(4,\)"),
    ],
)
def test_load_clip_errors_name_file_and_field(tmp_path, changes, match):
    path = tmp_path / "bad.npz"
    _write_npz(path, **changes)
    with pytest.raises(ClipError, match=re.escape(str(path)) + ": .*" + match):
        load_clip(path)


def test_load_clip_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="clip file not found"):
        load_clip(tmp_path / "absent.npz")
    text = tmp_path / "clip.txt"
    text.write_text("not a zip")
    with pytest.raises(ClipError, match="not an .npz archive"):
        load_clip(text)
    npy = tmp_path / "frames.npy"
    np.save(npy, _frames())
    with pytest.raises(ClipError, match="not an .npz archive"):
        load_clip(npy)


def test_save_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "clip.npz"
    save_clip(path, synthetic_clip())
    save_clip(path, synthetic_clip(1))  # overwriting an existing file
    assert os.listdir(tmp_path) == ["clip.npz"]
    _assert_clips_equal(load_clip(path), synthetic_clip(1))


def test_failed_save_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "clip.npz"
    save_clip(path, synthetic_clip())
    before = path.read_bytes()

    def failing_savez(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        save_clip(path, synthetic_clip(1))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["clip.npz"]


def test_invalid_clip_is_not_saved(tmp_path):
    clip = Clip(**_args(ego_history_xyz=_xyz_with_nan(1)))
    with pytest.raises(ClipError, match="ego_history_xyz: NaN"):
        save_clip(tmp_path / "clip.npz", clip)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Precomputed model inputs
# ---------------------------------------------------------------------------------------------


def _tensors(**changes):
    xyz, rot = _history()
    tensors = {
        "input_ids": np.arange(20, dtype=np.int64)[None],
        "pixel_values": np.random.default_rng(0).normal(size=(48, 8)).astype(np.float32),
        "image_grid_thw": np.array([[1, 4, 6], [1, 4, 6]], np.int64),
        "ego_history_xyz": xyz[None],
        "ego_history_rot": rot[None],
    }
    tensors.update(changes)
    return {k: v for k, v in tensors.items() if v is not None}


def test_model_inputs_round_trip(tmp_path):
    tensors = _tensors(attention_mask=np.ones((1, 20), np.int64))  # extra keys are ignored
    save_file(tensors, tmp_path / "raw.safetensors")
    inputs = load_model_inputs(tmp_path / "raw.safetensors")
    assert isinstance(inputs, ModelInputs)
    assert inputs.ego_history_xyz.shape == (16, 3) and inputs.ego_history_rot.shape == (16, 3, 3)
    for name in ("input_ids", "pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(getattr(inputs, name), tensors[name])
    save_model_inputs(tmp_path / "inputs.safetensors", inputs)
    again = load_model_inputs(tmp_path / "inputs.safetensors")
    for name in ("input_ids", "pixel_values", "image_grid_thw", "ego_history_xyz", "ego_history_rot"):
        np.testing.assert_array_equal(getattr(again, name), getattr(inputs, name))
    assert again.input_ids.dtype == np.int64 and again.pixel_values.dtype == np.float32
    assert sorted(os.listdir(tmp_path)) == ["inputs.safetensors", "raw.safetensors"]


def test_model_inputs_accept_int32_ids(tmp_path):
    save_file(_tensors(input_ids=np.arange(20, dtype=np.int32)[None]), tmp_path / "m.safetensors")
    assert load_model_inputs(tmp_path / "m.safetensors").input_ids.dtype == np.int64


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"pixel_values": None}, r"missing key\(s\) \['pixel_values'\]"),
        ({"input_ids": np.arange(20, dtype=np.float32)[None]}, "input_ids: expected integers"),
        ({"image_grid_thw": np.array([[1, 4, 6], [1, 4, 6]], np.float32)},
         "image_grid_thw: expected integers"),
        ({"pixel_values": np.zeros((48, 8), np.float64)},
         "pixel_values: expected float32, got dtype float64"),
        ({"ego_history_xyz": _history()[0][None].astype(np.float64)}, "ego_history_xyz: expected float32"),
        ({"input_ids": np.arange(20, dtype=np.int64)}, r"input_ids: expected shape \(1, L\)"),
        ({"pixel_values": np.zeros((48,), np.float32)}, r"pixel_values: expected a non-empty 2-D"),
        ({"image_grid_thw": np.array([[1, 4], [1, 4]], np.int64)},
         r"image_grid_thw: expected shape \(N, 3\)"),
        ({"image_grid_thw": np.array([[1, 8, 6], [0, 4, 6]], np.int64)}, "image_grid_thw: expected positive"),
        ({"ego_history_xyz": _history()[0]}, r"ego_history_xyz: expected shape \(1, T, 3\)"),
        ({"ego_history_xyz": _history(15)[0][None], "ego_history_rot": _history(15)[1][None]},
         "ego_history_xyz: expected 16 poses, got 15"),
        ({"ego_history_rot": _history()[1]}, r"ego_history_rot: expected shape \(1, 16, 3, 3\)"),
        ({"pixel_values": np.full((48, 8), np.nan, np.float32)},
         "pixel_values: NaN or infinite values in 48 row"),
        ({"ego_history_xyz": _xyz_with_nan(4)[None]},
         r"ego_history_xyz: NaN or infinite values at pose\(s\) \[4\]"),
        ({"ego_history_rot": _rot_with(1, -np.eye(3))[None]},
         r"ego_history_rot: pose\(s\) \[1\] are not proper"),
        ({"image_grid_thw": np.array([[1, 4, 6], [1, 4, 4]], np.int64)},
         r"pixel_values: 48 rows, but image_grid_thw describes sum\(t \* h \* w\) = 40 patches"),
    ],
)
def test_load_model_inputs_errors(tmp_path, changes, match):
    path = tmp_path / "bad.safetensors"
    save_file(_tensors(**changes), path)
    with pytest.raises(ClipError, match=re.escape(str(path)) + ": " + match):
        load_model_inputs(path)


def test_model_inputs_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model inputs file not found"):
        load_model_inputs(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    with pytest.raises(ClipError, match="not a readable .safetensors file"):
        load_model_inputs(junk)
    good = ModelInputs(**{k: (v[0] if k.startswith("ego") else v) for k, v in _tensors().items()})
    bad = dataclasses.replace(good, pixel_values=np.zeros((47, 8), np.float32))
    with pytest.raises(ClipError, match="pixel_values: 47 rows"):
        save_model_inputs(tmp_path / "out.safetensors", bad)
    assert sorted(os.listdir(tmp_path)) == ["junk.safetensors"]
