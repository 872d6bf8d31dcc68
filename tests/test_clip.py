"""Clips and clip files: construction checks, canonical camera order, file round trips and errors."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from alpamayo_jax.processing.clip import (
    CAMERA_NAMES,
    FRAME_TIMESTAMPS,
    MAX_SPEED,
    Clip,
    ClipError,
    validate_clip,
)
from alpamayo_jax.processing.clip_file import load_clip, save_clip
from alpamayo_jax.processing.image import MAX_ASPECT_RATIO
from alpamayo_jax.processing.synthetic import arc_future, arc_history, synthetic_clip


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
    assert a.has_ground_truth == b.has_ground_truth
    assert a.cot == b.cot
    if a.has_ground_truth:
        np.testing.assert_array_equal(a.ego_future_xyz, b.ego_future_xyz)
        np.testing.assert_array_equal(a.ego_future_rot, b.ego_future_rot)


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
    assert not loaded.has_ground_truth and loaded.ego_future_xyz is None and loaded.ego_future_rot is None
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


def test_frames_given_one_by_one_are_one_aligned_array():
    """Frames given one by one (a server's decoded images) are copied once, into one array that
    preprocessing reads in place; (H, W, 3) frames keep their layout rather than being transposed."""
    frames = _frames()
    xyz, rot = _history()
    decoded = [[np.ascontiguousarray(f.transpose(1, 2, 0)) for f in camera] for camera in frames]  # (H, W, 3)
    for given, channels_last in (([list(camera) for camera in frames], False), (decoded, True)):
        held = Clip.create(given, xyz, rot).camera_frames
        np.testing.assert_array_equal(held, frames)
        assert held.ctypes.data % 64 == 0 and not np.shares_memory(held, given[0][0])
        memory = held.transpose(0, 1, 3, 4, 2) if channels_last else held
        assert memory.flags.c_contiguous
    mixed = [list(camera) for camera in frames]
    mixed[1][2] = np.ascontiguousarray(mixed[1][2].transpose(1, 2, 0))
    held = Clip.create(mixed, xyz, rot).camera_frames
    assert held.flags.c_contiguous and held.ctypes.data % 64 == 0
    np.testing.assert_array_equal(held, frames)


def test_cameras_of_different_sizes_round_trip(tmp_path):
    xyz, rot = _history()
    cameras = [_frames((4, 3, 8, 12), seed=c) for c in range(3)] + [_frames((4, 3, 16, 24), seed=3)]
    clip = Clip.create(cameras, xyz, rot)
    assert isinstance(clip.camera_frames, tuple)
    assert [c.shape for c in clip.camera_frames] == [(4, 3, 8, 12)] * 3 + [(4, 3, 16, 24)]
    assert all(c.flags.c_contiguous and c.ctypes.data % 64 == 0 for c in clip.camera_frames)
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
# Validation errors
# ---------------------------------------------------------------------------------------------

_FRAME = np.zeros((3, 8, 12), np.uint8)
_UNEVEN_CAMERA = [_FRAME] * 3 + [np.zeros((3, 8, 16), np.uint8)]


def _args(**changes):
    xyz, rot = _history()
    args = {"camera_frames": _frames(), "ego_history_xyz": xyz, "ego_history_rot": rot,
                "timestamps": FRAME_TIMESTAMPS, "camera_names": CAMERA_NAMES}
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


def _assert_names_once(error, path):
    assert str(error.value).count(str(path)) == 1, str(error.value)


def _write_npz(path, **changes):
    xyz, rot = _history()
    arrays = {"camera_frames": _frames(), "ego_history_xyz": xyz, "ego_history_rot": rot}
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
        # Arrays read while building the clip: their errors name the file once, not twice.
        ({"timestamps": np.array(FRAME_TIMESTAMPS, dtype=object)}, "timestamps: cannot read the array"),
        ({"ego_history_rot": np.empty((16, 3, 3), dtype=object)}, "ego_history_rot: cannot read the array"),
        ({"camera_names": np.arange(4)}, "camera_names: expected a 1-D str array"),
        ({"ego_history_xyz": _xyz_with_nan(0)},
         r"ego_history_xyz: NaN or infinite values at pose\(s\) \[0\]"),
        ({"camera_frames": _frames().astype(np.int16)}, "camera_frames: expected uint8"),
        ({"camera_names": np.array(["front_wide_120fov", "rear_left_70fov", "a", "b"])},
         r"camera_names: unknown camera name\(s\) \['rear_left_70fov', 'a', 'b'\]"),
        ({"timestamps": np.array([-0.3, -0.2, -0.1, 0.08])}, "timestamps: frame 3 is at 0.08 s, expected 0 s"),
        ({"ego_history_xyz": _history()[0] + [0.0, 0.0, 0.5]},
         r"ego_history_xyz: the last pose \(t0\) must be the origin"),
        ({"timestamps": np.array([0.0, 0.1])}, r"timestamps: expected shape \(4,\)"),
    ],
)
def test_load_clip_errors_name_file_and_field(tmp_path, changes, match):
    path = tmp_path / "bad.npz"
    _write_npz(path, **changes)
    with pytest.raises(ClipError, match=re.escape(str(path)) + ": .*" + match) as error:
        load_clip(path)
    _assert_names_once(error, path)


def test_load_clip_rejects_missing_and_foreign_files(tmp_path):
    absent = tmp_path / "absent.npz"
    with pytest.raises(FileNotFoundError, match="clip file not found") as error:
        load_clip(absent)
    _assert_names_once(error, absent)
    with pytest.raises(IsADirectoryError, match="a directory, not a clip .npz file") as error:
        load_clip(tmp_path)
    _assert_names_once(error, tmp_path)
    text = tmp_path / "clip.txt"
    text.write_text("not a zip")
    with pytest.raises(ClipError, match="not an .npz archive") as error:
        load_clip(text)
    _assert_names_once(error, text)
    npy = tmp_path / "frames.npy"
    np.save(npy, _frames())
    with pytest.raises(ClipError, match="not an .npz archive") as error:
        load_clip(npy)
    _assert_names_once(error, npy)


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
# Camera names: known, distinct, and they put the cameras in the canonical order
# ---------------------------------------------------------------------------------------------

_PERMUTATION = (2, 0, 3, 1)  # file camera i is canonical camera _PERMUTATION[i]


def test_unknown_camera_names_are_named_with_the_known_ones():
    names = ("cross_left_120fov", "front_wide_120fov", "front_wide", "front_tele_30fov")
    with pytest.raises(ClipError) as error:
        Clip.create(**_args(camera_names=names))
    message = str(error.value)
    assert message.startswith("camera_names: unknown camera name(s) ['front_wide']")
    assert all(name in message for name in CAMERA_NAMES)


def test_duplicate_camera_names_are_named():
    names = ("cross_left_120fov", "front_tele_30fov", "cross_right_120fov", "front_tele_30fov")
    with pytest.raises(ClipError, match=r"camera_names: duplicate name\(s\) \['front_tele_30fov'\]"):
        Clip.create(**_args(camera_names=names))


def test_permuted_camera_names_reorder_the_frames():
    canonical = Clip.create(**_args())
    names = tuple(CAMERA_NAMES[c] for c in _PERMUTATION)
    frames = canonical.camera_frames[list(_PERMUTATION)]  # camera i of the input is names[i]
    clip = Clip.create(**_args(camera_frames=frames, camera_names=names))
    assert clip.camera_names == CAMERA_NAMES
    np.testing.assert_array_equal(clip.camera_frames, canonical.camera_frames)
    validate_clip(clip)


def test_saved_clip_with_permuted_names_loads_in_canonical_order(tmp_path):
    canonical = synthetic_clip(4)
    path = tmp_path / "permuted.npz"
    np.savez(path, camera_frames=canonical.camera_frames[list(_PERMUTATION)],
             camera_names=np.array([CAMERA_NAMES[c] for c in _PERMUTATION]),
             ego_history_xyz=canonical.ego_history_xyz, ego_history_rot=canonical.ego_history_rot,
             timestamps=canonical.timestamps)
    loaded = load_clip(path)
    _assert_clips_equal(loaded, canonical)
    save_clip(tmp_path / "again.npz", loaded)  # stored in the canonical order from now on
    with np.load(tmp_path / "again.npz") as archive:
        assert archive["camera_names"].tolist() == list(CAMERA_NAMES)


def test_permuted_cameras_of_different_sizes_are_reordered(tmp_path):
    xyz, rot = _history()
    cameras = [_frames((4, 3, 8 * (c + 1), 12), seed=c) for c in range(4)]  # canonical camera c
    path = tmp_path / "mixed.npz"
    np.savez(path, **{f"camera_frames_{i}": cameras[c] for i, c in enumerate(_PERMUTATION)},
             camera_names=np.array([CAMERA_NAMES[c] for c in _PERMUTATION]), ego_history_xyz=xyz,
             ego_history_rot=rot)
    loaded = load_clip(path)
    assert loaded.camera_names == CAMERA_NAMES
    assert isinstance(loaded.camera_frames, tuple)
    for got, expected in zip(loaded.camera_frames, cameras, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_a_subset_of_cameras_is_ordered_among_itself():
    frames = _frames((2, 4, 3, 8, 12))
    clip = Clip.create(**_args(camera_frames=frames, camera_names=("front_tele_30fov", "cross_left_120fov")),
                       num_cameras=2)
    assert clip.camera_names == ("cross_left_120fov", "front_tele_30fov")
    np.testing.assert_array_equal(clip.camera_frames, frames[::-1])


def test_directly_built_clip_must_be_in_canonical_order():
    clip = Clip(**_args(camera_names=tuple(CAMERA_NAMES[c] for c in _PERMUTATION)))
    with pytest.raises(ClipError, match="camera_names: .* are not in the canonical order .*use Clip.create"):
        validate_clip(clip)


# ---------------------------------------------------------------------------------------------
# Timestamps: the frame times relative to t0
# ---------------------------------------------------------------------------------------------


def test_timestamps_within_a_frame_period_are_accepted():
    # Frames that are the latest at or before each time, from 20 Hz cameras: up to 0.05 s early.
    clip = Clip.create(**_args(timestamps=(-0.34, -0.25, -0.12, -0.04)))
    np.testing.assert_array_equal(clip.timestamps, [-0.34, -0.25, -0.12, -0.04])


@pytest.mark.parametrize(
    "timestamps, match",
    [
        ((-0.3, -0.2, -0.17, 0.0), r"timestamps: frame 2 is at -0.17 s, expected -0.1 s within 0.05 s"),
        ((-0.4, -0.3, -0.2, -0.1), r"timestamps: frame 0 is at -0.4 s, expected -0.3 s within 0.05 s"),
        ((0.0, 0.1, 0.2, 0.3), r"timestamps: frame 0 is at 0 s, expected -0.3 s"),  # relative to the first
        ((1.7e9, 1.7e9 + 0.1, 1.7e9 + 0.2, 1.7e9 + 0.3), "frame 0 is at 1.7e\\+09 s.*relative to t0"),
        ((-3.0, -2.0, -1.0, 0.0), r"timestamps: frame 0 is at -3 s, expected -0.3 s"),  # not 10 Hz
    ],
)
def test_timestamps_must_be_the_frame_times(timestamps, match):
    with pytest.raises(ClipError, match=match):
        Clip.create(**_args(timestamps=timestamps))


def test_timestamps_follow_the_frame_count():
    xyz, rot = _history()
    clip = Clip.create(_frames((4, 2, 3, 8, 12)), xyz, rot, timestamps=(-0.1, 0.0), num_frames=2)
    assert clip.timestamps.tolist() == [-0.1, 0.0]
    with pytest.raises(ClipError, match="frame 0 is at -0.3 s, expected -0.1 s"):
        Clip.create(_frames((4, 2, 3, 8, 12)), xyz, rot, timestamps=(-0.3, -0.2), num_frames=2)


# ---------------------------------------------------------------------------------------------
# History: physically impossible histories fail, unusual ones pass
# ---------------------------------------------------------------------------------------------


def _jump_history(metres):
    xyz, rot = _history()
    xyz = xyz.copy()
    xyz[:8, 0] -= metres  # poses 0..7 lie `metres` further back: a jump between poses 7 and 8
    return xyz, rot


def test_history_must_end_at_the_origin():
    xyz, rot = _history()
    with pytest.raises(ClipError) as error:
        Clip.create(**_args(ego_history_xyz=xyz + [2.0, -1.0, 0.0], ego_history_rot=rot))
    message = str(error.value)
    assert message.startswith("ego_history_xyz: the last pose (t0) must be the origin of the t0 ego frame")
    assert "[2.0, -1.0, 0.0]" in message and "p_local = R_t0^-1 (p - p_t0)" in message
    # Within 1 mm is rounding, not an error.
    Clip.create(**_args(ego_history_xyz=xyz + [5e-4, 0.0, 0.0], ego_history_rot=rot))


def test_last_rotation_may_carry_a_small_pitch():
    xyz, rot = _history()
    pitch = np.deg2rad(0.6)  # as in the reference fixture
    rot = rot.copy()
    rot[-1] = [[np.cos(pitch), 0, -np.sin(pitch)], [0, 1, 0], [np.sin(pitch), 0, np.cos(pitch)]]
    validate_clip(Clip.create(**_args(ego_history_xyz=xyz, ego_history_rot=rot)))


@pytest.mark.parametrize(
    "history, match",
    [
        (_jump_history(100.0), (r"ego_history_xyz: 1 of 15 steps faster than MAX_SPEED = 100 m/s \(360 km/h\), "
                                r"first poses 7 -> 8: 100.5 m in 0.1 s = 1005 m/s")),
        (arc_history(300.0, 0.0), (r"ego_history_xyz: 15 of 15 steps faster than MAX_SPEED = 100 m/s "
                                   r"\(360 km/h\), first poses 0 -> 1: 30 m in 0.1 s = 300 m/s")),
    ],
    ids=["100 m jump", "steady 300 m/s"],
)
def test_impossible_speeds_are_errors(history, match):
    with pytest.raises(ClipError, match=match):
        Clip.create(**_args(ego_history_xyz=history[0], ego_history_rot=history[1]))


@pytest.mark.parametrize(
    "history",
    [arc_history(80.0, 0.0), arc_history(-4.0, 0.02), arc_history(0.0, 0.0), arc_history(0.99 * MAX_SPEED, 0.0)],
    ids=["80 m/s", "reversing", "standing still", "just below the maximum"],
)
def test_possible_histories_pass(history):
    clip = Clip.create(**_args(ego_history_xyz=history[0], ego_history_rot=history[1]))
    validate_clip(clip)


def test_reversing_history_lies_ahead_of_the_car():
    xyz, _ = arc_history(-4.0, 0.02)
    assert (xyz[:-1, 0] > 0).all()  # reversing into the origin: the past is in front (+x)


# ---------------------------------------------------------------------------------------------
# Pixel dtypes: hints that fit the dtype
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, hint",
    [
        (np.float32, r"convert float images in \[0, 1\] with np.round\(x \* 255\).astype\(np.uint8\)"),
        (np.int16, (r"pixel values must be 0..255: only if these are 8-bit values, convert them with "
                    r"np.clip\(x, 0, 255\).astype\(np.uint8\)")),
        (np.uint16, r"pixel values must be 0..255: only if these are 8-bit values"),
        (np.int64, r"pixel values must be 0..255: only if these are 8-bit values"),
        (np.bool_, "a boolean array is a mask, not an image"),
    ],
)
def test_pixel_dtype_hints_fit_the_dtype(dtype, hint):
    frames = _frames().astype(dtype)
    with pytest.raises(ClipError, match=rf"^camera_frames: expected uint8 pixels, got dtype {np.dtype(dtype)} "
                                        rf"\({hint}"):
        Clip.create(**_args(camera_frames=frames))
    nested = [list(camera) for camera in frames]  # the per-frame path gives the same hint
    with pytest.raises(ClipError, match=rf"^camera_frames\[0\]\[0\]: expected uint8 pixels, got dtype "
                                        rf"{np.dtype(dtype)} \({hint}"):
        Clip.create(**_args(camera_frames=nested))
    with pytest.raises(ClipError, match=rf"^camera_frames\[0\]: expected uint8 pixels, got dtype "
                                        rf"{np.dtype(dtype)} \({hint}"):
        validate_clip(Clip(**_args(camera_frames=frames)))


def test_float_hint_is_not_given_for_integers():
    with pytest.raises(ClipError) as error:
        Clip.create(**_args(camera_frames=_frames().astype(np.int16)))
    assert "float" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Image aspect ratio: checked with the clip, not when the model preprocesses
# ---------------------------------------------------------------------------------------------


def test_extreme_aspect_ratio_fails_at_load_naming_file_and_camera(tmp_path):
    xyz, rot = _history()
    long_side = 2 * MAX_ASPECT_RATIO + 2  # 2 x 402 pixels: ratio 201
    cameras = [_frames((4, 3, 8, 12), seed=c) for c in range(3)] + [_frames((4, 3, 2, long_side))]
    path = tmp_path / "strip.npz"
    np.savez(path, **{f"camera_frames_{c}": camera for c, camera in enumerate(cameras)},
             camera_names=np.array(CAMERA_NAMES), ego_history_xyz=xyz, ego_history_rot=rot)
    with pytest.raises(ClipError) as error:
        load_clip(path)
    assert str(error.value) == (f"{path}: camera_frames[3] (front_tele_30fov): aspect ratio of a 2x{long_side} "
                                f"image exceeds {MAX_ASPECT_RATIO} (201.0)")


def test_aspect_ratio_at_the_limit_is_accepted():
    xyz, rot = _history()
    cameras = [_frames((4, 3, 8, 12))] * 3 + [_frames((4, 3, 1, MAX_ASPECT_RATIO))]
    clip = Clip.create(cameras, xyz, rot)
    assert clip.camera_frames[3].shape == (4, 3, 1, MAX_ASPECT_RATIO)
    with pytest.raises(ClipError, match=r"^camera_frames\[1\]: aspect ratio of a 201x1 image exceeds 200"):
        Clip.create([_frames((4, 3, 8, 12)), _frames((4, 3, 201, 1))] + [_frames((4, 3, 8, 12))] * 2, xyz, rot)


# ---------------------------------------------------------------------------------------------
# Ground truth: the future poses, optional, checked like the history
# ---------------------------------------------------------------------------------------------


def _future(n=64):
    return arc_future(5.0, 0.02, num_future=n)  # continues _history()


def _future_args(xyz=None, rot=None, **changes):
    future_xyz, future_rot = _future()
    return _args(ego_future_xyz=future_xyz if xyz is None else xyz,
                 ego_future_rot=future_rot if rot is None else rot, **changes)


def _future_rot_with(pose, matrix):
    rot = _future()[1].copy()
    rot[pose] = matrix
    return rot


def _future_xyz_with_nan(pose):
    xyz = _future()[0].copy()
    xyz[pose, 0] = np.nan
    return xyz


def _future_jump(metres):
    xyz = _future()[0].copy()
    xyz[32:, 0] += metres  # poses 32.. lie `metres` further ahead: a jump between poses 31 and 32
    return xyz


def test_ground_truth_round_trip(tmp_path):
    clip = synthetic_clip(3, with_future=True)
    assert clip.has_ground_truth
    path = tmp_path / "clip.npz"
    save_clip(path, clip)
    with np.load(path) as archive:
        assert {"ego_future_xyz", "ego_future_rot"} <= set(archive.files)
        assert archive["ego_future_xyz"].shape == (64, 3) and archive["ego_future_rot"].shape == (64, 3, 3)
    loaded = load_clip(path)
    assert loaded.has_ground_truth
    assert loaded.ego_future_xyz.dtype == np.float32 and loaded.ego_future_rot.dtype == np.float32
    _assert_clips_equal(loaded, clip)


def test_clip_without_ground_truth_saves_no_future_keys(tmp_path):
    clip = synthetic_clip(3)
    assert not clip.has_ground_truth and clip.ego_future_xyz is None and clip.ego_future_rot is None
    save_clip(tmp_path / "clip.npz", clip)
    with np.load(tmp_path / "clip.npz") as archive:
        assert not any(key.startswith("ego_future") for key in archive.files)
    assert not load_clip(tmp_path / "clip.npz").has_ground_truth


def test_future_is_converted_copied_and_read_only():
    xyz, rot = (array.astype(np.float64) for array in _future())
    clip = Clip.create(**_future_args(xyz=xyz, rot=rot.tolist()))
    assert clip.ego_future_xyz.dtype == np.float32 and clip.ego_future_rot.dtype == np.float32
    assert not clip.ego_future_xyz.flags.writeable and not clip.ego_future_rot.flags.writeable
    xyz[0, 0] = np.nan
    assert np.isfinite(clip.ego_future_xyz).all()
    np.testing.assert_array_equal(clip.ego_future_rot, _future()[1])


def test_future_survives_camera_reordering():
    names = tuple(CAMERA_NAMES[c] for c in _PERMUTATION)
    clip = Clip.create(**_future_args(camera_names=names))
    assert clip.camera_names == CAMERA_NAMES and clip.has_ground_truth
    np.testing.assert_array_equal(clip.ego_future_xyz, _future()[0])


def test_future_count_is_configurable():
    xyz, rot = _future(10)
    clip = Clip.create(**_future_args(xyz=xyz, rot=rot), num_future=10)
    validate_clip(clip, num_future=None)
    with pytest.raises(ClipError, match="^ego_future_xyz: expected 64 poses, got 10$"):
        validate_clip(clip)
    validate_clip(synthetic_clip(), num_future=10)  # no ground truth: nothing to count


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"xyz": _future()[0][:, :2]}, r"^ego_future_xyz: expected shape \(N, 3\), got \(64, 2\)"),
        ({"xyz": _future()[0][None]},
         r"^ego_future_xyz: expected shape \(N, 3\).*drop the leading batch axes"),
        ({"rot": _future()[1][:63]},
         r"^ego_future_rot: expected shape \(64, 3, 3\) \(one rotation per position\)"),
        ({"xyz": _future(63)[0], "rot": _future(63)[1]}, "^ego_future_xyz: expected 64 poses, got 63$"),
        ({"xyz": _future(65)[0], "rot": _future(65)[1]}, "^ego_future_xyz: expected 64 poses, got 65$"),
        ({"xyz": np.full((64, 3), "a")}, "^ego_future_xyz: expected real numbers"),
        ({"xyz": _future_xyz_with_nan(40)}, r"^ego_future_xyz: NaN or infinite values at pose\(s\) \[40\]$"),
        ({"rot": _future_rot_with(5, np.full((3, 3), np.nan))},
         r"^ego_future_rot: NaN or infinite values at pose\(s\) \[5\]$"),
        ({"rot": _future_rot_with(12, 1.01 * np.eye(3))},
         r"^ego_future_rot: pose\(s\) \[12\] are not rotations: max \|R R\^T - I\|"),
        ({"rot": _future_rot_with(63, np.diag([1.0, -1.0, 1.0]))},
         r"^ego_future_rot: pose\(s\) \[63\] are not proper rotations: det R = \[-1.0\]"),
        ({"xyz": _future_jump(100.0)},
         (r"^ego_future_xyz: 1 of 64 steps faster than MAX_SPEED = 100 m/s \(360 km/h\), "
          r"first poses 31 -> 32: 100.5 m in 0.1 s = 1005 m/s")),
        ({"xyz": _future()[0] + [100.0, 0.0, 0.0]},
         (r"^ego_future_xyz: 1 of 64 steps faster than MAX_SPEED = 100 m/s \(360 km/h\), "
          r"first poses t0 -> 0: 100.5 m in 0.1 s = 1005 m/s "
          r".*pose 0 at t0 \+ 0.1 s, t0 the last history pose")),
        ({"xyz": arc_future(300.0, 0.0)[0]},
         r"^ego_future_xyz: 64 of 64 steps faster than MAX_SPEED .* first poses t0 -> 0: 30 m in 0.1 s"),
    ],
    ids=["xyz shape", "batch axis", "rot shape", "63 poses", "65 poses", "not numbers", "NaN position",
         "NaN rotation", "scaled rotation", "reflection", "100 m jump", "jump from the origin",
         "steady 300 m/s"],
)
def test_invalid_future_raises(changes, match):
    with pytest.raises(ClipError, match=match):
        Clip.create(**_future_args(**changes))


@pytest.mark.parametrize(
    "given, missing", [("ego_future_xyz", "ego_future_rot"), ("ego_future_rot", "ego_future_xyz")]
)
def test_future_is_both_arrays_or_neither(given, missing):
    future = dict(zip(("ego_future_xyz", "ego_future_rot"), _future(), strict=True))
    match = rf"^{missing}: missing while {given} is given; the ground-truth future is both"
    with pytest.raises(ClipError, match=match):
        Clip.create(**_args(**{given: future[given]}))
    with pytest.raises(ClipError, match=match):
        validate_clip(Clip(**_args(**{given: future[given]})))


def test_validate_clip_checks_directly_built_futures():
    with pytest.raises(ClipError, match="^ego_future_xyz: expected a numpy array"):
        validate_clip(Clip(**_future_args(xyz=_future()[0].tolist())))
    with pytest.raises(ClipError, match="^ego_future_rot: expected floating-point values, got dtype int64"):
        validate_clip(Clip(**_future_args(rot=np.zeros((64, 3, 3), np.int64))))
    validate_clip(Clip(**_future_args(timestamps=np.array(FRAME_TIMESTAMPS))))


def test_first_future_step_starts_at_the_last_history_pose():
    # 9.9 m from t0 to the first future pose is 99 m/s; 10.1 m is over MAX_SPEED = 100 m/s.
    xyz = np.zeros((64, 3), np.float32)
    rot = np.broadcast_to(np.eye(3, dtype=np.float32), (64, 3, 3))
    Clip.create(**_future_args(xyz=xyz + [9.9, 0.0, 0.0], rot=rot))  # then standing still
    with pytest.raises(ClipError, match="first poses t0 -> 0: 10.1 m in 0.1 s = 101 m/s"):
        Clip.create(**_future_args(xyz=xyz + [10.1, 0.0, 0.0], rot=rot))


@pytest.mark.parametrize(
    "future",
    [arc_future(80.0, 0.0), arc_future(-4.0, 0.02), arc_future(0.0, 0.0), arc_future(0.99 * MAX_SPEED, 0.0)],
    ids=["80 m/s", "reversing", "standing still", "just below the maximum"],
)
def test_possible_futures_pass(future):
    validate_clip(Clip.create(**_future_args(xyz=future[0], rot=future[1])))


def _write_future_npz(path, **changes):
    xyz, rot = _future()
    _write_npz(path, **{"ego_future_xyz": xyz, "ego_future_rot": rot, **changes})


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"ego_future_rot": None},
         (r"missing key\(s\) \['ego_future_rot'\]: ego_future_xyz is given, and the ground-truth future "
          r"is both ego_future_xyz and ego_future_rot or neither")),
        ({"ego_future_xyz": None}, r"missing key\(s\) \['ego_future_xyz'\]: ego_future_rot is given"),
        ({"ego_future_xyz": _future(63)[0], "ego_future_rot": _future(63)[1]},
         "ego_future_xyz: expected 64 poses, got 63"),
        ({"ego_future_xyz": _future()[0][:, :2]}, r"ego_future_xyz: expected shape \(N, 3\)"),
        ({"ego_future_xyz": _future_xyz_with_nan(7)},
         r"ego_future_xyz: NaN or infinite values at pose\(s\) \[7\]"),
        ({"ego_future_rot": _future_rot_with(9, 2 * np.eye(3))},
         r"ego_future_rot: pose\(s\) \[9\] are not rotations"),
        ({"ego_future_xyz": _future_jump(100.0)}, "ego_future_xyz: 1 of 64 steps .* first poses 31 -> 32"),
        ({"ego_future_xyz": _future()[0] + [100.0, 0.0, 0.0]},
         "ego_future_xyz: 1 of 64 steps .* first poses t0 -> 0"),
        ({"ego_future_rot": np.empty((64, 3, 3), dtype=object)}, "ego_future_rot: cannot read the array"),
    ],
    ids=["only xyz", "only rot", "63 poses", "xyz shape", "NaN position", "not a rotation", "100 m jump",
         "jump from the origin", "object array"],
)
def test_load_clip_future_errors_name_file_and_field(tmp_path, changes, match):
    path = tmp_path / "bad.npz"
    _write_future_npz(path, **changes)
    with pytest.raises(ClipError, match=re.escape(str(path)) + ": " + match) as error:
        load_clip(path)
    _assert_names_once(error, path)


def test_load_clip_future_count_is_configurable(tmp_path):
    path = tmp_path / "short.npz"
    xyz, rot = _future(20)
    _write_future_npz(path, ego_future_xyz=xyz, ego_future_rot=rot)
    assert load_clip(path, num_future=20).ego_future_xyz.shape == (20, 3)
    assert load_clip(path, num_future=None).has_ground_truth
    with pytest.raises(ClipError, match="ego_future_xyz: expected 64 poses, got 20"):
        load_clip(path)


def test_invalid_future_is_not_saved(tmp_path):
    clip = Clip(**_future_args(xyz=_future_jump(100.0)))
    with pytest.raises(ClipError, match="ego_future_xyz: 1 of 64 steps"):
        save_clip(tmp_path / "clip.npz", clip)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Chain-of-Causation text
# ---------------------------------------------------------------------------------------------

COT = "Slow down: a vehicle ahead is braking. Keep the lane — 30 km/h."


def test_cot_round_trip_and_older_files(tmp_path):
    """`cot` is stored as a 0-d str array (no pickle) and read back as a str; files without the key
    (all files written before it existed) load with cot None."""
    clip = synthetic_clip(3, with_future=True)
    with_cot = Clip.create(clip.camera_frames, clip.ego_history_xyz, clip.ego_history_rot,
                           ego_future_xyz=clip.ego_future_xyz, ego_future_rot=clip.ego_future_rot, cot=COT)
    save_clip(tmp_path / "cot.npz", with_cot)
    with np.load(tmp_path / "cot.npz", allow_pickle=False) as archive:
        assert archive["cot"].dtype.kind == "U" and archive["cot"].shape == ()
    loaded = load_clip(tmp_path / "cot.npz")
    assert loaded.cot == COT and isinstance(loaded.cot, str)
    _assert_clips_equal(loaded, with_cot)
    save_clip(tmp_path / "plain.npz", clip)
    with np.load(tmp_path / "plain.npz") as archive:
        assert "cot" not in archive.files
    assert load_clip(tmp_path / "plain.npz").cot is None


@pytest.mark.parametrize("cot, match", [
    (3, "cot: expected the Chain-of-Causation text as a str, got int"),
    (b"slow down", "got bytes"),
    ("   ", "empty Chain-of-Causation text"),
    ("Stop.<|cot_end|><|traj_future_start|>", re.escape("special-token markup ['<|cot_end|>', '<|traj_future_start|>']")),
    ("done<|im_end|>", re.escape("['<|im_end|>']")),
])
def test_invalid_cot_raises(cot, match):
    with pytest.raises(ClipError, match=match):
        Clip.create(_frames(), *_history(), cot=cot)


def test_cot_in_a_file_must_be_a_string(tmp_path):
    clip = synthetic_clip(0)
    np.savez(tmp_path / "bad.npz", camera_frames=clip.camera_frames, ego_history_xyz=clip.ego_history_xyz,
             ego_history_rot=clip.ego_history_rot, cot=np.asarray(["a", "b"]))
    with pytest.raises(ClipError, match="bad.npz: cot: expected a 0-d str array"):
        load_clip(tmp_path / "bad.npz")
    np.savez(tmp_path / "markup.npz", camera_frames=clip.camera_frames, ego_history_xyz=clip.ego_history_xyz,
             ego_history_rot=clip.ego_history_rot, cot=np.asarray("go <|cot_end|>"))
    with pytest.raises(ClipError, match=r"markup.npz: cot: contains special-token markup"):
        load_clip(tmp_path / "markup.npz")
