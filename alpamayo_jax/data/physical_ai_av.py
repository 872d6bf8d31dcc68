"""The PhysicalAI-AV dataset read from a local root: one driving sample per (clip id, t0).

A dataset root is a copy of the dataset repository's files (what a Hugging Face `--local-dir`
download gives), read here exactly as the reference's local loader reads it:

  features.csv                    one row per feature (`feature`, `directory`, `chunk_path`,
                                  `clip_files_in_zip`: a JSON map of member names)
  clip_index.parquet              indexed by clip id: `chunk`; optionally `event_t0s` (event
                                  times, microseconds) and `end_timestamp`
  metadata/feature_presence.parquet   optional: which clip has which feature
  camera/<camera>/<camera>.chunk_NNNN.zip   per chunk: <clip>.<camera>.mp4 and
                                  <clip>.<camera>.timestamps.parquet (column `timestamp`, one
                                  microsecond time per video frame)
  labels/egomotion/egomotion.chunk_NNNN.zip per chunk: <clip>.egomotion.parquet (timestamp,
                                  x y z, qx qy qz qw, vx vy vz, ax ay az, curvature)

The file names come from features.csv, never from assumptions. Only this root is read: nothing
here talks to the Hugging Face Hub (no hub client is ever created), whatever HF_HUB_OFFLINE says.

`PhysicalAIAVDataset(root).read(clip_id, t0_us)` gives what the reference's
`load_physical_aiavdataset` gives for the same clip and t0:

- t0 is an integer time in **microseconds** on the clip's own clock (the dataset's timestamps),
  like the reference's `t0_us`; the default keyframe is `DEFAULT_T0_US` = 5.1 s. `seconds_to_us(seconds)`
  converts. t0 must exceed num_history x 0.1 s (1.6 s), as the reference requires.
- Cameras: cross_left_120fov, front_wide_120fov, cross_right_120fov, front_tele_30fov, in camera
  index order (0, 1, 2, 6: `processing.clip.CAMERA_NAMES`). For each, the frames at
  t0 - 0.3, -0.2, -0.1, 0 s, each the latest frame whose timestamp is at or before that time,
  decoded to RGB uint8 by the devkit's video reader.
- Ego poses from the devkit's egomotion interpolator (translation: cubic spline, rotation:
  SLERP, no extrapolation) at t0 - 1.5 ... t0 (16 steps) and t0 + 0.1 ... t0 + 6.4 s (64 steps),
  exact multiples of 100 ms from t0 (as the reference's grid is at this step), then expressed in
  the ego frame at t0:
  p_local = R_t0^-1 (p - p_t0), R_local = R_t0^-1 R (float64, then float32).

The result is a `PhysicalAIAVSample`: its `clip` (`processing.clip.Clip`, with the ground-truth
future, camera names and frame timestamps) plus the per-camera frame times the reference returns.
`read_clip` is the one-call form. Errors: FileNotFoundError for a missing root or metadata file,
`DatasetError` (naming the clip, and the file where one is at fault) for an unknown clip id, a t0
too early or too late for the clip's egomotion or video, a missing camera, and a corrupt or
incomplete chunk zip.

The devkit (`physical-ai-av`, with pandas, pyarrow and PyAV) is the optional extra `data`,
imported on first use.

Shapes: C cameras, F frames per camera (4), H x W pixels, T history poses (16), N future poses (64).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from alpamayo_jax.processing.clip import CAMERA_NAMES, Clip, ClipError, read_only
from alpamayo_jax.processing.image import aligned_stack

DEFAULT_T0_US = 5_100_000  # the training and evaluation keyframe, 5.1 s into the clip
TIME_STEP = 0.1  # seconds between history / future poses and between frames
STEP_US = 100_000  # TIME_STEP in microseconds
# Camera name -> the reference's camera index (the model sees cameras in index order).
CAMERA_INDEX = {
    "cross_left_120fov": 0,
    "front_wide_120fov": 1,
    "cross_right_120fov": 2,
    "rear_left_70fov": 3,
    "rear_tele_30fov": 4,
    "rear_right_70fov": 5,
    "front_tele_30fov": 6,
}
EGOMOTION_FEATURE = "egomotion"
FEATURES_FILE = "features.csv"
CLIP_INDEX_FILE = "clip_index.parquet"
FEATURE_PRESENCE_FILE = "metadata/feature_presence.parquet"
# The reference keeps only events with room for the history before and the future after them.
EVENT_START_MARGIN_US = 1_600_000
EVENT_END_MARGIN_US = 6_400_000
INSTALL_HINT = "pip install 'alpamayo-jax[data]'"


class DatasetError(ValueError):
    """A clip, t0 or dataset file that cannot give a sample."""


def is_dataset_root(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a PhysicalAI-AV root (its features table and clip index), as
    opposed to, say, a directory of `.npz` clips."""
    path = Path(path)
    return (path / FEATURES_FILE).is_file() and (path / CLIP_INDEX_FILE).is_file()


def seconds_to_us(seconds: float) -> int:
    """t0 in microseconds (what `read` takes) from seconds on the clip's clock."""
    return round(seconds * 1_000_000)


def camera_feature(camera: str) -> str:
    """The dataset feature (features.csv row) of a camera name: "camera_" + name."""
    return f"camera_{camera}"


def devkit() -> SimpleNamespace:
    """The optional dependencies, imported on first use: `dataset`, `video` and `egomotion` of the
    devkit (`physical_ai_av`), `pandas`, and `errors`, what reading a damaged file can raise
    (pyarrow's, PyAV's and the usual built-in errors). Raises ImportError naming the extra."""
    try:
        import av
        import pandas
        import pyarrow
        from physical_ai_av import dataset, egomotion, video
    except ImportError as error:
        raise ImportError(
            f"reading the PhysicalAI-AV dataset needs the devkit and its dependencies ({error}); "
            f"install them with: {INSTALL_HINT}"
        ) from error
    errors = (ValueError, KeyError, TypeError, IndexError, OSError, EOFError, pyarrow.ArrowException,
              av.FFmpegError)
    return SimpleNamespace(dataset=dataset, video=video, egomotion=egomotion, pandas=pandas, errors=errors)


@dataclasses.dataclass(frozen=True, eq=False)
class PhysicalAIAVSample:
    """One sample of a clip at t0: the model's `clip` plus what the reference also returns.

    `clip.timestamps` holds one time per frame slot, seconds relative to t0: the earliest of the
    cameras' frame times for that slot (every camera's frame f is from that time or later, and at
    or before the slot's requested time). The per-camera times are `frame_timestamps_us`.
    """

    clip_id: str
    t0_us: int
    clip: Clip
    camera_indices: tuple[int, ...]  # (C,) reference camera indices, ascending
    frame_timestamps_us: np.ndarray = dataclasses.field(repr=False)  # (C, F) int64, the clip's clock

    @property
    def relative_timestamps(self) -> np.ndarray:
        """(C, F) float32 seconds since the earliest frame, as the reference computes them."""
        times = self.frame_timestamps_us
        return (times - times.min()).astype(np.float32) * np.float32(1e-6)


def _offsets_us(first_step: int, last_step: int) -> np.ndarray:
    """(last - first + 1,) int64 microsecond offsets first_step * 0.1 s ... last_step * 0.1 s.

    The reference builds these as a float64 `arange` of 1e5-microsecond steps truncated toward
    zero; at the 0.1 s step every value of that grid is an exact multiple of 100 ms, so integer
    arithmetic gives the same times."""
    return STEP_US * np.arange(first_step, last_step + 1, dtype=np.int64)


class PhysicalAIAVDataset:
    """A local PhysicalAI-AV root (layout in the module docstring): its clip list and samples.

    Opening reads features.csv, clip_index.parquet and (if present) the feature-presence table;
    samples are read on demand by `read`, which is safe to call from several threads at once.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        features_file: str = FEATURES_FILE,
        clip_index_file: str = CLIP_INDEX_FILE,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"PhysicalAI-AV dataset root not found (or not a directory): {self.root}")
        kit = devkit()
        self._kit = kit
        features_path = self.root / features_file
        index_path = self.root / clip_index_file
        for path in (features_path, index_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: a PhysicalAI-AV root holds {features_file} and {clip_index_file}"
                )
        try:
            features = kit.pandas.read_csv(features_path, index_col="feature")
            features["clip_files_in_zip"] = features["clip_files_in_zip"].map(json.loads, na_action="ignore")
            self.features = kit.dataset.Features(features)
        except (ValueError, KeyError, TypeError) as error:
            raise DatasetError(f"{features_path}: not a PhysicalAI-AV features table ({error})") from None
        try:
            self.clip_index = kit.pandas.read_parquet(index_path)
        except kit.errors as error:
            raise DatasetError(f"{index_path}: cannot read the clip index ({error})") from None
        if "chunk" not in self.clip_index.columns:
            raise DatasetError(f"{index_path}: no `chunk` column (columns: {list(self.clip_index.columns)})")
        presence_path = self.root / FEATURE_PRESENCE_FILE
        self.feature_presence = kit.pandas.read_parquet(presence_path) if presence_path.is_file() else None

    # -- clips and their keyframes ---------------------------------------------------------------

    def clip_ids(self, chunks: Iterable[int] | None = None, *, require_events: bool | None = None) -> list[str]:
        """Clip ids in clip-index order, optionally only those of `chunks`.

        With `require_events` (default: whenever the index has `event_t0s`, as the reference's
        local loader does), only clips with at least one usable event (`event_t0s_us`) are listed.
        """
        index = self.clip_index
        if chunks is not None:
            index = index[index["chunk"].isin(list(chunks))]
        if require_events is None:
            require_events = "event_t0s" in index.columns
        ids = [str(clip_id) for clip_id in index.index]
        if require_events:
            ids = [clip_id for clip_id in ids if len(self.event_t0s_us(clip_id))]
        return ids

    def chunk(self, clip_id: str) -> int:
        """The chunk holding `clip_id`'s files."""
        self._check_clip(clip_id)
        return int(self.clip_index.at[clip_id, "chunk"])

    def event_t0s_us(self, clip_id: str) -> np.ndarray:
        """The clip's event times (int64 microseconds) usable as t0, as the reference filters them:
        at least 1.6 s into the clip and, when the index has `end_timestamp`, at least 6.4 s before
        it. Empty when the index has no `event_t0s`."""
        self._check_clip(clip_id)
        if "event_t0s" not in self.clip_index.columns:
            return np.zeros(0, np.int64)
        events = self.clip_index.at[clip_id, "event_t0s"]
        if events is None or len(events) == 0:
            return np.zeros(0, np.int64)
        events = np.asarray(events, dtype=np.int64)
        keep = events >= EVENT_START_MARGIN_US
        if "end_timestamp" in self.clip_index.columns:
            keep &= events + EVENT_END_MARGIN_US <= int(self.clip_index.at[clip_id, "end_timestamp"])
        return events[keep]

    def _check_clip(self, clip_id: str) -> None:
        if not isinstance(clip_id, str) or clip_id not in self.clip_index.index:
            raise DatasetError(f"unknown clip id {clip_id!r}: not in {self.root / CLIP_INDEX_FILE}")

    # -- one sample -------------------------------------------------------------------------------

    def read(
        self,
        clip_id: str,
        t0_us: int = DEFAULT_T0_US,
        *,
        cameras: Sequence[str] = CAMERA_NAMES,
        num_frames: int = 4,
        num_history: int = 16,
        num_future: int = 64,
    ) -> PhysicalAIAVSample:
        """The sample of `clip_id` at `t0_us` (integer microseconds on the clip's clock), as the
        reference's loader makes it (see the module docstring). `cameras` are names of
        `CAMERA_NAMES`, in any order; the clip has them in index order."""
        self._check_clip(clip_id)
        if isinstance(t0_us, (bool, float)) or not isinstance(t0_us, (int, np.integer)):
            raise DatasetError(
                f"{clip_id}: t0_us must be an integer number of microseconds, got {t0_us!r} "
                f"(use seconds_to_us(seconds) to convert, e.g. seconds_to_us(5.1) = {DEFAULT_T0_US})"
            )
        t0_us = int(t0_us)
        if t0_us <= num_history * STEP_US:  # the reference's condition (not the 1.5 s the history spans)
            raise DatasetError(
                f"{clip_id}: t0_us={t0_us} is too early: it must exceed {num_history} x {TIME_STEP} s = "
                f"{num_history * STEP_US} us (t0 is in microseconds)"
            )
        names = _checked_cameras(cameras)
        chunk = self.chunk(clip_id)

        history_us = t0_us + _offsets_us(1 - num_history, 0)
        future_us = t0_us + _offsets_us(1, num_future)
        history, future = self._ego_poses(clip_id, chunk, t0_us, history_us, future_us)
        frame_times_us = t0_us + _offsets_us(1 - num_frames, 0)
        decoded, times = [], []
        for name in names:
            images, stamps = self._camera_frames(clip_id, chunk, name, frame_times_us)
            decoded.append(images)  # (F, H, W, 3)
            times.append(stamps.astype(np.int64))
        frames = _camera_array(decoded)
        frame_timestamps = np.stack(times)
        relative = (frame_timestamps.min(axis=0) - t0_us) / 1e6
        try:
            clip = Clip.create(
                frames,
                history[0],
                history[1],
                timestamps=relative,
                camera_names=names,
                ego_future_xyz=future[0],
                ego_future_rot=future[1],
                num_cameras=len(names),
                num_frames=num_frames,
                num_history=num_history,
                num_future=num_future,
            )
        except ClipError as error:
            raise DatasetError(f"{clip_id} at t0_us={t0_us}: the sample is not a valid clip: {error}") from None
        return PhysicalAIAVSample(
            clip_id=clip_id,
            t0_us=t0_us,
            clip=clip,
            camera_indices=tuple(CAMERA_INDEX[name] for name in names),
            frame_timestamps_us=read_only(frame_timestamps),
        )

    def _ego_poses(self, clip_id, chunk, t0_us, history_us, future_us):
        """((T, 3), (T, 3, 3)) history and ((N, 3), (N, 3, 3)) future, float32, t0 ego frame."""
        kit = self._kit
        member, data = self._member(clip_id, chunk, EGOMOTION_FEATURE, "egomotion")
        try:
            table = kit.pandas.read_parquet(io.BytesIO(data))
            times = table["timestamp"].to_numpy(dtype=np.int64, copy=True)
            state = kit.egomotion.EgomotionState.from_egomotion_df(table)
            interpolator = state.create_interpolator(times)
        except kit.errors as error:  # pyarrow, pandas (missing columns) and scipy (bad times) errors
            raise DatasetError(f"{clip_id}: cannot read its egomotion {member} ({error})") from None
        first, last = int(times[0]), int(times[-1])
        if history_us[0] < first or future_us[-1] > last:
            raise DatasetError(
                f"{clip_id}: t0_us={t0_us} is out of range: the sample needs egomotion from "
                f"{history_us[0]} to {future_us[-1]} us, the clip has {first} to {last} us"
            )
        poses = interpolator(np.concatenate([history_us, future_us])).pose
        xyz, rotation = np.asarray(poses.translation, np.float64), poses.rotation
        t0_index = len(history_us) - 1
        to_local = rotation[t0_index].inv()
        local_xyz = to_local.apply(xyz - xyz[t0_index]).astype(np.float32)
        local_rot = (to_local * rotation).as_matrix().astype(np.float32)
        split = len(history_us)
        return (local_xyz[:split], local_rot[:split]), (local_xyz[split:], local_rot[split:])

    def _camera_frames(self, clip_id, chunk, camera, frame_times_us):
        """(F, H, W, 3) uint8 frames and their (F,) timestamps: for each requested time the latest
        frame at or before it."""
        feature = camera_feature(camera)
        video_member, video = self._member(clip_id, chunk, feature, "video")
        times_member, times_data = self._member(clip_id, chunk, feature, "frame_timestamps")
        try:
            stamps = self._kit.pandas.read_parquet(io.BytesIO(times_data))["timestamp"].to_numpy(
                dtype=np.int64, copy=True
            )
        except self._kit.errors as error:
            raise DatasetError(f"{clip_id}: cannot read the frame times {times_member} ({error})") from None
        if len(stamps) == 0 or frame_times_us[0] < stamps[0] or frame_times_us[-1] > stamps[-1]:
            span = f"{stamps[0]} to {stamps[-1]} us" if len(stamps) else "no frames"
            raise DatasetError(
                f"{clip_id}: camera {camera} has frames from {span}; the sample needs frames at "
                f"{frame_times_us.tolist()} us"
            )
        reader = None
        try:
            reader = self._kit.video.SeekVideoReader(video_data=io.BytesIO(video), timestamps=stamps)
            images, used = reader.decode_images_from_timestamps(frame_times_us)
        except self._kit.errors as error:  # PyAV's decoding errors, the reader's ValueErrors
            raise DatasetError(f"{clip_id}: cannot decode camera {camera} from {video_member} ({error})") from None
        finally:
            if reader is not None:
                reader.close()
        return np.asarray(images, np.uint8), np.asarray(used, np.int64)

    def _member(self, clip_id: str, chunk: int, feature: str, alias: str) -> tuple[str, bytes]:
        """(member name, bytes) of one of the clip's files of `feature` in its chunk zip."""
        if feature not in self.features.features_df.index:
            kind = "camera" if feature.startswith("camera_") else "feature"
            raise DatasetError(
                f"{clip_id}: the dataset has no {kind} {feature!r} ({self.root / FEATURES_FILE} lists: "
                f"{', '.join(self.features.features_df.index)})"
            )
        presence = self.feature_presence
        if (presence is not None and feature in presence.columns and clip_id in presence.index
                and not bool(presence.at[clip_id, feature])):
            raise DatasetError(f"{clip_id}: the clip has no {feature} ({self.root / FEATURE_PRESENCE_FILE})")
        path = self.root / self.features.get_chunk_feature_filename(chunk, feature)
        try:
            member = self.features.get_clip_files_in_zip(clip_id, feature)[alias]
        except (ValueError, KeyError):
            raise DatasetError(f"{self.root / FEATURES_FILE}: {feature} has no zip member {alias!r}") from None
        if not path.is_file():
            raise DatasetError(f"{clip_id}: {feature} chunk file not found: {path}")
        try:
            with zipfile.ZipFile(path) as archive:
                return member, archive.read(member)
        except KeyError:
            raise DatasetError(f"{clip_id}: {path} has no {member} (the clip's {feature} {alias})") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as error:
            raise DatasetError(f"{clip_id}: cannot read {member} from {path}: corrupt zip ({error})") from None


def _camera_array(decoded: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """The cameras' (F, H, W, 3) frames as one read-only (C, F, H, W, 3) array that preprocessing
    reads in place (`image.aligned_stack`), the frames' one copy; per camera when the
    cameras' sizes differ."""
    if len({camera.shape for camera in decoded}) > 1:
        return decoded
    return read_only(aligned_stack(decoded))


def _checked_cameras(cameras: Sequence[str]) -> tuple[str, ...]:
    """`cameras` as a tuple in camera-index order; raises DatasetError for unknown or repeated names."""
    if isinstance(cameras, str):
        raise DatasetError(f"cameras: expected a sequence of camera names, got the string {cameras!r}")
    names = tuple(cameras)
    unknown = [name for name in names if name not in CAMERA_NAMES]
    if unknown or not names:
        raise DatasetError(f"cameras: unknown camera(s) {unknown}; the model's cameras are {', '.join(CAMERA_NAMES)}")
    if len(set(names)) != len(names):
        raise DatasetError(f"cameras: repeated names in {list(names)}")
    return tuple(sorted(names, key=CAMERA_INDEX.__getitem__))


def read_clip(root: str | os.PathLike, clip_id: str, t0_us: int = DEFAULT_T0_US, **options) -> Clip:
    """The `Clip` of `clip_id` at `t0_us` from the dataset at `root` (`PhysicalAIAVDataset.read`)."""
    return PhysicalAIAVDataset(root).read(clip_id, t0_us, **options).clip
