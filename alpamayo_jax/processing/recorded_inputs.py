"""Recorded model inputs (numpy only): already-processed inputs of one sample, for exact parity runs.

`RecordedInputs` holds the prompt ids and vision patches as the reference processor makes them
(e.g. recorded from it), so that a run can skip this project's preprocessing and compare the model
alone. `load_recorded_inputs` / `save_recorded_inputs` read and write them.

Shapes: L prompt tokens, N images, S patch rows (sum of t * h * w over the image grids), D values
per patch row, T history poses (16).

Recorded-inputs file (`.safetensors`): input_ids (1, L) int, pixel_values (S, D) float32,
image_grid_thw (N, 3) int, ego_history_xyz (1, T, 3) float32, ego_history_rot (1, T, 3, 3)
float32; other keys (e.g. attention_mask) are ignored.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import safetensors
from safetensors.numpy import load_file, save

from alpamayo_jax.io.atomic import write_atomically
from alpamayo_jax.processing.clip import ClipError, check_poses, read_only


@dataclasses.dataclass(frozen=True, eq=False)
class RecordedInputs:
    """Processed inputs of one sample, as the reference processor makes them (read-only arrays)."""

    input_ids: np.ndarray = dataclasses.field(repr=False)  # (1, L) int64, history placeholders unfused
    pixel_values: np.ndarray = dataclasses.field(repr=False)  # (S, D) float32
    image_grid_thw: np.ndarray  # (N, 3) int64
    ego_history_xyz: np.ndarray  # (T, 3) float32
    ego_history_rot: np.ndarray  # (T, 3, 3) float32


_KEYS = ("input_ids", "pixel_values", "image_grid_thw", "ego_history_xyz", "ego_history_rot")


def _recorded_inputs(tensors: dict[str, np.ndarray], num_history: int | None) -> RecordedInputs:
    """Checks the file's tensors (histories with their leading 1) and builds `RecordedInputs`."""
    missing = [k for k in _KEYS if k not in tensors]
    if missing:
        raise ClipError(f"missing key(s) {missing}; model inputs need {', '.join(_KEYS)}")
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
        rows = np.flatnonzero(~np.isfinite(pixels).all(axis=1)).tolist()
        raise ClipError(f"pixel_values: NaN or infinite values in {len(rows)} row(s), first {rows[:5]}")
    check_poses(xyz[0], rot[0])
    patches = int(np.prod(grid.astype(np.int64), axis=1).sum())
    if patches != pixels.shape[0]:
        raise ClipError(
            f"pixel_values: {pixels.shape[0]} rows, but image_grid_thw describes "
            f"sum(t * h * w) = {patches} patches"
        )
    return RecordedInputs(
        input_ids=read_only(ids.astype(np.int64, copy=False)),
        pixel_values=read_only(pixels),
        image_grid_thw=read_only(grid.astype(np.int64, copy=False)),
        ego_history_xyz=read_only(xyz[0]),
        ego_history_rot=read_only(rot[0]),
    )


def load_recorded_inputs(path: str | os.PathLike, *, num_history: int | None = 16) -> RecordedInputs:
    """Reads and checks a `.safetensors` file of recorded model inputs (see the module
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
        return _recorded_inputs(tensors, num_history)
    except ClipError as error:
        raise ClipError(f"{path}: {error}") from None


def save_recorded_inputs(path: str | os.PathLike, inputs: RecordedInputs) -> None:
    """Writes `inputs` to a `.safetensors` file readable by `load_recorded_inputs`, atomically;
    the inputs are checked first."""
    tensors = {
        "input_ids": np.asarray(inputs.input_ids),
        "pixel_values": np.asarray(inputs.pixel_values),
        "image_grid_thw": np.asarray(inputs.image_grid_thw),
        "ego_history_xyz": np.asarray(inputs.ego_history_xyz)[None],
        "ego_history_rot": np.asarray(inputs.ego_history_rot)[None],
    }
    _recorded_inputs(tensors, num_history=None)
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    write_atomically(path, lambda file: file.write(data))
