"""Recorded model inputs: file round trips, checks and their errors."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from alpamayo_jax.processing.clip import ClipError
from alpamayo_jax.processing.recorded_inputs import RecordedInputs, load_recorded_inputs, save_recorded_inputs
from tests.test_clip import _history, _rot_with, _xyz_with_nan


def _tensors(**changes):
    xyz, rot = _history()
    tensors = {
        "input_ids": np.arange(20, dtype=np.int64)[None],
        "pixel_values": np.random.default_rng(0).normal(size=(48, 8)).astype(np.float32),
        "image_grid_thw": np.array([[1, 4, 6], [1, 4, 6]], np.int64),
        "ego_history_xyz": xyz[None],
        "ego_history_rot": rot[None],
    }
    tensors.update(changes)
    return {k: v for k, v in tensors.items() if v is not None}


def test_recorded_inputs_round_trip(tmp_path):
    tensors = _tensors(attention_mask=np.ones((1, 20), np.int64))  # extra keys are ignored
    save_file(tensors, tmp_path / "raw.safetensors")
    inputs = load_recorded_inputs(tmp_path / "raw.safetensors")
    assert isinstance(inputs, RecordedInputs)
    assert inputs.ego_history_xyz.shape == (16, 3) and inputs.ego_history_rot.shape == (16, 3, 3)
    for name in ("input_ids", "pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(getattr(inputs, name), tensors[name])
    save_recorded_inputs(tmp_path / "inputs.safetensors", inputs)
    again = load_recorded_inputs(tmp_path / "inputs.safetensors")
    for name in ("input_ids", "pixel_values", "image_grid_thw", "ego_history_xyz", "ego_history_rot"):
        np.testing.assert_array_equal(getattr(again, name), getattr(inputs, name))
    assert again.input_ids.dtype == np.int64 and again.pixel_values.dtype == np.float32
    assert sorted(os.listdir(tmp_path)) == ["inputs.safetensors", "raw.safetensors"]


def test_recorded_inputs_accept_int32_ids(tmp_path):
    save_file(_tensors(input_ids=np.arange(20, dtype=np.int32)[None]), tmp_path / "m.safetensors")
    assert load_recorded_inputs(tmp_path / "m.safetensors").input_ids.dtype == np.int64


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"pixel_values": None}, r"missing key\(s\) \['pixel_values'\]"),
        ({"input_ids": np.arange(20, dtype=np.float32)[None]}, "input_ids: expected integers"),
        ({"image_grid_thw": np.array([[1, 4, 6], [1, 4, 6]], np.float32)},
         "image_grid_thw: expected integers"),
        ({"pixel_values": np.zeros((48, 8), np.float64)},
         "pixel_values: expected float32, got dtype float64"),
        ({"ego_history_xyz": _history()[0][None].astype(np.float64)}, "ego_history_xyz: expected float32"),
        ({"input_ids": np.arange(20, dtype=np.int64)}, r"input_ids: expected shape \(1, L\)"),
        ({"pixel_values": np.zeros((48,), np.float32)}, r"pixel_values: expected a non-empty 2-D"),
        ({"image_grid_thw": np.array([[1, 4], [1, 4]], np.int64)},
         r"image_grid_thw: expected shape \(N, 3\)"),
        ({"image_grid_thw": np.array([[1, 8, 6], [0, 4, 6]], np.int64)}, "image_grid_thw: expected positive"),
        ({"ego_history_xyz": _history()[0]}, r"ego_history_xyz: expected shape \(1, T, 3\)"),
        ({"ego_history_xyz": _history(15)[0][None], "ego_history_rot": _history(15)[1][None]},
         "ego_history_xyz: expected 16 poses, got 15"),
        ({"ego_history_rot": _history()[1]}, r"ego_history_rot: expected shape \(1, 16, 3, 3\)"),
        ({"pixel_values": np.full((48, 8), np.nan, np.float32)},
         "pixel_values: NaN or infinite values in 48 row"),
        ({"ego_history_xyz": _xyz_with_nan(4)[None]},
         r"ego_history_xyz: NaN or infinite values at pose\(s\) \[4\]"),
        ({"ego_history_rot": _rot_with(1, -np.eye(3))[None]},
         r"ego_history_rot: pose\(s\) \[1\] are not proper"),
        ({"image_grid_thw": np.array([[1, 4, 6], [1, 4, 4]], np.int64)},
         r"pixel_values: 48 rows, but image_grid_thw describes sum\(t \* h \* w\) = 40 patches"),
    ],
)
def test_load_recorded_inputs_errors(tmp_path, changes, match):
    path = tmp_path / "bad.safetensors"
    save_file(_tensors(**changes), path)
    with pytest.raises(ClipError, match=re.escape(str(path)) + ": " + match):
        load_recorded_inputs(path)


def test_recorded_inputs_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model inputs file not found"):
        load_recorded_inputs(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    with pytest.raises(ClipError, match="not a readable .safetensors file"):
        load_recorded_inputs(junk)
    good = RecordedInputs(**{k: (v[0] if k.startswith("ego") else v) for k, v in _tensors().items()})
    bad = dataclasses.replace(good, pixel_values=np.zeros((47, 8), np.float32))
    with pytest.raises(ClipError, match="pixel_values: 47 rows"):
        save_recorded_inputs(tmp_path / "out.safetensors", bad)
    assert sorted(os.listdir(tmp_path)) == ["junk.safetensors"]
