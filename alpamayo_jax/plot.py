"""Bird's-eye-view picture of the ego history and predicted trajectories (Pillow, no matplotlib).

Coordinates are the t0 ego frame: x forward (drawn upwards), y to the left (drawn leftwards).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

HISTORY_COLOUR = (110, 110, 110)
SAMPLE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_trajectories(path: str | os.PathLike, history_xyz: np.ndarray, predictions: Sequence[np.ndarray], *,
                      size: int = 512, title: str = "") -> None:
    """Writes a PNG: the history (H, 3) in grey and each predicted trajectory (W, 3) in colour,
    with a 10 m grid, scaled to fit with equal axes."""
    history = np.asarray(history_xyz, np.float64)[:, :2]
    paths = [np.asarray(p, np.float64)[:, :2] for p in predictions]
    points = np.concatenate([history, np.zeros((1, 2)), *paths])
    if not np.isfinite(points).all():
        raise ValueError("trajectories hold non-finite values")
    low, high = points.min(axis=0), points.max(axis=0)
    span = max(float((high - low).max()), 10.0) * 1.15
    centre = (low + high) / 2
    margin = 24

    def to_pixels(xy: np.ndarray) -> list[tuple[float, float]]:
        scale = (size - 2 * margin) / span
        # x forward -> up, y left -> left
        column = size / 2 - (xy[:, 1] - centre[1]) * scale
        row = size / 2 - (xy[:, 0] - centre[0]) * scale
        return list(zip(column.tolist(), row.tolist()))

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    first, last = np.floor((centre - span / 2) / 10) * 10, np.ceil((centre + span / 2) / 10) * 10
    for x in np.arange(first[0], last[0] + 1, 10.0):
        draw.line(to_pixels(np.array([[x, first[1]], [x, last[1]]])), fill=(232, 232, 232))
    for y in np.arange(first[1], last[1] + 1, 10.0):
        draw.line(to_pixels(np.array([[first[0], y], [last[0], y]])), fill=(232, 232, 232))
    draw.line(to_pixels(history), fill=HISTORY_COLOUR, width=3)
    for index, path_xy in enumerate(paths):
        colour = SAMPLE_COLOURS[index % len(SAMPLE_COLOURS)]
        draw.line(to_pixels(np.concatenate([np.zeros((1, 2)), path_xy])), fill=colour, width=2)
    ego = to_pixels(np.zeros((1, 2)))[0]
    draw.ellipse([ego[0] - 4, ego[1] - 4, ego[0] + 4, ego[1] + 4], fill=(0, 0, 0))
    caption = f"{title}  grid 10 m, history grey, {len(paths)} sample(s)".strip()
    draw.text((8, 6), caption, fill=(0, 0, 0))
    image.save(path, format="PNG")
