"""Evaluation figures: the figures' contents (axes, labels, legends, lines, titles) and the written
PNGs decoded with Pillow (size, colours where they belong, the projection's pixels)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from PIL import Image

from alpamayo_jax.evaluation import plots
from alpamayo_jax.evaluation.plots import (
    EGO_LABEL,
    HISTORY_COLOUR,
    plot_bird_eye_view,
    plot_camera_mosaic,
    plot_summary,
    project_to_image,
    sample_colour,
    save_figure,
)
from alpamayo_jax.processing.clip import CAMERA_NAMES, Clip
from alpamayo_jax.processing.synthetic import arc_future, synthetic_clip

CURVATURES = (-0.03, -0.01, 0.0, 0.01, 0.02, 0.04)  # 1/m, > 0 turns left
IMAGE_SIZE = (96, 144)


@pytest.fixture(scope="module")
def clip() -> Clip:
    return synthetic_clip(0, image_size=IMAGE_SIZE, with_future=True)


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return np.stack([arc_future(8.0, k)[0] for k in CURVATURES])  # (6, 64, 3)


def _front_camera() -> tuple[np.ndarray, np.ndarray]:
    """A forward-looking pinhole camera 1.5 m ahead of and 1.4 m above the ego origin: the
    (3, 3) intrinsics for IMAGE_SIZE frames and the (4, 4) camera-from-ego transform."""
    height, width = IMAGE_SIZE
    intrinsics = np.array([[60.0, 0.0, (width - 1) / 2], [0.0, 60.0, (height - 1) / 2], [0.0, 0.0, 1.0]])
    camera_from_ego = np.eye(4)
    camera_from_ego[:3, :3] = [[0, -1, 0], [0, 0, -1], [1, 0, 0]]  # x right = -y, y down = -z, z = x
    camera_from_ego[:3, 3] = -camera_from_ego[:3, :3] @ np.array([1.5, 0.0, 1.4])
    return intrinsics, camera_from_ego


def _png(fig: Figure, tmp_path, name: str) -> np.ndarray:
    path = save_figure(fig, tmp_path / name)
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def _near(pixels: np.ndarray, colour: str, tolerance: int = 12) -> np.ndarray:
    """Mask of the pixels within `tolerance` (per channel) of `colour`."""
    target = np.round(np.array(to_rgb(colour)) * 255).astype(int)
    return (np.abs(pixels - target) <= tolerance).all(axis=-1)


def _pixel(ax, x: float, y: float, image_height: int) -> tuple[float, float]:
    """Data point (x, y) of `ax` -> (row, column) in the rendered PNG (after the figure was drawn)."""
    column, row_from_bottom = ax.transData.transform((x, y))
    return image_height - row_from_bottom, column


def _box(artist, image_height: int, margin: int = 0) -> tuple[slice, slice]:
    """The PNG rows and columns covered by `artist` (after the figure was drawn), grown by `margin`
    pixels on every side."""
    box = artist.get_window_extent()
    rows = slice(max(int(np.floor(image_height - box.y1)) - margin, 0), int(np.ceil(image_height - box.y0)) + margin)
    columns = slice(max(int(np.floor(box.x0)) - margin, 0), int(np.ceil(box.x1)) + margin)
    return rows, columns


# ---------------------------------------------------------------------------------------------
# Bird's-eye view
# ---------------------------------------------------------------------------------------------


def test_bird_eye_view_elements(clip, samples):
    fig = plot_bird_eye_view(clip.ego_history_xyz, samples, ground_truth_xyz=clip.ego_future_xyz, best=3,
                             title="clip 7")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xlabel() == "y, left [m]" and ax.get_ylabel() == "x, forward [m]"
    assert ax.get_title() == "clip 7"
    assert ax.get_aspect() == 1.0
    assert ax.xaxis_inverted() and not ax.yaxis_inverted()  # y left drawn leftwards, x forward upwards
    assert len(ax.get_xticks()) > 2 and len(ax.get_yticks()) > 2
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["history", "ground truth", "sample 0", "sample 1", "sample 2", "best: sample 3",
                      "sample 4", "sample 5", EGO_LABEL]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert len(ax.get_lines()) == 1 + 1 + len(samples) + 1
    ego = lines[EGO_LABEL]
    assert ego.get_marker() == "^" and ego.get_linestyle() == "None"
    assert list(ego.get_xdata()) == [0.0] and list(ego.get_ydata()) == [0.0]
    # Lines plot (y, x), futures start at the ego.
    sample = lines["sample 5"]
    np.testing.assert_allclose(sample.get_xdata()[1:], samples[5, :, 1], rtol=1e-6)
    np.testing.assert_allclose(sample.get_ydata()[1:], samples[5, :, 0], rtol=1e-6)
    assert sample.get_xdata()[0] == 0.0 and sample.get_ydata()[0] == 0.0
    assert lines["best: sample 3"].get_linewidth() > sample.get_linewidth()
    assert lines["best: sample 3"].get_zorder() > sample.get_zorder()
    assert to_rgb(sample.get_color()) == to_rgb(sample_colour(5))
    np.testing.assert_allclose(lines["history"].get_ydata(), clip.ego_history_xyz[:, 0], rtol=1e-6)
    assert lines["ground truth"].get_linestyle() == "--"


def test_bird_eye_view_png_shows_each_sample_where_it_drives(tmp_path, clip, samples):
    fig = plot_bird_eye_view(clip.ego_history_xyz, samples)
    pixels = _png(fig, tmp_path, "bev.png")
    assert pixels.shape == (600, 600, 3)  # 6 x 6 inches at 100 dpi
    ax = fig.axes[0]
    ego_row, ego_column = _pixel(ax, 0.0, 0.0, pixels.shape[0])
    assert _near(pixels, HISTORY_COLOUR).sum() > 50
    legend = _box(ax.get_legend(), pixels.shape[0], margin=2)
    for index, curvature in enumerate(CURVATURES):
        mask = _near(pixels, sample_colour(index))
        assert mask[legend].any(), f"sample {index}'s legend swatch is missing"
        mask[legend] = False  # the swatch is not part of the path
        rows, columns = np.nonzero(mask)
        assert len(rows) > 50, f"sample {index}'s colour is missing"
        ahead = rows < ego_row - 20  # forward is up
        assert ahead.sum() > 50, f"sample {index} does not go forward (up)"
        lateral = columns[ahead].mean() - ego_column
        if curvature > 0:
            assert lateral < -20, f"left turn {curvature} is not drawn to the left"
        elif curvature < 0:
            assert lateral > 20, f"right turn {curvature} is not drawn to the right"
        else:
            assert abs(lateral) < 5
    # The end of the straight sample is where its data says.
    end_row, end_column = _pixel(ax, samples[2, -1, 1], samples[2, -1, 0], pixels.shape[0])
    window = _near(pixels, sample_colour(2))[int(end_row) - 4:int(end_row) + 5, int(end_column) - 4:int(end_column) + 5]
    assert window.any()


def test_many_samples_share_one_legend_entry(clip):
    many = np.stack([arc_future(8.0, k)[0] for k in np.linspace(-0.05, 0.05, 12)])
    fig = plot_bird_eye_view(clip.ego_history_xyz, many, best=0)
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert legend == ["history", "best: sample 0", "samples (12)", EGO_LABEL]
    assert len(fig.axes[0].get_lines()) == 1 + 12 + 1


def test_bird_eye_view_accepts_a_sequence_and_small_extents(clip):
    short = [np.array([[0.1, 0.0, 0.0], [0.2, 0.0, 0.0]]), np.array([[0.1, 0.01], [0.2, 0.02], [0.3, 0.03]])]
    fig = plot_bird_eye_view(np.zeros((1, 3)), short)
    ax = fig.axes[0]
    low, high = sorted(ax.get_ylim())
    assert high - low >= plots.MIN_SPAN  # at least 10 m shown
    assert ax.get_title() == "2 sampled trajectories"


@pytest.mark.parametrize("kwargs, match", [
    ({"samples_xyz": np.zeros((2, 64))}, r"samples_xyz: expected shape \(S, W, 3\)"),
    ({"samples_xyz": np.full((1, 4, 3), np.nan)}, r"samples_xyz\[0\]: holds non-finite"),
    ({"history_xyz": np.zeros((16, 4))}, "history_xyz: expected shape"),
    ({"ground_truth_xyz": np.full((64, 3), np.inf)}, "ground_truth_xyz: holds non-finite"),
    ({"best": 6}, r"best must be a sample index in \[0, 6\)"),
    ({"best": -1}, "best must be a sample index"),
])
def test_bird_eye_view_bad_input(clip, samples, kwargs, match):
    arguments = {"history_xyz": clip.ego_history_xyz, "samples_xyz": samples, **kwargs}
    with pytest.raises(ValueError, match=match):
        plot_bird_eye_view(arguments.pop("history_xyz"), arguments.pop("samples_xyz"), **arguments)


# ---------------------------------------------------------------------------------------------
# Camera mosaic
# ---------------------------------------------------------------------------------------------


def test_project_to_image():
    intrinsics, camera_from_ego = _front_camera()
    height, width = IMAGE_SIZE
    points = np.array([
        [11.5, 0.0, 1.4],  # on the optical axis, 10 m ahead of the camera
        [11.5, 1.0, 1.4],  # 1 m to the left: left of the centre
        [11.5, 0.0, 0.4],  # 1 m lower: below the centre
        [1.0, 0.0, 1.4],  # behind the camera
        [1.55, 0.0, 1.4],  # 5 cm in front of it: too close
    ])
    uv = project_to_image(points, intrinsics, camera_from_ego)
    np.testing.assert_allclose(uv[0], [(width - 1) / 2, (height - 1) / 2], atol=1e-9)
    np.testing.assert_allclose(uv[1], [(width - 1) / 2 - 6.0, (height - 1) / 2], atol=1e-9)
    np.testing.assert_allclose(uv[2], [(width - 1) / 2, (height - 1) / 2 + 6.0], atol=1e-9)
    assert np.isnan(uv[3:]).all()
    with pytest.raises(ValueError, match=r"intrinsics: expected a \(3, 3\)"):
        project_to_image(points, np.eye(4), camera_from_ego)
    with pytest.raises(ValueError, match=r"camera_from_ego: expected a \(4, 4\)"):
        project_to_image(points, intrinsics, np.eye(3))


def test_camera_mosaic_panels_and_titles(clip):
    fig = plot_camera_mosaic(clip, title="synthetic")
    assert len(fig.axes) == 16
    for c, name in enumerate(CAMERA_NAMES):
        for f, time in enumerate(("-0.3", "-0.2", "-0.1", "+0.0")):
            ax = fig.axes[c * 4 + f]
            assert ax.get_title() == f"{name}  t = {time} s"
            assert len(ax.get_images()) == 1 and not ax.get_lines()
            np.testing.assert_array_equal(ax.get_images()[0].get_array(), clip.camera_frames[c][f].transpose(1, 2, 0))
    assert fig.get_suptitle() == "synthetic"
    assert plots.camera_axes(fig, clip) is fig.axes[7]  # front_wide_120fov at t0


def test_projected_trajectories_change_only_the_front_t0_panel(tmp_path, clip, samples):
    intrinsics, camera_from_ego = _front_camera()
    plain = plot_camera_mosaic(clip)
    projected = plot_camera_mosaic(clip, trajectories_xyz=samples, intrinsics=intrinsics,
                                   camera_from_ego=camera_from_ego, best=3)
    front = plots.camera_axes(projected, clip)
    assert len(front.get_lines()) == len(samples)
    assert front.get_xlim() == (-0.5, IMAGE_SIZE[1] - 0.5) and front.get_ylim() == (IMAGE_SIZE[0] - 0.5, -0.5)
    # The first waypoints (0.8 m ahead of the ego) are behind the camera: dropped, not drawn.
    assert np.isnan(front.get_lines()[0].get_xdata()[0])
    before, after = _png(plain, tmp_path, "plain.png"), _png(projected, tmp_path, "projected.png")
    assert before.shape == after.shape == (940, 1200, 3)  # 4 x 3 in wide, 4 x (2 + 0.35) in high
    rows, columns = _box(front, after.shape[0], margin=1)  # the margin holds the antialiased border
    changed = (before != after).any(axis=-1)
    assert changed[rows, columns].sum() > 200, "the projection drew nothing into the front camera's panel"
    outside = changed.copy()
    outside[rows, columns] = False
    assert outside.sum() == 0, "the projection changed pixels outside the front camera's t0 panel"
    for index in (0, 3, 5):
        assert _near(after[rows, columns], sample_colour(index), tolerance=20).sum() > 5, f"sample {index}"


def test_camera_mosaic_projection_needs_both_matrices(clip, samples):
    intrinsics, camera_from_ego = _front_camera()
    with pytest.raises(ValueError, match="both intrinsics and camera_from_ego"):
        plot_camera_mosaic(clip, trajectories_xyz=samples, intrinsics=intrinsics)
    with pytest.raises(ValueError, match="not in the clip"):
        plot_camera_mosaic(clip, trajectories_xyz=samples, intrinsics=intrinsics, camera_from_ego=camera_from_ego,
                           camera="rear_left_70fov")
    with pytest.raises(ValueError, match="trajectories_xyz: holds non-finite"):
        plot_camera_mosaic(clip, trajectories_xyz=np.full((64, 3), np.nan), intrinsics=intrinsics,
                           camera_from_ego=camera_from_ego)
    fig = plot_camera_mosaic(clip, intrinsics=intrinsics, camera_from_ego=camera_from_ego)  # nothing to project
    assert not plots.camera_axes(fig, clip).get_lines()
    # A single (W, 3) trajectory is one line.
    fig = plot_camera_mosaic(clip, trajectories_xyz=samples[2], intrinsics=intrinsics,
                             camera_from_ego=camera_from_ego)
    assert len(plots.camera_axes(fig, clip).get_lines()) == 1


def test_camera_mosaic_of_cameras_of_different_sizes_and_unnamed_clips(clip):
    frames = [np.asarray(clip.camera_frames[c])[:, :, : 48 + 16 * c, : 72 + 24 * c] for c in range(4)]
    mixed = Clip.create(frames, clip.ego_history_xyz, clip.ego_history_rot)
    assert isinstance(mixed.camera_frames, tuple) and mixed.camera_names is None
    fig = plot_camera_mosaic(mixed)
    assert [ax.get_title().split()[0] for ax in fig.axes[::4]] == list(CAMERA_NAMES)
    assert fig.axes[4].get_images()[0].get_array().shape == (64, 96, 3)
    two = Clip.create(np.asarray(clip.camera_frames)[:2], clip.ego_history_xyz, clip.ego_history_rot,
                      num_cameras=2)
    fig = plot_camera_mosaic(two)
    assert len(fig.axes) == 8 and fig.axes[4].get_title().startswith("camera 1")


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def test_summary_panels(tmp_path):
    rng = np.random.default_rng(0)
    min_ade = rng.gamma(2.0, 0.5, 40)
    best_errors = np.cumsum(rng.gamma(1.0, 0.05, (40, 64)), axis=1)
    fig = plot_summary(min_ade, best_errors, bins=10, title="validation")
    hist_ax, time_ax = fig.axes
    assert hist_ax.get_xlabel() == "minADE [m]" and hist_ax.get_ylabel() == "clips"
    assert len(hist_ax.patches) == 10
    assert sum(patch.get_height() for patch in hist_ax.patches) == 40
    assert [t.get_text() for t in hist_ax.get_legend().get_texts()] == [f"mean {min_ade.mean():.3f} m"]
    assert time_ax.get_xlabel() == "time after t0 [s]" and "[m]" in time_ax.get_ylabel()
    (line,) = time_ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), 0.1 * np.arange(1, 65))
    np.testing.assert_allclose(line.get_ydata(), best_errors.mean(axis=0))
    assert line.get_label() == "mean over 40 clips"
    assert fig.get_suptitle() == "validation"
    pixels = _png(fig, tmp_path, "summary.png")
    assert pixels.shape == (400, 1100, 3)
    assert _near(pixels, plots.SAMPLE_COLOURS[0]).sum() > 500  # the bars
    assert _near(pixels, plots.SAMPLE_COLOURS[3]).sum() > 100  # the mean error line


@pytest.mark.parametrize("min_ade, best_errors, match", [
    (np.zeros(0), np.zeros((0, 64)), "min_ade: expected a non-empty"),
    (np.zeros((2, 1)), np.zeros((2, 64)), "min_ade: expected a non-empty"),
    (np.zeros(3), np.zeros((2, 64)), r"best_errors: expected shape \(3, W\)"),
    (np.zeros(2), np.zeros((2, 0)), "best_errors: expected shape"),
    (np.array([1.0, np.nan]), np.zeros((2, 64)), "min_ade: holds non-finite"),
    (np.zeros(2), np.full((2, 64), np.inf), "best_errors: holds non-finite"),
])
def test_summary_bad_input(min_ade, best_errors, match):
    with pytest.raises(ValueError, match=match):
        plot_summary(min_ade, best_errors)


# ---------------------------------------------------------------------------------------------
# Output and hygiene
# ---------------------------------------------------------------------------------------------


def test_save_figure_is_atomic(tmp_path, clip, samples):
    fig = plot_bird_eye_view(clip.ego_history_xyz, samples)
    path = save_figure(fig, tmp_path / "a.png", dpi=50)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left
    with Image.open(path) as image:
        assert image.size == (300, 300)
    with pytest.raises(FileNotFoundError):
        save_figure(fig, tmp_path / "missing" / "b.png")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_no_pyplot_and_no_gui():
    tree = ast.parse(Path(plots.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.startswith("matplotlib.pyplot")}
    if "matplotlib.pyplot" in sys.modules:  # someone else imported it: at least no figure of ours is open
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
