"""Figures of trajectories and clips (matplotlib, headless): a bird's-eye view of the ego history,
the ground truth and the sampled trajectories; a mosaic of a clip's camera frames with trajectories
projected into the front camera; and a summary of the errors over many clips.

The `plot_*` functions build and return a `matplotlib.figure.Figure`; `save_figure` renders one to
a PNG file, written atomically (`alpamayo_jax.io.atomic.write_atomically`). Figures are made
without pyplot: no GUI backend is ever selected (PNGs are rendered by Agg), and pyplot's registry
of open figures never holds them, so a figure is freed with its last reference and there is nothing
to close.

Coordinates are the t0 ego frame, in metres: x forward, y left, z up; the ego at t0 is the origin.
The bird's-eye view draws x upwards and y leftwards (the horizontal axis shows y, increasing to the
left), so the picture is what a viewer above the car, facing forward, sees.

Shape legend: H history poses (16), S sampled trajectories, W waypoints (64), C clips (in a
summary) or cameras (in a mosaic), F frames per camera.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from alpamayo_jax.io.atomic import write_atomically
from alpamayo_jax.processing.clip import CAMERA_NAMES, FRAME_DT, Clip

HISTORY_COLOUR = "#6e6e6e"
GROUND_TRUTH_COLOUR = "#000000"
# Matplotlib's tab10 without its grey (the history's colour); sample i gets colour i modulo 9.
SAMPLE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                  "#17becf")
EGO_LABEL = "ego at t0"
MAX_SAMPLE_LABELS = 9  # more samples than this share one legend entry
MIN_SPAN = 10.0  # metres: the bird's-eye view shows at least this much around the trajectories
MIN_DEPTH = 0.1  # metres in front of the camera below which projected points are dropped
FRONT_CAMERA = "front_wide_120fov"


def sample_colour(index: int) -> str:
    """The colour of sample `index` in every figure of this module."""
    return SAMPLE_COLOURS[index % len(SAMPLE_COLOURS)]


# ---------------------------------------------------------------------------------------------
# Bird's-eye view
# ---------------------------------------------------------------------------------------------


def plot_bird_eye_view(
    history_xyz: np.ndarray,
    samples_xyz: np.ndarray | Sequence[np.ndarray],
    *,
    ground_truth_xyz: np.ndarray | None = None,
    best: int | None = None,
    title: str = "",
    size_inches: float = 6.0,
) -> Figure:
    """The ego history (H, 3) in grey, the ground-truth future (W, 3) dashed black on top (optional), each
    sampled trajectory of `samples_xyz` (S, W, 3) (or a sequence of (W_s, 3) arrays) in its
    `sample_colour`, sample `best` drawn thicker on top (optional), and the ego at t0 as a black
    triangle. Futures are drawn from the ego's t0 position (the origin). Axes in metres, equal
    aspect, at least `MIN_SPAN` wide. Only x and y are used (z is ignored; (.., 2) arrays work too).

    Raises ValueError for wrong shapes, non-finite values or a `best` index out of range."""
    history = _xy("history_xyz", history_xyz)
    samples = [_xy(f"samples_xyz[{i}]", path) for i, path in enumerate(_paths(samples_xyz))]
    truth = None if ground_truth_xyz is None else _xy("ground_truth_xyz", ground_truth_xyz)
    if best is not None and not (isinstance(best, (int, np.integer)) and 0 <= best < len(samples)):
        raise ValueError(f"best must be a sample index in [0, {len(samples)}), got {best!r}")
    origin = np.zeros((1, 2))

    fig = Figure(figsize=(size_inches, size_inches), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(history[:, 1], history[:, 0], color=HISTORY_COLOUR, linewidth=3, label="history", zorder=2)
    if truth is not None:
        path = np.concatenate([origin, truth])
        # On top of the samples, dashed, so that a sample under it still shows.
        ax.plot(path[:, 1], path[:, 0], color=GROUND_TRUTH_COLOUR, linewidth=1.8, linestyle="--",
                label="ground truth", zorder=5.5)
    for index, sample in enumerate(samples):
        path = np.concatenate([origin, sample])
        if index == best:
            label = f"best: sample {index}"
        elif len(samples) <= MAX_SAMPLE_LABELS:
            label = f"sample {index}"
        else:
            first_other = 1 if best == 0 else 0
            label = f"samples ({len(samples)})" if index == first_other else None
        ax.plot(path[:, 1], path[:, 0], color=sample_colour(index), label=label,
                linewidth=3.5 if index == best else 1.8, zorder=5 if index == best else 3)
    ax.plot([0.0], [0.0], linestyle="none", marker="^", markersize=10, color="black", label=EGO_LABEL, zorder=6)

    points = np.concatenate([history, origin, *samples, *([] if truth is None else [truth])])
    low, high = points.min(axis=0), points.max(axis=0)
    centre, span = (low + high) / 2, max(float((high - low).max()), MIN_SPAN) * 1.15
    ax.set_ylim(centre[0] - span / 2, centre[0] + span / 2)
    ax.set_xlim(centre[1] + span / 2, centre[1] - span / 2)  # y left drawn leftwards: decreasing
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("y, left [m]")
    ax.set_ylabel("x, forward [m]")
    ax.grid(True, color="0.9", zorder=0)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title or f"{len(samples)} sampled trajectories")
    return fig


# ---------------------------------------------------------------------------------------------
# Camera mosaic
# ---------------------------------------------------------------------------------------------


def project_to_image(points_xyz: np.ndarray, intrinsics: np.ndarray, camera_from_ego: np.ndarray) -> np.ndarray:
    """Pinhole projection of ego-frame points (..., 3) to pixel coordinates (..., 2) = (column, row),
    NaN where a point is less than `MIN_DEPTH` in front of the camera (behind it, or too close).

    `camera_from_ego` (4, 4) maps homogeneous t0 ego-frame points (x forward, y left, z up, metres)
    to the camera frame in the computer-vision convention: x right, y down, z along the optical axis.
    `intrinsics` (3, 3) is the pinhole matrix [[fx, s, cx], [0, fy, cy], [0, 0, 1]] in pixels of the
    frames as stored (scale it with the image if the frames were resized), with integer coordinates
    at pixel centres: (0, 0) is the centre of the top-left pixel. Lens distortion is not modelled."""
    points = np.asarray(points_xyz, np.float64)
    intrinsics = np.asarray(intrinsics, np.float64)
    camera_from_ego = np.asarray(camera_from_ego, np.float64)
    if points.shape[-1:] != (3,):
        raise ValueError(f"points_xyz: expected shape (..., 3), got {points.shape}")
    if intrinsics.shape != (3, 3):
        raise ValueError(f"intrinsics: expected a (3, 3) pinhole matrix, got shape {intrinsics.shape}")
    if camera_from_ego.shape != (4, 4):
        raise ValueError(f"camera_from_ego: expected a (4, 4) transform, got shape {camera_from_ego.shape}")
    for name, array in (("intrinsics", intrinsics), ("camera_from_ego", camera_from_ego)):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: holds non-finite values")
    camera = points @ camera_from_ego[:3, :3].T + camera_from_ego[:3, 3]
    pixels = camera @ intrinsics.T
    depth = camera[..., 2:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = pixels[..., :2] / depth
    return np.where(depth >= MIN_DEPTH, uv, np.nan)


def plot_camera_mosaic(
    clip: Clip,
    *,
    trajectories_xyz: np.ndarray | None = None,
    intrinsics: np.ndarray | None = None,
    camera_from_ego: np.ndarray | None = None,
    camera: str = FRONT_CAMERA,
    best: int | None = None,
    title: str = "",
    panel_inches: float = 3.0,
) -> Figure:
    """The clip's frames as a grid, one row per camera and one column per frame (oldest first),
    each panel titled with the camera name and the frame time relative to t0.

    With `trajectories_xyz` ((W, 3) or (S, W, 3), t0 ego frame), `intrinsics` and `camera_from_ego`
    (see `project_to_image`) the trajectories are projected into the newest frame (t0) of `camera`,
    each in its `sample_colour` (sample `best` thicker); points less than `MIN_DEPTH` in front of
    the camera are dropped and the line breaks there. Without them nothing is projected. A clip
    without camera names is taken to hold `CAMERA_NAMES` in order when it has that many cameras.

    Raises ValueError when the projection is asked for with only one of `intrinsics` and
    `camera_from_ego`, or for a camera the clip does not have."""
    cameras = [np.asarray(frames) for frames in clip.camera_frames]
    names = _camera_names(clip, len(cameras))
    num_frames = len(cameras[0])
    if clip.timestamps is not None:
        times = [float(t) for t in clip.timestamps]
    else:
        times = [FRAME_DT * (f - (num_frames - 1)) for f in range(num_frames)]
    projected = None
    if trajectories_xyz is not None:
        if (intrinsics is None) != (camera_from_ego is None):
            raise ValueError("projecting trajectories needs both intrinsics and camera_from_ego")
        if intrinsics is not None:
            if camera not in names:
                raise ValueError(f"camera {camera!r} is not in the clip (cameras: {', '.join(names)})")
            paths = np.asarray(trajectories_xyz, np.float64)
            paths = paths[None] if paths.ndim == 2 else paths
            if paths.ndim != 3 or paths.shape[-1] != 3:
                raise ValueError(f"trajectories_xyz: expected shape (W, 3) or (S, W, 3), got {paths.shape}")
            if not np.isfinite(paths).all():
                raise ValueError("trajectories_xyz: holds non-finite values")
            projected = project_to_image(paths, intrinsics, camera_from_ego)  # (S, W, 2)

    aspect = max(frames.shape[2] / frames.shape[3] for frames in cameras)  # height / width
    fig = Figure(figsize=(panel_inches * num_frames, (panel_inches * aspect + 0.35) * len(cameras)),
                 layout="constrained")
    axes = fig.subplots(len(cameras), num_frames, squeeze=False)
    for c, frames in enumerate(cameras):
        height, width = frames.shape[2:]
        for f in range(num_frames):
            ax = axes[c, f]
            ax.imshow(frames[f].transpose(1, 2, 0), interpolation="nearest")
            ax.set_title(f"{names[c]}  t = {round(float(times[f]), 1) + 0.0:+.1f} s", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if projected is not None and names[c] == camera and f == num_frames - 1:
                for index, uv in enumerate(projected):
                    ax.plot(uv[:, 0], uv[:, 1], color=sample_colour(index),
                            linewidth=2.5 if index == best else 1.5, zorder=3 if index == best else 2)
                ax.set_xlim(-0.5, width - 0.5)
                ax.set_ylim(height - 0.5, -0.5)
    if title:
        fig.suptitle(title)
    return fig


def camera_axes(fig: Figure, clip: Clip, camera: str = FRONT_CAMERA, frame: int = -1) -> Axes:
    """The panel of `plot_camera_mosaic(clip)`'s figure that shows `camera`'s frame `frame`."""
    names = _camera_names(clip, len(clip.camera_frames))
    num_frames = len(clip.camera_frames[0])
    return fig.axes[names.index(camera) * num_frames + (frame % num_frames)]


# ---------------------------------------------------------------------------------------------
# Summary over clips
# ---------------------------------------------------------------------------------------------


def plot_summary(
    min_ade: np.ndarray,
    best_errors: np.ndarray,
    *,
    dt: float = 0.1,
    bins: int = 20,
    title: str = "",
) -> Figure:
    """Two panels: the histogram of the clips' minADE (C,), and the XY error over the horizon of
    each clip's best sample, `best_errors` (C, W) (`metrics.best_sample_errors`, one set), averaged
    over the clips, against the time after t0 (dt, 2 dt, ... W dt seconds).

    Raises ValueError for empty, mis-shaped or non-finite inputs."""
    min_ade = np.asarray(min_ade, np.float64)
    best_errors = np.asarray(best_errors, np.float64)
    if min_ade.ndim != 1 or min_ade.size == 0:
        raise ValueError(f"min_ade: expected a non-empty (C,) array, got shape {min_ade.shape}")
    if best_errors.ndim != 2 or best_errors.shape[0] != min_ade.shape[0] or best_errors.shape[1] == 0:
        raise ValueError(f"best_errors: expected shape ({min_ade.shape[0]}, W) with W > 0, got {best_errors.shape}")
    for name, array in (("min_ade", min_ade), ("best_errors", best_errors)):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: holds non-finite values")
    num_clips, num_steps = best_errors.shape

    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    hist_ax, time_ax = fig.subplots(1, 2)
    hist_ax.hist(min_ade, bins=bins, color=SAMPLE_COLOURS[0], edgecolor="white")
    hist_ax.axvline(min_ade.mean(), color="black", linestyle="--", label=f"mean {min_ade.mean():.3f} m")
    hist_ax.set_xlabel("minADE [m]")
    hist_ax.set_ylabel("clips")
    hist_ax.set_title(f"minADE of {num_clips} clip{'s' if num_clips != 1 else ''}")
    hist_ax.legend(fontsize="small")

    times = dt * np.arange(1, num_steps + 1)
    time_ax.plot(times, best_errors.mean(axis=0), color=SAMPLE_COLOURS[3], linewidth=2,
                 label=f"mean over {num_clips} clip{'s' if num_clips != 1 else ''}")
    time_ax.set_xlabel("time after t0 [s]")
    time_ax.set_ylabel("XY error of the best sample [m]")
    time_ax.set_title("error over the horizon")
    time_ax.set_xlim(0.0, times[-1])
    time_ax.set_ylim(bottom=0.0)
    time_ax.grid(True, color="0.9")
    time_ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: float | None = None) -> Path:
    """Renders `fig` to PNG (at `dpi`, by default the figure's own, 100) and writes it to `path`
    atomically: the file appears complete or not at all. Returns the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi if dpi is not None else "figure")
    data = buffer.getvalue()
    write_atomically(path, lambda file: file.write(data))
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _paths(samples) -> list:
    if isinstance(samples, np.ndarray) or hasattr(samples, "__array__"):
        array = np.asarray(samples)
        if array.ndim != 3:
            raise ValueError(f"samples_xyz: expected shape (S, W, 3), got {array.shape}")
        return list(array)
    return list(samples)


def _xy(name: str, value) -> np.ndarray:
    """(N, 2 or 3) -> finite (N, 2) float64 x, y."""
    array = np.asarray(value, np.float64)
    if array.ndim != 2 or array.shape[1] not in (2, 3) or array.shape[0] == 0:
        raise ValueError(f"{name}: expected shape (N, 3) or (N, 2) with N > 0, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: holds non-finite values")
    return array[:, :2]


def _camera_names(clip: Clip, num_cameras: int) -> list[str]:
    if clip.camera_names is not None:
        return list(clip.camera_names)
    if num_cameras == len(CAMERA_NAMES):
        return list(CAMERA_NAMES)
    return [f"camera {c}" for c in range(num_cameras)]
