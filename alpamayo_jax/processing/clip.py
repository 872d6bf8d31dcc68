"""Driving clips on the host (numpy only): what the model sees at time t0, and the checks on it.

A `Clip` is C cameras x F frames of uint8 RGB images and the ego vehicle's last T poses, all
relative to t0, the time the model predicts from; for training and evaluation also its next N poses,
the ground truth of the prediction. `Clip.create` converts and checks its arguments
(and puts named cameras in their canonical order); `validate_clip` re-checks a clip. The `.npz`
clip file format and `save_clip` / `load_clip` are in `alpamayo_jax.processing.clip_file`,
deterministic demo clips in `alpamayo_jax.processing.synthetic`, and already-processed model
inputs (for exact parity runs) in `alpamayo_jax.processing.recorded_inputs`.

Shapes: C cameras (4), F frames per camera (4), H_c x W_c pixels of camera c's frames (cameras may
differ, the frames of one camera may not), T history poses (16), N future poses (64).

Cameras are in the reference's camera-index order: cross_left_120fov (index 0), front_wide_120fov
(1), cross_right_120fov (2), front_tele_30fov (6) (`CAMERA_NAMES`); the model sees them in this
order. A clip that names its cameras (`camera_names`) may give them in any order: `Clip.create`
moves the frames of the camera named X to X's position. Unknown or repeated names are errors.

Frames are oldest first, `FRAME_DT` apart, the newest at t0: -0.3, -0.2, -0.1, 0 s for 4 frames
(`FRAME_TIMESTAMPS`). Recorded frame times (`timestamps`, seconds relative to t0) must match
these within `TIMESTAMP_TOLERANCE`.

The history is sampled every `HISTORY_DT` (10 Hz) over t0 - 1.5 s ... t0, oldest first, in the t0
ego frame: p_local = R_t0^-1 (p - p_t0), R_local = R_t0^-1 R, so the last position is the origin
(x forward, y left, z up; within `ORIGIN_TOLERANCE`). Its rotation is the identity only when the
history was made relative to the full t0 pose; the reference fixture's last rotation carries a
small pitch, so that is not required. No step between consecutive poses may be faster than
`MAX_SPEED`. Standing still, reversing and any speed up to it are fine.

The ground truth (`ego_future_xyz`, `ego_future_rot`; optional, both or neither,
`Clip.has_ground_truth`) is the ego poses at t0 + 0.1 ... t0 + 6.4 s for N = 64: every
`HISTORY_DT`, oldest first, starting one step after t0, in the same t0 ego frame as the history.
Its motion is checked like the history's: no step between consecutive future poses, nor the step
from the last history pose (t0, the origin) to the first future pose, faster than `MAX_SPEED`.

A training clip may also carry its Chain-of-Causation text (`cot`, optional): the reasoning the
model is taught to write before the trajectory (`processing.training_prompt`). It is plain text:
non-empty, and free of special-token markup `<|...|>` (the tokenizer-dependent check, against
every added token of the vocabulary, is `training_prompt.check_cot`).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from alpamayo_jax.processing.image import aligned_stack, check_aspect_ratio, to_channels_first

# Reference camera indices 0, 1, 2 and 6, in that order (the order of the model's images).
CAMERA_NAMES = ("cross_left_120fov", "front_wide_120fov", "cross_right_120fov", "front_tele_30fov")
FRAME_DT = 0.1  # seconds between the frames of one camera
FRAME_TIMESTAMPS = (-0.3, -0.2, -0.1, 0.0)  # seconds relative to t0, for the default 4 frames
# Largest accepted |timestamp - expected frame time|, in seconds. Real cameras deliver, for each
# expected time, the latest frame at or before it, which can be up to one frame period older:
# 0.05 s for 20 Hz cameras (less at 30 Hz). Anything further off is a different frame (the
# frames are only FRAME_DT = 0.1 s apart) or times in another unit or origin.
TIMESTAMP_TOLERANCE = 0.05
HISTORY_DT = 0.1  # seconds between history poses
# Largest accepted distance of the last history position from the origin, in metres: the history
# is in the t0 ego frame, so its t0 pose is at the origin; float32 rounding of a transform of
# positions a few hundred metres from the t0 pose stays far below 1 mm.
ORIGIN_TOLERANCE = 1e-3
# Fastest accepted motion between consecutive history poses, in m/s (360 km/h). Above any road
# vehicle's driving speed, so a faster step is not driving but a data error: positions in the
# wrong unit, poses from another frame or trip, or a gap in the recording.
MAX_SPEED = 100.0
# Largest accepted |R R^T - I| entry and |det R - 1|. float32 rounding of a true rotation is ~1e-7;
# 1e-3 still rejects anything that is not a rotation (a reflection has det -1, a scaled matrix fails
# R R^T = I) while accepting rotations that went through a few float32 products.
ROTATION_TOLERANCE = 1e-3
# The markup of the Qwen and Alpamayo special tokens (`<|im_end|>`, `<|cot_end|>`, ...).
SPECIAL_TOKEN_MARKUP = re.compile(r"<\|[^<>|\s]*\|>")


class ClipError(ValueError):
    """A clip, recorded-inputs file or one of their fields is invalid."""


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
    """One driving sample: camera frames, ego history and optionally the ground-truth future (see
    the module docstring).

    Build with `Clip.create`, which converts and checks the arguments. `camera_frames` is a
    (C, F, 3, H, W) uint8 array, or, when camera sizes differ, a tuple of C (F, 3, H_c, W_c) uint8
    arrays; `camera_frames[c][f]` is a (3, H_c, W_c) frame either way. Cameras are in the
    canonical order (`CAMERA_NAMES`, of which `camera_names` is then a subsequence).
    `ego_future_xyz` / `ego_future_rot` are both None in a clip without ground truth; `cot`, the
    Chain-of-Causation text a training clip may carry, is None without one. Arrays are read-only.
    """

    camera_frames: np.ndarray | tuple[np.ndarray, ...] = dataclasses.field(repr=False)
    ego_history_xyz: np.ndarray = dataclasses.field(repr=False)  # (T, 3) float32
    ego_history_rot: np.ndarray = dataclasses.field(repr=False)  # (T, 3, 3) float32
    timestamps: np.ndarray | None = None  # (F,) float64 seconds relative to t0
    camera_names: tuple[str, ...] | None = None  # (C,) in canonical order
    ego_future_xyz: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (N, 3) float32
    ego_future_rot: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (N, 3, 3) float32
    cot: str | None = None  # Chain-of-Causation text (training), plain text

    @property
    def has_ground_truth(self) -> bool:
        """Whether the clip carries the ground-truth future (`ego_future_xyz` and `ego_future_rot`)."""
        return self.ego_future_xyz is not None and self.ego_future_rot is not None

    @classmethod
    def create(
        cls,
        camera_frames,
        ego_history_xyz,
        ego_history_rot,
        *,
        timestamps=None,
        camera_names=None,
        ego_future_xyz=None,
        ego_future_rot=None,
        cot: str | None = None,
        num_cameras: int | None = 4,
        num_frames: int | None = 4,
        num_history: int | None = 16,
        num_future: int | None = 64,
    ) -> Clip:
        """A checked clip from array-likes.

        `camera_frames` is a 5-D uint8 array or nested sequences (cameras, then frames) of images,
        each (3, H, W) or (H, W, 3). Histories and futures of any real dtype are converted to
        float32; the future (`ego_future_xyz` and `ego_future_rot`, ground truth) is optional, both or
        neither. `cot` (optional) is the clip's Chain-of-Causation text, a non-empty str.
        `camera_names`, one per camera, may be in any order: the cameras are put in the canonical
        order (the frames of the camera named X at X's position in `CAMERA_NAMES`) and the clip's
        `camera_names` are that order. The counts are checked as in `validate_clip`; errors index
        the cameras as given. Raises `ClipError`.
        """
        clip = cls(
            camera_frames=_frames_channels_first(camera_frames),
            ego_history_xyz=_real_array("ego_history_xyz", ego_history_xyz, np.float32),
            ego_history_rot=_real_array("ego_history_rot", ego_history_rot, np.float32),
            timestamps=_optional_real_array("timestamps", timestamps, np.float64),
            camera_names=None if camera_names is None else _names(camera_names),
            ego_future_xyz=_optional_real_array("ego_future_xyz", ego_future_xyz, np.float32),
            ego_future_rot=_optional_real_array("ego_future_rot", ego_future_rot, np.float32),
            cot=cot,
        )
        _validate(clip, num_cameras, num_frames, num_history, num_future, canonical_order=False)
        return _in_canonical_order(clip)


def validate_clip(
    clip: Clip,
    *,
    num_cameras: int | None = 4,
    num_frames: int | None = 4,
    num_history: int | None = 16,
    num_future: int | None = 64,
) -> None:
    """Raises `ClipError`, naming the field, unless `clip` is a valid clip with these counts
    (a count of None accepts any positive count).

    Checks: C cameras of F non-empty channels-first uint8 frames (one size per camera) whose aspect
    ratio the image processor accepts (`processing.image.check_aspect_ratio`); (T, 3) positions and
    (T, 3, 3) rotations, all finite, each rotation with |R R^T - I| and |det R - 1| within
    `ROTATION_TOLERANCE`, the last position the origin within `ORIGIN_TOLERANCE` and no step
    faster than `MAX_SPEED`; F strictly increasing timestamps, each within `TIMESTAMP_TOLERANCE`
    of its frame time; C known, distinct camera names in the canonical order of `CAMERA_NAMES`;
    a ground-truth future given in full (both arrays or neither) and checked like the history:
    (N, 3) positions and (N, 3, 3) rotations, finite, proper rotations, and no step faster than
    `MAX_SPEED`, counting the step from the last history pose to the first future pose.
    `num_future` only applies to a clip with ground truth. A `cot` is a non-empty str without
    special-token markup (`SPECIAL_TOKEN_MARKUP`).
    """
    _validate(clip, num_cameras, num_frames, num_history, num_future, canonical_order=True)


def check_poses(xyz: np.ndarray, rot: np.ndarray, *, prefix: str = "ego_history") -> None:
    """Raises `ClipError` unless (T, 3) positions `xyz` and (T, 3, 3) rotations `rot` are all
    finite and every rotation is proper (|R R^T - I| and |det R - 1| within `ROTATION_TOLERANCE`).
    Errors name the field (`<prefix>_xyz` / `<prefix>_rot`) and the pose indices. Shapes are the
    caller's to check."""
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


def read_only(array: np.ndarray) -> np.ndarray:
    """A read-only view of `array` (how clips hold their arrays); the caller's array keeps its
    own flags."""
    view = array.view()
    view.flags.writeable = False
    return view


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _validate(
    clip: Clip,
    num_cameras: int | None,
    num_frames: int | None,
    num_history: int | None,
    num_future: int | None,
    *,
    canonical_order: bool,
) -> None:
    """`validate_clip`; with `canonical_order=False` named cameras may be in any order (the
    check `Clip.create` runs before reordering them)."""
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
    names = clip.camera_names
    if names is not None:
        _check_camera_names(names, len(cameras), canonical_order=canonical_order)
    for c, camera in enumerate(cameras):
        name = f"camera_frames[{c}]"
        if not isinstance(camera, np.ndarray) or camera.ndim != 4:
            raise ClipError(f"{name}: expected a 4-D (F, 3, H, W) array, got {_describe(camera)}")
        if camera.dtype != np.uint8:
            raise ClipError(f"{name}: expected uint8 pixels, got dtype {camera.dtype} ({_uint8_hint(camera.dtype)})")
        _check_count(name, "frames", camera.shape[0], num_frames if c == 0 else len(cameras[0]))
        if camera.shape[1] != 3:
            raise ClipError(
                f"{name}: expected channels-first (F, 3, H, W) frames, got shape {camera.shape} "
                "(use Clip.create to convert channels-last frames)"
            )
        if camera.shape[2] == 0 or camera.shape[3] == 0:
            raise ClipError(f"{name}: frames are empty, shape {camera.shape}")
        try:
            check_aspect_ratio(camera.shape[2], camera.shape[3])
        except ValueError as error:
            label = name if names is None else f"{name} ({names[c]})"
            raise ClipError(f"{label}: {error}") from None

    xyz = _checked_poses("ego_history", "T", clip.ego_history_xyz, clip.ego_history_rot, num_history)
    _check_origin(xyz)
    _check_speed("ego_history_xyz", xyz)

    future = {"ego_future_xyz": clip.ego_future_xyz, "ego_future_rot": clip.ego_future_rot}
    given = [name for name, value in future.items() if value is not None]
    if len(given) == 1:
        (missing,) = future.keys() - given
        raise ClipError(
            f"{missing}: missing while {given[0]} is given; the ground-truth future is both "
            "ego_future_xyz and ego_future_rot or neither"
        )
    if given:
        future_xyz = _checked_poses("ego_future", "N", clip.ego_future_xyz, clip.ego_future_rot, num_future)
        _check_speed("ego_future_xyz", future_xyz, start=xyz[-1])

    if clip.timestamps is not None:
        _check_timestamps(_array_field("timestamps", clip.timestamps), len(cameras[0]))
    if clip.cot is not None:
        check_cot_text(clip.cot)


def check_cot_text(cot) -> None:
    """Raises `ClipError` unless `cot` is Chain-of-Causation text: a str with something besides
    white space and no special-token markup `<|...|>` (which the tokenizer would read as control
    tokens, e.g. `<|cot_end|>` ending the reasoning early)."""
    if not isinstance(cot, str):
        raise ClipError(f"cot: expected the Chain-of-Causation text as a str, got {type(cot).__name__}")
    if not cot.strip():
        raise ClipError("cot: empty Chain-of-Causation text; leave cot out (None) for a clip without one")
    markup = sorted(set(SPECIAL_TOKEN_MARKUP.findall(cot)))
    if markup:
        raise ClipError(f"cot: contains special-token markup {markup}; Chain-of-Causation text is plain text "
                        "(the prompt adds <|cot_start|> and <|cot_end|> around it)")


def _check_camera_names(names, num_cameras: int, *, canonical_order: bool) -> None:
    if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
        raise ClipError(f"camera_names: expected a tuple of str, got {names!r}")
    if len(names) != num_cameras:
        raise ClipError(f"camera_names: expected {num_cameras} names (one per camera), got {len(names)}")
    unknown = [n for n in names if n not in CAMERA_NAMES]
    if unknown:
        raise ClipError(f"camera_names: unknown camera name(s) {unknown}; known names: {', '.join(CAMERA_NAMES)}")
    repeated = [n for n, count in Counter(names).items() if count > 1]
    if repeated:
        raise ClipError(
            f"camera_names: duplicate name(s) {repeated}; each camera appears once (known names: "
            f"{', '.join(CAMERA_NAMES)})"
        )
    canonical = tuple(sorted(names, key=CAMERA_NAMES.index))
    if canonical_order and names != canonical:
        raise ClipError(
            f"camera_names: {list(names)} are not in the canonical order {list(canonical)} "
            "(use Clip.create to reorder the cameras)"
        )


def _checked_poses(prefix: str, symbol: str, xyz, rot, count: int | None) -> np.ndarray:
    """`<prefix>_xyz` is a (`symbol`, 3) float array of `count` positions (None: any positive
    count) and `<prefix>_rot` one rotation per position, checked by `check_poses`; returns xyz."""
    xyz = _array_field(f"{prefix}_xyz", xyz)
    rot = _array_field(f"{prefix}_rot", rot)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ClipError(f"{prefix}_xyz: expected shape ({symbol}, 3), got {xyz.shape}{_squeeze_hint(xyz, 2)}")
    _check_count(f"{prefix}_xyz", "poses", xyz.shape[0], count)
    if rot.shape != (xyz.shape[0], 3, 3):
        raise ClipError(
            f"{prefix}_rot: expected shape {(xyz.shape[0], 3, 3)} (one rotation per position), "
            f"got {rot.shape}{_squeeze_hint(rot, 3)}"
        )
    check_poses(xyz, rot, prefix=prefix)
    return xyz


def _check_origin(xyz: np.ndarray) -> None:
    """The history ((T, 3) metres) ends at the origin."""
    xyz = xyz.astype(np.float64)
    offset = float(np.linalg.norm(xyz[-1]))
    if offset > ORIGIN_TOLERANCE:
        raise ClipError(
            f"ego_history_xyz: the last pose (t0) must be the origin of the t0 ego frame within "
            f"{ORIGIN_TOLERANCE} m, got {xyz[-1].round(4).tolist()} ({offset:.4g} m away); make the history "
            "relative to t0: p_local = R_t0^-1 (p - p_t0)"
        )


def _check_speed(name: str, xyz: np.ndarray, *, start: np.ndarray | None = None) -> None:
    """No step between consecutive positions of field `name` ((N, 3) metres, `HISTORY_DT` apart)
    is faster than `MAX_SPEED`; with `start`, the position one step before xyz[0] (the last
    history pose, t0, for a future), the step from it to xyz[0] counts too and is named
    "t0 -> 0"."""
    path = xyz.astype(np.float64)
    if start is not None:
        path = np.concatenate([np.asarray(start, np.float64)[None], path])
    step = np.linalg.norm(np.diff(path, axis=0), axis=1)
    speed = step / HISTORY_DT
    fast = speed > MAX_SPEED
    if fast.any():
        first = int(np.argmax(fast))
        if start is None:
            poses, note = f"{first} -> {first + 1}", ""
        else:  # path index i is pose i - 1 of `name`, path index 0 the t0 pose
            poses = f"{first - 1 if first else 't0'} -> {first}"
            note = f", pose 0 at t0 + {HISTORY_DT} s, t0 the last history pose"
        raise ClipError(
            f"{name}: {int(fast.sum())} of {len(step)} steps faster than MAX_SPEED = {MAX_SPEED:g} m/s "
            f"({MAX_SPEED * 3.6:g} km/h), first poses {poses}: {step[first]:.4g} m in "
            f"{HISTORY_DT} s = {speed[first]:.4g} m/s (positions are metres, poses {HISTORY_DT} s "
            f"apart{note})"
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
    expected = FRAME_DT * (np.arange(num_frames) - (num_frames - 1))  # -(F-1) * FRAME_DT ... 0
    off = np.abs(timestamps - expected) > TIMESTAMP_TOLERANCE
    if off.any():
        f = int(np.argmax(off))
        raise ClipError(
            f"timestamps: frame {f} is at {timestamps[f]:.4g} s, expected {expected[f]:.2g} s within "
            f"{TIMESTAMP_TOLERANCE} s (frames are {FRAME_DT} s apart, oldest first, the newest at t0; "
            f"times in seconds relative to t0), got {timestamps.tolist()}"
        )


def _check_count(name: str, what: str, got: int, expected: int | None) -> None:
    if got == 0 or (expected is not None and got != expected):
        wanted = "at least 1" if expected is None else expected
        raise ClipError(f"{name}: expected {wanted} {what}, got {got}")


def _array_field(name: str, value) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ClipError(
            f"{name}: expected a numpy array, got {type(value).__name__} (use Clip.create to convert)"
        )
    if value.dtype.kind != "f":
        raise ClipError(f"{name}: expected floating-point values, got dtype {value.dtype}")
    return value


def _uint8_hint(dtype: np.dtype) -> str:
    """How to get uint8 pixels from an array of `dtype`."""
    if dtype.kind == "f":
        return "convert float images in [0, 1] with np.round(x * 255).astype(np.uint8)"
    if dtype.kind in "iu":
        return (
            "pixel values must be 0..255: only if these are 8-bit values, convert them with "
            "np.clip(x, 0, 255).astype(np.uint8); rescale other ranges first"
        )
    if dtype.kind == "b":
        return "a boolean array is a mask, not an image"
    return "camera frames are RGB images of uint8 values 0..255"


def _describe(value) -> str:
    return f"shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__


def _squeeze_hint(array: np.ndarray, ndim: int) -> str:
    if array.ndim > ndim and all(n == 1 for n in array.shape[: array.ndim - ndim]):
        return f" (drop the leading batch axes: x[{', '.join(['0'] * (array.ndim - ndim))}])"
    return ""


def _indices(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask).tolist()


# ---------------------------------------------------------------------------------------------
# Conversion
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
            raise ClipError(
                f"camera_frames: expected uint8 pixels, got dtype {frames.dtype} ({_uint8_hint(frames.dtype)})"
            )
        if frames.shape[2] != 3:
            if frames.shape[4] != 3:
                raise ClipError(
                    f"camera_frames: expected 3 (RGB) channels on axis 2 or 4, got shape {frames.shape}"
                )
            frames = frames.transpose(0, 1, 4, 2, 3)
        return read_only(frames)
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
        images = [_image(frame, f"camera_frames[{c}][{i}]") for i, frame in enumerate(camera)]
        if not images:
            raise ClipError(f"camera_frames[{c}]: camera has no frames")
        sizes = sorted({image.shape[1:] for image in images})
        if len(sizes) > 1:
            raise ClipError(
                f"camera_frames[{c}]: frames have different sizes {sizes}; one camera has one size"
            )
        cameras.append(images)
    if cameras and len({(len(images), images[0].shape) for images in cameras}) == 1:
        return read_only(_stacked(cameras))
    return tuple(read_only(_stacked([images])[0]) for images in cameras)


def _stacked(cameras: list[list[np.ndarray]]) -> np.ndarray:
    """C cameras' F (3, H, W) frames of one size -> (C, F, 3, H, W), one copy into an
    `aligned_host_array` that preprocessing reads in place (`image.aligned_stack`). Frames that
    are all views of (H, W, 3) images (decoded ones) keep that layout: the result is then a view
    of a (C, F, H, W, 3) array, which spares a transposing copy."""
    frames = [frame for images in cameras for frame in images]
    counts = (len(cameras), len(cameras[0]))
    if all(not f.flags.c_contiguous and f.transpose(1, 2, 0).flags.c_contiguous for f in frames):
        channels_last = aligned_stack([f.transpose(1, 2, 0) for f in frames])
        return channels_last.reshape(*counts, *channels_last.shape[1:]).transpose(0, 1, 4, 2, 3)
    stacked = aligned_stack(frames)
    return stacked.reshape(*counts, *stacked.shape[1:])


def _image(frame, name: str) -> np.ndarray:
    """One frame -> (3, H, W) uint8 (`to_channels_first`, after a dtype check with a hint)."""
    try:
        array = np.asarray(frame)
    except ValueError as error:  # ragged nested sequences
        raise ClipError(f"{name}: not an image array ({error})") from None
    if array.dtype != np.uint8:
        raise ClipError(f"{name}: expected uint8 pixels, got dtype {array.dtype} ({_uint8_hint(array.dtype)})")
    try:
        return to_channels_first(array, name=name)
    except ValueError as error:  # its messages start with `name`
        raise ClipError(str(error)) from None


def _real_array(name: str, value, dtype) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise ClipError(f"{name}: expected real numbers, got dtype {array.dtype}")
    # A copy: later changes to the caller's array must not bypass the checks (histories are small).
    return read_only(array.astype(dtype))


def _optional_real_array(name: str, value, dtype) -> np.ndarray | None:
    return None if value is None else _real_array(name, value, dtype)


def _names(names) -> tuple[str, ...]:
    if isinstance(names, str):
        raise ClipError(f"camera_names: expected a sequence of names, got the single string {names!r}")
    names = tuple(names)
    if not all(isinstance(n, str) for n in names):
        raise ClipError(f"camera_names: expected strings, got {names!r}")
    return names


def _in_canonical_order(clip: Clip) -> Clip:
    """`clip` (valid, named cameras in any order) with its cameras in the canonical order."""
    names = clip.camera_names
    if names is None:
        return clip
    order = sorted(range(len(names)), key=lambda c: CAMERA_NAMES.index(names[c]))
    if order == list(range(len(names))):
        return clip
    frames = clip.camera_frames
    if isinstance(frames, np.ndarray):
        frames = read_only(frames[order])  # a copy in the new order
    else:
        frames = tuple(frames[c] for c in order)
    return dataclasses.replace(clip, camera_frames=frames, camera_names=tuple(names[c] for c in order))
