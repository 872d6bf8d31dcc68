"""A small synthetic PhysicalAI-AV dataset, in the real dataset's layout, for tests and demos.

`write_synthetic_dataset(root, num_clips=..., seed=...)` writes a dataset root that the devkit's
readers and `alpamayo_jax.data.physical_ai_av` read like a downloaded one (the layout is in that
module's docstring): features.csv, clip_index.parquet (chunk, event_t0s, end_timestamp),
metadata/feature_presence.parquet and metadata/data_collection.parquet, and per chunk one zip per
camera (<clip>.<camera>.mp4, H.264 through PyAV, and <clip>.<camera>.timestamps.parquet) and one
egomotion zip (<clip>.egomotion.parquet). Calibration, lidar, radar and the blurred-box tables of
the real dataset are not written.

Each clip is `duration_s` long (default 12 s: t0 = 5.1 s needs egomotion up to 11.5 s) on its own
microsecond clock. The ego drives from the anchor pose (the origin, heading +x, as the real
egomotion starts) along a road of varying curvature and grade at a varying speed; egomotion is
sampled at `egomotion_hz` from a small offset (so the 10 Hz sample times fall between samples),
velocity and acceleration in the anchor frame. Each camera looks from 1.6 m above the ground in
its own direction (cross cameras 60 degrees to the side, the tele camera narrow) at a world-fixed
pattern of soft road markings that fades with distance, under a sky whose colour follows the
world heading, so the pictures move with the ego. Camera clocks start at their own offset with a
little jitter on every frame time, at `fps` frames per second over the whole clip.

Everything is a pure function of (seed, clip number): clip k is the same whatever `num_clips`
is, and the same arguments and library versions write byte-identical files (single-threaded
x264 without macroblock-tree rate control, fixed zip dates).
The root appears complete or not at all (`io.atomic.atomic_directory`).

`add_arguments` / `main` are the `alpamayo-jax make-dataset` command.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from alpamayo_jax.data.physical_ai_av import (
    CAMERA_INDEX,
    CLIP_INDEX_FILE,
    EGOMOTION_FEATURE,
    EVENT_END_MARGIN_US,
    EVENT_START_MARGIN_US,
    FEATURE_PRESENCE_FILE,
    FEATURES_FILE,
    INSTALL_HINT,
    camera_feature,
)
from alpamayo_jax.io.atomic import atomic_directory
from alpamayo_jax.processing.clip import CAMERA_NAMES

# Camera name -> (yaw of its optical axis from the ego's forward axis, horizontal field of view), degrees.
CAMERA_VIEWS = {
    "cross_left_120fov": (60.0, 120.0),
    "front_wide_120fov": (0.0, 120.0),
    "cross_right_120fov": (-60.0, 120.0),
    "rear_left_70fov": (135.0, 70.0),
    "rear_tele_30fov": (180.0, 30.0),
    "rear_right_70fov": (-135.0, 70.0),
    "front_tele_30fov": (0.0, 30.0),
}
CAMERA_HEIGHT = 1.6  # metres above the ground
CAMERA_FOLDER = "camera"
LABELS_FOLDER = "labels"
DATA_COLLECTION_FILE = "metadata/data_collection.parquet"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member dates: the same arguments write the same bytes
_DENSE_HZ = 1000  # the drive is integrated on a 1 ms grid and interpolated from it
_EGOMOTION_COLUMNS = ("x", "y", "z", "qx", "qy", "qz", "qw", "vx", "vy", "vz", "ax", "ay", "az", "curvature")


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    """What `write_synthetic_dataset` wrote: the root, its clip ids (clip-index order) and the
    chunk of each clip."""

    root: Path
    clip_ids: tuple[str, ...]
    chunks: tuple[int, ...]


def write_synthetic_dataset(
    root: str | os.PathLike,
    *,
    num_clips: int,
    seed: int,
    image_size: tuple[int, int] = (32, 48),
    cameras: Sequence[str] = CAMERA_NAMES,
    duration_s: float = 12.0,
    clips_per_chunk: int = 100,
    first_chunk: int = 0,
    fps: int = 30,
    egomotion_hz: float = 100.0,
    crf: int = 18,
    force: bool = False,
) -> SyntheticDataset:
    """Writes a synthetic dataset of `num_clips` clips at `root` (see the module docstring).

    `image_size` is (height, width) of every camera, even numbers (H.264 4:2:0); `cameras` are
    camera names of the real rig (`CAMERA_VIEWS`); clips fill chunks `first_chunk`, ... with
    `clips_per_chunk` clips each; `crf` is the x264 quality (lower: closer to the rendered
    pictures, larger files). An existing `root` raises FileExistsError unless `force`.
    Needs the `data` extra (PyAV, pyarrow, pandas)."""
    height, width = image_size
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if height < 2 or width < 2 or height % 2 or width % 2:
        raise ValueError(f"image_size must be even and at least 2x2 (H.264 4:2:0), got {image_size}")
    unknown = [name for name in cameras if name not in CAMERA_VIEWS]
    if unknown or not cameras or len(set(cameras)) != len(cameras):
        raise ValueError(f"cameras: expected distinct names of {', '.join(CAMERA_VIEWS)}, got {list(cameras)}")
    if duration_s < 8.5:
        raise ValueError(f"duration_s must be >= 8.5 s (an event needs 1.6 s before and 6.4 s after it), got {duration_s}")
    if clips_per_chunk < 1 or first_chunk < 0 or fps < 1 or egomotion_hz < 10:
        raise ValueError("clips_per_chunk >= 1, first_chunk >= 0, fps >= 1 and egomotion_hz >= 10 are required")
    libs = _libraries()
    cameras = sorted(cameras, key=CAMERA_INDEX.__getitem__)
    duration_us = round(duration_s * 1e6)

    clips = [_synthetic_clip(seed, k, duration_us, egomotion_hz) for k in range(num_clips)]
    chunks = [first_chunk + k // clips_per_chunk for k in range(num_clips)]
    features = [camera_feature(name) for name in cameras] + [EGOMOTION_FEATURE]
    with atomic_directory(root, force=force) as staging:
        _write_features(staging / FEATURES_FILE, cameras)
        members: dict[tuple[str, int], list[tuple[str, bytes]]] = {}
        for clip, chunk in zip(clips, chunks, strict=True):
            members.setdefault((EGOMOTION_FEATURE, chunk), []).append(
                (f"{clip.clip_id}.egomotion.parquet", _parquet(libs, clip.egomotion_table()))
            )
            for name in cameras:
                stamps = clip.frame_timestamps(name, fps)
                frames = _render(clip, name, stamps, height, width)
                feature = camera_feature(name)
                members.setdefault((feature, chunk), []).extend([
                    (f"{clip.clip_id}.{feature}.mp4", _encode_video(libs, frames, fps, crf)),
                    (f"{clip.clip_id}.{feature}.timestamps.parquet", _parquet(libs, {"timestamp": stamps})),
                ])
        for (feature, chunk), files in members.items():
            path = staging / _chunk_path(feature).format(chunk_id=chunk)
            path.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
                for name, data in files:
                    archive.writestr(zipfile.ZipInfo(name, date_time=_ZIP_DATE), data)

        clip_ids = [clip.clip_id for clip in clips]
        pandas = libs.pandas
        index = pandas.Index(clip_ids, name="clip_id")
        clip_index = pandas.DataFrame(
            {
                "chunk": np.asarray(chunks, np.int64),
                "event_t0s": [clip.event_t0s_us for clip in clips],
                "end_timestamp": np.asarray([clip.egomotion_us[-1] for clip in clips], np.int64),
            },
            index=index,
        )
        presence = pandas.DataFrame({feature: np.ones(num_clips, bool) for feature in features}, index=index)
        collection = pandas.DataFrame({"source": ["synthetic"] * num_clips}, index=index)
        (staging / "metadata").mkdir()
        for relative, frame in ((CLIP_INDEX_FILE, clip_index), (FEATURE_PRESENCE_FILE, presence),
                                (DATA_COLLECTION_FILE, collection)):
            (staging / relative).write_bytes(_parquet(libs, frame))
    return SyntheticDataset(root=Path(root), clip_ids=tuple(clip_ids), chunks=tuple(chunks))


# ---------------------------------------------------------------------------------------------
# The drive of one clip
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _SyntheticClip:
    """One clip's id, event times, egomotion sample times and its drive on a dense 1 ms grid."""

    clip_id: str
    seed: tuple[int, int]
    event_t0s_us: np.ndarray  # (E,) int64
    egomotion_us: np.ndarray  # (M,) int64 sample times
    dense_s: np.ndarray  # (D,) seconds
    position: np.ndarray  # (D, 3) metres, anchor frame
    yaw: np.ndarray  # (D,) radians
    pitch: np.ndarray  # (D,) radians, > 0 nose down (rotation about +y)
    curvature: np.ndarray  # (D,) 1/m

    def at(self, times_us: np.ndarray):
        """(position (S, 3), yaw (S,), pitch (S,), curvature (S,)) at `times_us`, linearly
        interpolated from the dense grid."""
        t = np.asarray(times_us, np.float64) / 1e6
        position = np.stack([np.interp(t, self.dense_s, self.position[:, i]) for i in range(3)], axis=-1)
        return (position, np.interp(t, self.dense_s, self.yaw), np.interp(t, self.dense_s, self.pitch),
                np.interp(t, self.dense_s, self.curvature))

    def egomotion_table(self) -> dict[str, np.ndarray]:
        """The egomotion parquet's columns at the egomotion sample times."""
        from scipy.spatial.transform import Rotation

        times = self.egomotion_us
        position, yaw, pitch, curvature = self.at(times)
        dense_velocity = np.gradient(self.position, self.dense_s, axis=0)
        dense_acceleration = np.gradient(dense_velocity, self.dense_s, axis=0)
        t = times / 1e6
        velocity = np.stack([np.interp(t, self.dense_s, dense_velocity[:, i]) for i in range(3)], axis=-1)
        acceleration = np.stack([np.interp(t, self.dense_s, dense_acceleration[:, i]) for i in range(3)], axis=-1)
        quaternion = Rotation.from_euler("ZY", np.stack([yaw, pitch], axis=-1)).as_quat()  # x, y, z, w
        columns = np.concatenate([position, quaternion, velocity, acceleration, curvature[:, None]], axis=-1)
        return {"timestamp": times, **{name: columns[:, i] for i, name in enumerate(_EGOMOTION_COLUMNS)}}

    def frame_timestamps(self, camera: str, fps: int) -> np.ndarray:
        """(n,) int64 frame times of `camera`: its own start offset, `fps` frames per second up to
        the end of the clip, a little jitter on each; strictly increasing."""
        rng = np.random.default_rng([*self.seed, 1 + CAMERA_INDEX[camera]])
        period = 1e6 / fps
        offset = rng.uniform(0.0, period)
        count = int((self.egomotion_us[-1] - offset - period / 2) // period) + 1
        jitter = rng.integers(-int(period / 20), int(period / 20), size=count, endpoint=True)
        return np.round(offset + period * np.arange(count) + jitter).astype(np.int64)


def _synthetic_clip(seed: int, number: int, duration_us: int, egomotion_hz: float) -> _SyntheticClip:
    """Clip `number` of the dataset of `seed`."""
    rng = np.random.default_rng([seed, number])
    clip_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    duration_s = duration_us / 1e6
    t = np.arange(int(duration_s * _DENSE_HZ) + 2) / _DENSE_HZ  # a little past the end
    # Speed between ~3 and ~20 m/s, changing smoothly; curvature and grade as sums of slow waves.
    base_speed = rng.uniform(6.0, 14.0)
    speed = base_speed + rng.uniform(1.0, 4.0) * np.sin(2 * np.pi * t / rng.uniform(5.0, 12.0) + rng.uniform(0, 6.3))
    speed += rng.uniform(0.0, 1.5) * np.sin(2 * np.pi * t / rng.uniform(2.0, 4.0) + rng.uniform(0, 6.3))
    curvature = rng.uniform(-0.02, 0.02) + rng.uniform(0.0, 0.02) * np.sin(
        2 * np.pi * t / rng.uniform(6.0, 15.0) + rng.uniform(0, 6.3))
    grade = rng.uniform(-0.03, 0.03) * np.sin(2 * np.pi * t / rng.uniform(8.0, 20.0) + rng.uniform(0, 6.3))
    dt = 1.0 / _DENSE_HZ
    distance = np.concatenate([[0.0], np.cumsum((speed[1:] + speed[:-1]) / 2 * dt)])
    ds = np.diff(distance, prepend=0.0)
    yaw = np.cumsum(curvature * ds)
    pitch = -np.arctan(grade)  # climbing (grade > 0) is nose up: a negative rotation about +y
    horizontal = np.cos(np.arctan(grade))
    step = np.stack([np.cos(yaw) * horizontal, np.sin(yaw) * horizontal, grade * horizontal], axis=-1) * ds[:, None]
    position = np.cumsum(step, axis=0)
    position -= position[0]

    period_us = 1e6 / egomotion_hz
    start_us = int(rng.integers(1, int(period_us)))  # egomotion samples fall between the 10 Hz times
    egomotion_us = (start_us + np.round(period_us * np.arange(int((duration_us - start_us) // period_us) + 1))
                    ).astype(np.int64)
    # Events: usable times (room for the history and the future), plus one too early in some
    # clips, which the reference's event filter drops.
    latest = egomotion_us[-1] - EVENT_END_MARGIN_US
    events = rng.integers(EVENT_START_MARGIN_US + 100_000, latest, size=int(rng.integers(1, 4)), endpoint=True)
    if rng.random() < 0.5:
        events = np.append(events, rng.integers(300_000, EVENT_START_MARGIN_US - 100_000))
    events = np.sort((events // 1000) * 1000).astype(np.int64)  # whole milliseconds
    return _SyntheticClip(clip_id=clip_id, seed=(seed, number), event_t0s_us=events, egomotion_us=egomotion_us,
                          dense_s=t, position=position, yaw=yaw, pitch=pitch, curvature=curvature)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def _render(clip: _SyntheticClip, camera: str, times_us: np.ndarray, height: int, width: int) -> np.ndarray:
    """(n, H, W, 3) uint8 views of `camera` at `times_us`: soft world-fixed road markings on the
    ground plane fading into haze with distance, a sky shaded by world heading."""
    yaw_deg, fov_deg = CAMERA_VIEWS[camera]
    focal = (width / 2) / np.tan(np.radians(fov_deg) / 2)
    right = (np.arange(width) + 0.5 - width / 2) / focal  # per column, positive to the right
    up = -(np.arange(height) + 0.5 - height / 2) / focal  # per row, positive upwards
    position, ego_yaw, _, _ = clip.at(times_us)
    heading = ego_yaw[:, None, None] + np.radians(yaw_deg) - np.arctan(right)[None, None, :]  # (n, 1, W)
    ground = up < 0
    reach = np.where(ground, CAMERA_HEIGHT / np.where(ground, -up, 1.0), 0.0)[None, :, None]  # (1, H, 1)
    reach = reach * np.sqrt(1 + right**2)[None, None, :]  # along the ray's ground direction
    gx = position[:, 0, None, None] + reach * np.cos(heading)
    gy = position[:, 1, None, None] + reach * np.sin(heading)
    markings = (np.clip((np.cos(2 * np.pi * gx / 6.0) - 0.7) / 0.3, 0, 1)
                + np.clip((np.cos(2 * np.pi * gy / 3.5) - 0.8) / 0.2, 0, 1))
    haze = np.exp(-reach / 25.0)
    tint = np.array([8.0, 0.0, -8.0]) * np.cos(np.radians(yaw_deg))
    road = (70 + 150 * np.minimum(markings, 1.0))[..., None] + tint
    road = haze[..., None] * road + (1 - haze[..., None]) * np.array([150.0, 150.0, 155.0])
    shade = (np.sin(3 * heading) + 0.5 * np.sin(heading + 1.0))[..., None]  # (n, 1, W, 1)
    sky = np.array([110.0, 150.0, 215.0]) + 25.0 * shade * np.array([1.0, 0.6, -0.4])
    sky = sky + 30.0 * up[None, :, None, None]
    image = np.where(ground[None, :, None, None], road, np.broadcast_to(sky, road.shape))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _libraries():
    try:
        import av
        import pandas
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:
        raise ImportError(f"writing the synthetic dataset needs PyAV, pyarrow and pandas ({error}); "
                          f"install them with: {INSTALL_HINT}") from error
    return SimpleNamespace(av=av, pandas=pandas, pyarrow=pyarrow, parquet=pyarrow.parquet)


def _chunk_path(feature: str) -> str:
    folder = CAMERA_FOLDER if feature.startswith("camera_") else LABELS_FOLDER
    return f"{folder}/{feature}/{feature}.chunk_{{chunk_id:04d}}.zip"


def _write_features(path: Path, cameras: Sequence[str]) -> None:
    """features.csv: one row per written feature, with its chunk path and zip member templates."""
    rows = []
    for name in cameras:
        feature = camera_feature(name)
        members = {"video": f"{{clip_id}}.{feature}.mp4",
                   "frame_timestamps": f"{{clip_id}}.{feature}.timestamps.parquet"}
        rows.append((feature, CAMERA_FOLDER, _chunk_path(feature), json.dumps(members)))
    members = {"egomotion": f"{{clip_id}}.{EGOMOTION_FEATURE}.parquet"}
    rows.append((EGOMOTION_FEATURE, LABELS_FOLDER, _chunk_path(EGOMOTION_FEATURE), json.dumps(members)))
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("feature", "directory", "chunk_path", "clip_files_in_zip"))
        writer.writerows(rows)


def _parquet(libs, data) -> bytes:
    """A parquet file's bytes from a dict of columns or a DataFrame (its index kept)."""
    pa = libs.pyarrow
    if isinstance(data, dict):
        table = pa.table(data)
    else:
        table = pa.Table.from_pandas(data, preserve_index=True)
    sink = io.BytesIO()
    libs.parquet.write_table(table, sink)
    return sink.getvalue()


def _encode_video(libs, frames: np.ndarray, fps: int, crf: int) -> bytes:
    """(n, H, W, 3) uint8 frames as an H.264 (yuv420p) mp4 at constant `fps`, one key frame per
    second. Reproducible bytes need one thread and no macroblock-tree rate control (x264's mbtree
    occasionally encodes the same frames differently from run to run)."""
    buffer = io.BytesIO()
    with libs.av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "g": str(fps), "preset": "medium", "threads": "1",
                          "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        for image in frames:
            for packet in stream.encode(libs.av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _image_size(value: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 32x48, got {value!r}") from None
    return height, width


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `alpamayo-jax make-dataset`."""
    parser.add_argument("--out", type=Path, required=True, help="dataset root to create")
    parser.add_argument("--clips", type=int, default=4, help="number of clips (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything written (default: 0)")
    parser.add_argument("--image-size", type=_image_size, default=(32, 48),
                        help="HEIGHTxWIDTH of every camera, even numbers (default: 32x48)")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per clip (default: 12)")
    parser.add_argument("--clips-per-chunk", type=int, default=100, help="clips per chunk file (default: 100)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def main(args: argparse.Namespace) -> int:
    """`alpamayo-jax make-dataset`: writes the dataset and prints what it wrote."""
    dataset = write_synthetic_dataset(args.out, num_clips=args.clips, seed=args.seed, image_size=args.image_size,
                                      duration_s=args.duration, clips_per_chunk=args.clips_per_chunk,
                                      force=args.force)
    chunks = sorted(set(dataset.chunks))
    print(f"wrote {len(dataset.clip_ids)} synthetic clip(s) in chunk(s) {', '.join(map(str, chunks))} "
          f"to {dataset.root}")
    return 0
