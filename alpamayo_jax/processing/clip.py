"""Driving clips on the host (numpy only): the model's raw inputs, their checks and file formats.

A `Clip` is what the model sees at time t0: C cameras x F frames of uint8 RGB images and the ego
vehicle's last T poses. `Clip.create` converts and checks its arguments, `validate_clip` re-checks a
clip, `save_clip` / `load_clip` store it, and `synthetic_clip` makes a deterministic one for demos.
`ModelInputs` holds already-processed model inputs (prompt ids and vision patches, e.g. recorded
from the reference processor) for exact parity runs.

Shapes: C cameras (4), F frames per camera (4), H_c x W_c pixels of camera c's frames (cameras may
differ, the frames of one camera may not), T history poses (16), L prompt tokens, N images,
S patch rows (sum of t * h * w over the image grids), D values per patch row.

Cameras are in index order cross_left_120fov, front_wide_120fov, cross_right_120fov,
front_tele_30fov; frames are oldest first (t0 - 0.3, -0.2, -0.1, 0 s). The history is sampled at
10 Hz over t0 - 1.5 s ... t0, oldest first, in the t0 ego frame: p_local = R_t0^-1 (p - p_t0),
R_local = R_t0^-1 R, so the last position is the origin (x forward, y left, z up). Its rotation is
the identity only when the history was made relative to the full t0 pose; the reference fixture's
last rotation carries a small pitch, so that is not required.

Clip file (`.npz`, read with `allow_pickle=False`; compressed or not):

  key                 dtype       shape                               notes
  camera_frames       uint8       (C, F, 3, H, W) or (C, F, H, W, 3)  all cameras the same size
  camera_frames_<c>   uint8       (F, 3, H_c, W_c) or (F, H_c, W_c, 3) instead of camera_frames, one
                                                                      per camera c = 0..C-1, when
                                                                      camera sizes differ
  ego_history_xyz     float32     (T, 3)                              metres, t0 ego frame
  ego_history_rot     float32     (T, 3, 3)                           rotation matrices, t0 ego frame
  timestamps          float64     (F,)                                optional; seconds relative to
                                                                      t0, strictly increasing
  camera_names        str (<U..)  (C,)                                optional

Other keys are rejected. An image axis of size 3 in front of H means channels-first, even when the
last axis is 3 too (the rule of `processing.image.to_channels_first`).

Model-inputs file (`.safetensors`, see `load_model_inputs`): input_ids (1, L) int, pixel_values
(S, D) float32, image_grid_thw (N, 3) int, ego_history_xyz (1, T, 3) float32, ego_history_rot
(1, T, 3, 3) float32; other keys (e.g. attention_mask) are ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import safetensors
from safetensors.numpy import load_file, save

from alpamayo_jax.processing.image import to_channels_first

CAMERA_NAMES = ("cross_left_120fov", "front_wide_120fov", "cross_right_120fov", "front_tele_30fov")
FRAME_TIMESTAMPS = (-0.3, -0.2, -0.1, 0.0)  # seconds relative to t0
HISTORY_DT = 0.1  # seconds between history poses
# Largest accepted |R R^T - I| entry and |det R - 1|. float32 rounding of a true rotation is ~1e-7;
# 1e-3 still rejects anything that is not a rotation (a reflection has det -1, a scaled matrix fails
# R R^T = I) while accepting rotations that went through a few float32 products.
ROTATION_TOLERANCE = 1e-3

_REQUIRED_KEYS = ("ego_history_xyz", "ego_history_rot")
_OPTIONAL_KEYS = ("timestamps", "camera_names")
_PER_CAMERA_KEY = re.compile(r"camera_frames_(0|[1-9][0-9]*)")
_UINT8_HINT = "convert float images in [0, 1] with np.round(x * 255).astype(np.uint8)"


class ClipError(ValueError):
    """A clip, model-inputs file or one of their fields is invalid."""


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
    """One driving sample: camera frames and ego history (see the module docstring).

    Build with `Clip.create`, which converts and checks the arguments. `camera_frames` is a
    (C, F, 3, H, W) uint8 array, or, when camera sizes differ, a tuple of C (F, 3, H_c, W_c) uint8
    arrays; `camera_frames[c][f]` is a (3, H_c, W_c) frame either way. Arrays are read-only.
    """

    camera_frames: np.ndarray | tuple[np.ndarray, ...] = dataclasses.field(repr=False)
    ego_history_xyz: np.ndarray = dataclasses.field(repr=False)  # (T, 3) float32
    ego_history_rot: np.ndarray = dataclasses.field(repr=False)  # (T, 3, 3) float32
    timestamps: np.ndarray | None = None  # (F,) float64 seconds relative to t0
    camera_names: tuple[str, ...] | None = None  # (C,)

    @classmethod
    def create(
        cls,
        camera_frames,
        ego_history_xyz,
        ego_history_rot,
        *,
        timestamps=None,
        camera_names=None,
        num_cameras: int | None = 4,
        num_frames: int | None = 4,
        num_history: int | None = 16,
    ) -> Clip:
        """A checked clip from array-likes.

        `camera_frames` is a 5-D uint8 array or nested sequences (cameras, then frames) of images,
        each (3, H, W) or (H, W, 3). Histories of any real dtype are converted to float32. The
        counts are checked as in `validate_clip`. Raises `ClipError`.
        """
        clip = cls(
            camera_frames=_frames_channels_first(camera_frames),
            ego_history_xyz=_real_array("ego_history_xyz", ego_history_xyz, np.float32),
            ego_history_rot=_real_array("ego_history_rot", ego_history_rot, np.float32),
            timestamps=None if timestamps is None else _real_array("timestamps", timestamps, np.float64),
            camera_names=None if camera_names is None else _names(camera_names),
        )
        validate_clip(clip, num_cameras=num_cameras, num_frames=num_frames, num_history=num_history)
        return clip


def validate_clip(
    clip: Clip, *, num_cameras: int | None = 4, num_frames: int | None = 4, num_history: int | None = 16
) -> None:
    """Raises `ClipError`, naming the field, unless `clip` is a valid clip with these counts
    (a count of None accepts any positive count).

    Checks: C cameras of F non-empty channels-first uint8 frames (one size per camera); (T, 3)
    positions and (T, 3, 3) rotations, all finite, each rotation with |R R^T - I| and |det R - 1|
    within `ROTATION_TOLERANCE`; F strictly increasing finite timestamps; C camera names.
    """
    frames = clip.camera_frames
    if isinstance(frames, np.ndarray):
        if frames.ndim != 5:
            raise ClipError(f"camera_frames: expected a 5-D (C, F, 3, H, W) array, got shape {frames.shape}")
        cameras = list(frames)
    elif isinstance(frames, tuple):
        cameras = list(frames)
    else:
        raise ClipError(
            f"camera_frames: expected an array or a tuple of per-camera arrays, got {type(frames).__name__} "
            "(use Clip.create to convert)"
        )
    _check_count("camera_frames", "cameras", len(cameras), num_cameras)
    for c, camera in enumerate(cameras):
        name = f"camera_frames[{c}]"
        if not isinstance(camera, np.ndarray) or camera.ndim != 4:
            raise ClipError(f"{name}: expected a 4-D (F, 3, H, W) array, got {_describe(camera)}")
        if camera.dtype != np.uint8:
            raise ClipError(f"{name}: expected uint8 pixels, got dtype {camera.dtype} ({_UINT8_HINT})")
        _check_count(name, "frames", camera.shape[0], num_frames if c == 0 else len(cameras[0]))
        if camera.shape[1] != 3:
            raise ClipError(
                f"{name}: expected channels-first (F, 3, H, W) frames, got shape {camera.shape} "
                "(use Clip.create to convert channels-last frames)"
            )
        if camera.shape[2] == 0 or camera.shape[3] == 0:
            raise ClipError(f"{name}: frames are empty, shape {camera.shape}")

    xyz = _array_field("ego_history_xyz", clip.ego_history_xyz)
    rot = _array_field("ego_history_rot", clip.ego_history_rot)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ClipError(f"ego_history_xyz: expected shape (T, 3), got {xyz.shape}{_squeeze_hint(xyz, 2)}")
    _check_count("ego_history_xyz", "poses", xyz.shape[0], num_history)
    if rot.shape != (xyz.shape[0], 3, 3):
        raise ClipError(
            f"ego_history_rot: expected shape {(xyz.shape[0], 3, 3)} (one rotation per position), "
            f"got {rot.shape}{_squeeze_hint(rot, 3)}"
        )
    _check_poses("ego_history", xyz, rot)

    if clip.timestamps is not None:
        _check_timestamps(_array_field("timestamps", clip.timestamps), len(cameras[0]))
    if clip.camera_names is not None:
        names = clip.camera_names
        if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
            raise ClipError(f"camera_names: expected a tuple of str, got {names!r}")
        if len(names) != len(cameras):
            raise ClipError(f"camera_names: expected {len(cameras)} names (one per camera), got {len(names)}")


# ---------------------------------------------------------------------------------------------
# Conversion and checks
# ---------------------------------------------------------------------------------------------


def _frames_channels_first(frames) -> np.ndarray | tuple[np.ndarray, ...]:
    """Camera frames -> read-only (C, F, 3, H, W) array, or a tuple of (F, 3, H_c, W_c) arrays
    when camera sizes differ. Counts are left to `validate_clip`."""
    if isinstance(frames, np.ndarray):
        # One layout decision for the whole array: a transpose view, no per-frame copies.
        if frames.ndim != 5:
            raise ClipError(
                "camera_frames: expected a 5-D (C, F, 3, H, W) or (C, F, H, W, 3) array, "
                f"got shape {frames.shape}"
            )
        if frames.dtype != np.uint8:
            raise ClipError(f"camera_frames: expected uint8 pixels, got dtype {frames.dtype} ({_UINT8_HINT})")
        if frames.shape[2] != 3:
            if frames.shape[4] != 3:
                raise ClipError(
                    f"camera_frames: expected 3 (RGB) channels on axis 2 or 4, got shape {frames.shape}"
                )
            frames = frames.transpose(0, 1, 4, 2, 3)
        return _read_only(frames)
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
        raise ClipError(
            f"camera_frames: expected an array or a sequence of cameras, got {type(frames).__name__}"
        )
    cameras = []
    for c, camera in enumerate(frames):
        if isinstance(camera, np.ndarray) and camera.ndim != 4:
            raise ClipError(
                f"camera_frames[{c}]: expected a 4-D (F, 3, H, W) or (F, H, W, 3) array, "
                f"got shape {camera.shape}"
            )
        try:
            images = [to_channels_first(f, name=f"camera_frames[{c}][{i}]") for i, f in enumerate(camera)]
        except ValueError as error:
            raise ClipError(str(error)) from None
        if not images:
            raise ClipError(f"camera_frames[{c}]: camera has no frames")
        sizes = sorted({image.shape[1:] for image in images})
        if len(sizes) > 1:
            raise ClipError(
                f"camera_frames[{c}]: frames have different sizes {sizes}; one camera has one size"
            )
        cameras.append(np.stack(images))
    if cameras and len({camera.shape for camera in cameras}) == 1:
        return _read_only(np.stack(cameras))
    return tuple(_read_only(camera) for camera in cameras)


def _read_only(array: np.ndarray) -> np.ndarray:
    # A read-only view: the caller's array keeps its own flags.
    view = array.view()
    view.flags.writeable = False
    return view


def _real_array(name: str, value, dtype) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise ClipError(f"{name}: expected real numbers, got dtype {array.dtype}")
    # A copy: later changes to the caller's array must not bypass the checks (histories are small).
    return _read_only(array.astype(dtype))


def _names(names) -> tuple[str, ...]:
    if isinstance(names, str):
        raise ClipError(f"camera_names: expected a sequence of names, got the single string {names!r}")
    names = tuple(names)
    if not all(isinstance(n, str) for n in names):
        raise ClipError(f"camera_names: expected strings, got {names!r}")
    return names


def _array_field(name: str, value) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ClipError(
            f"{name}: expected a numpy array, got {type(value).__name__} (use Clip.create to convert)"
        )
    if value.dtype.kind != "f":
        raise ClipError(f"{name}: expected floating-point values, got dtype {value.dtype}")
    return value


def _describe(value) -> str:
    return f"shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__


def _check_count(name: str, what: str, got: int, expected: int | None) -> None:
    if got == 0 or (expected is not None and got != expected):
        wanted = "at least 1" if expected is None else expected
        raise ClipError(f"{name}: expected {wanted} {what}, got {got}")


def _squeeze_hint(array: np.ndarray, ndim: int) -> str:
    if array.ndim > ndim and all(n == 1 for n in array.shape[: array.ndim - ndim]):
        return f" (drop the leading batch axes: x[{', '.join(['0'] * (array.ndim - ndim))}])"
    return ""


def _indices(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask).tolist()


def _check_poses(prefix: str, xyz: np.ndarray, rot: np.ndarray) -> None:
    """Finite (T, 3) positions and (T, 3, 3) proper rotations; errors name the pose indices."""
    for name, array in ((f"{prefix}_xyz", xyz), (f"{prefix}_rot", rot)):
        bad = ~np.isfinite(array).reshape(len(array), -1).all(axis=1)
        if bad.any():
            raise ClipError(f"{name}: NaN or infinite values at pose(s) {_indices(bad)}")
    rot64 = rot.astype(np.float64)
    gram = rot64 @ rot64.transpose(0, 2, 1)
    orthogonality = np.abs(gram - np.eye(3)).max(axis=(1, 2))
    bad = orthogonality > ROTATION_TOLERANCE
    if bad.any():
        raise ClipError(
            f"{prefix}_rot: pose(s) {_indices(bad)} are not rotations: max |R R^T - I| = "
            f"{orthogonality.max():.3g} > {ROTATION_TOLERANCE}"
        )
    det = np.linalg.det(rot64)
    bad = np.abs(det - 1.0) > ROTATION_TOLERANCE
    if bad.any():
        raise ClipError(
            f"{prefix}_rot: pose(s) {_indices(bad)} are not proper rotations: det R = "
            f"{det[bad].round(4).tolist()}, expected 1 within {ROTATION_TOLERANCE}"
        )


def _check_timestamps(timestamps: np.ndarray, num_frames: int) -> None:
    if timestamps.shape != (num_frames,):
        raise ClipError(f"timestamps: expected shape ({num_frames},) (one per frame), got {timestamps.shape}")
    finite = np.isfinite(timestamps)
    if not finite.all():
        raise ClipError(f"timestamps: NaN or infinite values at frame(s) {_indices(~finite)}")
    if not (np.diff(timestamps) > 0).all():
        raise ClipError(
            f"timestamps: expected strictly increasing times (oldest first), got {timestamps.tolist()}"
        )


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Writes `path` through a temporary file in the same directory, renamed over `path` once
    complete, so that readers never see a partial file and a failed write leaves `path` as it was."""
    path = Path(path)
    # A unique name opened exclusively ("x"), so that the file gets the umask's permissions
    # rather than tempfile's private 0600.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_clip(path: str | os.PathLike, clip: Clip) -> None:
    """Writes `clip` to an uncompressed `.npz` file (format in the module docstring), atomically.

    The clip is checked first (any counts), so that an invalid clip is never written."""
    validate_clip(clip, num_cameras=None, num_frames=None, num_history=None)
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
    write_atomically(path, lambda file: np.savez(file, **arrays))


def load_clip(
    path: str | os.PathLike,
    *,
    num_cameras: int | None = 4,
    num_frames: int | None = 4,
    num_history: int | None = 16,
) -> Clip:
    """Reads and checks a clip `.npz` file (format in the module docstring).

    Raises FileNotFoundError for a missing file and `ClipError`, naming the file and the field, for
    anything else: not an npz, missing or unknown keys, and every `validate_clip` problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"clip file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ClipError(f"{path}: not an .npz archive (a zip of .npy arrays, as written by save_clip)")
    with np.load(path, allow_pickle=False) as archive:
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
                    f"{path}: camera_names: expected a 1-D str array, "
                    f"got dtype {names.dtype} shape {names.shape}"
                )
            names = names.tolist()
        try:
            return Clip.create(
                frames,
                read("ego_history_xyz"),
                read("ego_history_rot"),
                timestamps=read("timestamps") if "timestamps" in keys else None,
                camera_names=names,
                num_cameras=num_cameras,
                num_frames=num_frames,
                num_history=num_history,
            )
        except ClipError as error:
            raise ClipError(f"{path}: {error}") from None


# ---------------------------------------------------------------------------------------------
# Synthetic clips
# ---------------------------------------------------------------------------------------------


def arc_history(
    speed: float, curvature: float, *, num_history: int = 16, dt: float = HISTORY_DT
) -> tuple[np.ndarray, np.ndarray]:
    """Ego history of constant `speed` (m/s) on a circle of signed `curvature` (1/m, > 0 turns
    left) ending at t0: (T, 3) float32 positions and (T, 3, 3) yaw-only rotations in the t0 frame."""
    arc_length = speed * dt * np.arange(1 - num_history, 1, dtype=np.float64)  # <= 0: the past
    yaw = curvature * arc_length
    # sin(yaw)/k and (1 - cos(yaw))/k written with sinc, which stays exact as k -> 0 (a straight line).
    x = arc_length * np.sinc(yaw / np.pi)
    y = arc_length * (yaw / 2) * np.sinc(yaw / (2 * np.pi)) ** 2
    xyz = np.stack([x, y, np.zeros_like(x)], axis=-1)
    cos, sin = np.cos(yaw), np.sin(yaw)
    rot = np.zeros((num_history, 3, 3))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = cos, -sin, sin, cos, 1.0
    return xyz.astype(np.float32), rot.astype(np.float32)


def synthetic_clip(
    seed: int = 0, *, image_size: tuple[int, int] = (32, 48), speed: float = 8.0, curvature: float = 0.01
) -> Clip:
    """A deterministic 4-camera, 4-frame clip for demos and tests: smooth colour gradients with a
    little noise, drifting from frame to frame, and `arc_history(speed, curvature)`."""
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
    return Clip.create(frames, xyz, rot, timestamps=FRAME_TIMESTAMPS, camera_names=CAMERA_NAMES)


# ---------------------------------------------------------------------------------------------
# Precomputed model inputs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ModelInputs:
    """Processed inputs of one sample, as the reference processor makes them (read-only arrays)."""

    input_ids: np.ndarray = dataclasses.field(repr=False)  # (1, L) int64, history placeholders unfused
    pixel_values: np.ndarray = dataclasses.field(repr=False)  # (S, D) float32
    image_grid_thw: np.ndarray  # (N, 3) int64
    ego_history_xyz: np.ndarray  # (T, 3) float32
    ego_history_rot: np.ndarray  # (T, 3, 3) float32


_MODEL_INPUT_KEYS = ("input_ids", "pixel_values", "image_grid_thw", "ego_history_xyz", "ego_history_rot")


def _model_inputs(tensors: dict[str, np.ndarray], num_history: int | None) -> ModelInputs:
    """Checks the file's tensors (histories with their leading 1) and builds `ModelInputs`."""
    missing = [k for k in _MODEL_INPUT_KEYS if k not in tensors]
    if missing:
        raise ClipError(f"missing key(s) {missing}; model inputs need {', '.join(_MODEL_INPUT_KEYS)}")
    ids, pixels, grid = tensors["input_ids"], tensors["pixel_values"], tensors["image_grid_thw"]
    xyz, rot = tensors["ego_history_xyz"], tensors["ego_history_rot"]
    for name, array, kind in (("input_ids", ids, "iu"), ("image_grid_thw", grid, "iu")):
        if array.dtype.kind not in kind:
            raise ClipError(f"{name}: expected integers, got dtype {array.dtype}")
    for name, array in (("pixel_values", pixels), ("ego_history_xyz", xyz), ("ego_history_rot", rot)):
        # No silent casts: parity runs must see exactly the recorded float32 values.
        if array.dtype != np.float32:
            raise ClipError(f"{name}: expected float32, got dtype {array.dtype}")
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ClipError(f"input_ids: expected shape (1, L) with L >= 1, got {ids.shape}")
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise ClipError(f"pixel_values: expected a non-empty 2-D (S, D) array, got shape {pixels.shape}")
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ClipError(f"image_grid_thw: expected shape (N, 3) with N >= 1, got {grid.shape}")
    if (grid < 1).any():
        raise ClipError(f"image_grid_thw: expected positive (t, h, w), got {grid.tolist()}")
    if xyz.ndim != 3 or xyz.shape[0] != 1 or xyz.shape[2] != 3:
        raise ClipError(f"ego_history_xyz: expected shape (1, T, 3), got {xyz.shape}")
    if num_history is not None and xyz.shape[1] != num_history:
        raise ClipError(f"ego_history_xyz: expected {num_history} poses, got {xyz.shape[1]}")
    if rot.shape != (1, xyz.shape[1], 3, 3):
        raise ClipError(f"ego_history_rot: expected shape {(1, xyz.shape[1], 3, 3)}, got {rot.shape}")
    if not np.isfinite(pixels).all():
        rows = _indices(~np.isfinite(pixels).all(axis=1))
        raise ClipError(f"pixel_values: NaN or infinite values in {len(rows)} row(s), first {rows[:5]}")
    _check_poses("ego_history", xyz[0], rot[0])
    patches = int(np.prod(grid.astype(np.int64), axis=1).sum())
    if patches != pixels.shape[0]:
        raise ClipError(
            f"pixel_values: {pixels.shape[0]} rows, but image_grid_thw describes "
            f"sum(t * h * w) = {patches} patches"
        )
    return ModelInputs(
        input_ids=_read_only(ids.astype(np.int64, copy=False)),
        pixel_values=_read_only(pixels),
        image_grid_thw=_read_only(grid.astype(np.int64, copy=False)),
        ego_history_xyz=_read_only(xyz[0]),
        ego_history_rot=_read_only(rot[0]),
    )


def load_model_inputs(path: str | os.PathLike, *, num_history: int | None = 16) -> ModelInputs:
    """Reads and checks a `.safetensors` file of precomputed model inputs (see the module
    docstring); the histories lose their leading axis of 1. Raises FileNotFoundError for a missing
    file and `ClipError`, naming the file and the key, otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model inputs file not found: {path}")
    try:
        tensors = load_file(path)
    except (safetensors.SafetensorError, TypeError, ValueError) as error:
        raise ClipError(f"{path}: not a readable .safetensors file ({error})") from None
    try:
        return _model_inputs(tensors, num_history)
    except ClipError as error:
        raise ClipError(f"{path}: {error}") from None


def save_model_inputs(path: str | os.PathLike, inputs: ModelInputs) -> None:
    """Writes `inputs` to a `.safetensors` file readable by `load_model_inputs`, atomically; the
    inputs are checked first."""
    tensors = {
        "input_ids": np.asarray(inputs.input_ids),
        "pixel_values": np.asarray(inputs.pixel_values),
        "image_grid_thw": np.asarray(inputs.image_grid_thw),
        "ego_history_xyz": np.asarray(inputs.ego_history_xyz)[None],
        "ego_history_rot": np.asarray(inputs.ego_history_rot)[None],
    }
    _model_inputs(tensors, num_history=None)
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    write_atomically(path, lambda file: file.write(data))
