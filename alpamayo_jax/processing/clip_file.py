"""Clip files (numpy only): `save_clip` / `load_clip` and the `.npz` format of a `Clip`.

A clip file is an `.npz` archive (read with `allow_pickle=False`; compressed or not) of these keys:

  key                 dtype       shape                               notes
  camera_frames       uint8       (C, F, 3, H, W) or (C, F, H, W, 3)  all cameras the same size
  camera_frames_<c>   uint8       (F, 3, H_c, W_c) or (F, H_c, W_c, 3) instead of camera_frames, one
                                                                      per camera c = 0..C-1, when
                                                                      camera sizes differ
  ego_history_xyz     float32     (T, 3)                              metres, t0 ego frame, last
                                                                      position the origin
  ego_history_rot     float32     (T, 3, 3)                           rotation matrices, t0 ego frame
  timestamps          float64     (F,)                                optional; frame times, seconds
                                                                      relative to t0, oldest first
                                                                      (-0.3, -0.2, -0.1, 0 within
                                                                      0.05 s)
  camera_names        str (<U..)  (C,)                                optional; names of the cameras
                                                                      in file order, any order
  ego_future_xyz      float32     (N, 3)                              optional, with ego_future_rot;
                                                                      ground truth: metres, t0 ego
                                                                      frame, t0 + 0.1 ... t0 + 6.4 s
  ego_future_rot      float32     (N, 3, 3)                           optional, with ego_future_xyz;
                                                                      ground truth: rotation
                                                                      matrices, t0 ego frame
  cot                 str (<U..)  ()                                  optional; Chain-of-Causation
                                                                      text for training (plain
                                                                      text, `processing.clip`)

Other keys are rejected. An image axis of size 3 in front of H means channels-first, even when the
last axis is 3 too (the rule of `processing.image.to_channels_first`). Without `camera_names` the
cameras must be in the canonical order (`processing.clip.CAMERA_NAMES`); with them, `load_clip`
puts them in it. The ground-truth future is both ego_future_* keys or neither (N = 64 unless
`load_clip` is told otherwise). What makes the contents valid (shapes, times, history, future) is
in `processing.clip`.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np

from alpamayo_jax.io.atomic import write_atomically
from alpamayo_jax.processing.clip import Clip, ClipError, validate_clip

_REQUIRED_KEYS = ("ego_history_xyz", "ego_history_rot")
_FUTURE_KEYS = ("ego_future_xyz", "ego_future_rot")  # the ground truth: both or neither
_OPTIONAL_KEYS = ("timestamps", "camera_names", *_FUTURE_KEYS, "cot")
_PER_CAMERA_KEY = re.compile(r"camera_frames_(0|[1-9][0-9]*)")


def save_clip(path: str | os.PathLike, clip: Clip) -> None:
    """Writes `clip` to an uncompressed `.npz` file (format in the module docstring), atomically.

    The clip is checked first (any counts), so that an invalid clip is never written."""
    validate_clip(clip, num_cameras=None, num_frames=None, num_history=None, num_future=None)
    if isinstance(clip.camera_frames, np.ndarray):
        arrays = {"camera_frames": clip.camera_frames}
    else:
        arrays = {f"camera_frames_{c}": camera for c, camera in enumerate(clip.camera_frames)}
    arrays["ego_history_xyz"] = clip.ego_history_xyz
    arrays["ego_history_rot"] = clip.ego_history_rot
    if clip.timestamps is not None:
        arrays["timestamps"] = clip.timestamps
    if clip.camera_names is not None:
        arrays["camera_names"] = np.asarray(clip.camera_names, dtype=str)
    if clip.has_ground_truth:
        arrays["ego_future_xyz"] = clip.ego_future_xyz
        arrays["ego_future_rot"] = clip.ego_future_rot
    if clip.cot is not None:
        arrays["cot"] = np.asarray(clip.cot, dtype=str)  # a 0-d unicode array: no pickle needed
    write_atomically(path, lambda file: np.savez(file, **arrays))


def load_clip(
    path: str | os.PathLike,
    *,
    num_cameras: int | None = 4,
    num_frames: int | None = 4,
    num_history: int | None = 16,
    num_future: int | None = 64,
) -> Clip:
    """Reads and checks a clip `.npz` file (format in the module docstring); cameras named in
    another order are put in the canonical order (`Clip.create`).

    Raises FileNotFoundError for a missing file, IsADirectoryError for a directory, the OSError of
    a file that cannot be opened, and `ClipError`, naming the file once and then the field, for
    anything else: not an npz, missing or unknown keys (one ego_future_* key without the other
    among them), and every `validate_clip` problem (camera indices as in the file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"clip file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a directory, not a clip .npz file")
    with open(path, "rb") as file:  # an unreadable file raises here, naming itself
        if not zipfile.is_zipfile(file):
            raise ClipError(f"{path}: not an .npz archive (a zip of .npy arrays, as written by save_clip)")
        file.seek(0)
        try:
            archive = np.load(file, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise ClipError(f"{path}: cannot read the .npz archive ({error})") from None
        with archive:
            return _clip_from_archive(path, archive, num_cameras, num_frames, num_history, num_future)


def _clip_from_archive(path: Path, archive, num_cameras, num_frames, num_history, num_future) -> Clip:
    keys = set(archive.files)
    per_camera = sorted(int(m.group(1)) for k in keys if (m := _PER_CAMERA_KEY.fullmatch(k)))
    unknown = keys - {*_REQUIRED_KEYS, *_OPTIONAL_KEYS, "camera_frames"} - {
        f"camera_frames_{c}" for c in per_camera
    }
    if unknown:
        raise ClipError(
            f"{path}: unknown key(s) {sorted(unknown)}; a clip has camera_frames (or camera_frames_<c>), "
            f"{', '.join(_REQUIRED_KEYS + _OPTIONAL_KEYS)}"
        )
    if "camera_frames" in keys and per_camera:
        raise ClipError(f"{path}: both camera_frames and camera_frames_<c> keys; store one or the other")
    if per_camera and per_camera != list(range(len(per_camera))):
        missing = sorted(set(range(max(per_camera) + 1)) - set(per_camera))
        raise ClipError(f"{path}: missing key(s) {[f'camera_frames_{c}' for c in missing]}")
    missing = [k for k in _REQUIRED_KEYS if k not in keys]
    if "camera_frames" not in keys and not per_camera:
        missing.insert(0, "camera_frames")
    if missing:
        raise ClipError(f"{path}: missing key(s) {missing}")
    future = [k for k in _FUTURE_KEYS if k in keys]
    if len(future) == 1:
        (absent,) = set(_FUTURE_KEYS) - set(future)
        raise ClipError(
            f"{path}: missing key(s) ['{absent}']: {future[0]} is given, and the ground-truth future "
            f"is both {' and '.join(_FUTURE_KEYS)} or neither"
        )

    def read(key: str) -> np.ndarray:
        try:
            return archive[key]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise ClipError(f"{path}: {key}: cannot read the array ({error})") from None

    if per_camera:
        frames = [read(f"camera_frames_{c}") for c in per_camera]
    else:
        frames = read("camera_frames")
    names = None
    if "camera_names" in keys:
        names = read("camera_names")
        if names.dtype.kind != "U" or names.ndim != 1:
            raise ClipError(
                f"{path}: camera_names: expected a 1-D str array, got dtype {names.dtype} shape {names.shape}"
            )
        names = names.tolist()
    cot = None
    if "cot" in keys:
        cot = read("cot")
        if cot.dtype.kind != "U" or cot.ndim != 0:
            raise ClipError(f"{path}: cot: expected a 0-d str array (np.asarray(text)), got dtype {cot.dtype} "
                            f"shape {cot.shape}")
        cot = str(cot[()])
    xyz, rot = read("ego_history_xyz"), read("ego_history_rot")
    timestamps = read("timestamps") if "timestamps" in keys else None
    future_xyz, future_rot = (read(k) for k in _FUTURE_KEYS) if future else (None, None)
    try:  # every read is done: its errors already name the file
        return Clip.create(
            frames,
            xyz,
            rot,
            timestamps=timestamps,
            camera_names=names,
            ego_future_xyz=future_xyz,
            ego_future_rot=future_rot,
            cot=cot,
            num_cameras=num_cameras,
            num_frames=num_frames,
            num_history=num_history,
            num_future=num_future,
        )
    except ClipError as error:
        raise ClipError(f"{path}: {error}") from None
