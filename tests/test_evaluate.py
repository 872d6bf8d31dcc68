"""`alpamayo-jax evaluate`: inference where a clip has no result, then the reference's metrics;
on a synthetic PhysicalAI-AV dataset end to end with the tiny model, on hand-made results with
hand-computed values, and with a broken clip."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from alpamayo_jax import cli
from alpamayo_jax.evaluation.evaluate import METRICS_CSV, METRICS_FILE, SUMMARY_PLOT
from alpamayo_jax.processing.clip_file import save_clip
from alpamayo_jax.processing.synthetic import synthetic_clip

METRIC_KEYS = {"min_ade", "min_ade/by_t=0.5", "min_ade/by_t=1.0", "min_ade/by_t=3.0", "min_ade/by_t=5.0", "ade",
               "ade/by_t=3.0", "corner_distance", "fde", "min_fde"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset") / "pai"
    assert cli.main(["make-dataset", "--out", str(root), "--clips", "3", "--seed", "5"]) == 0
    return root


def model_args(fixture_dir):
    return ["--model", str(fixture_dir / "hf"), "--processor-dir", str(fixture_dir / "vlm"), "--greedy",
            "--max-new-tokens", "4", "--num-samples", "2", "--quiet"]


def test_evaluate_a_dataset_and_resume(fixture_dir, dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--data", str(dataset), "--out-dir", str(out), *model_args(fixture_dir)]) == 0
    report = json.loads((out / METRICS_FILE).read_text())
    assert report["num_clips"] == 3 and report["num_failed"] == 0 and report["failed"] == {}
    assert report["settings"]["computed"] == 3 and report["settings"]["seed"] == 42
    names = sorted(report["clips"])
    assert all("@5100000" in name for name in names)  # clip id @ the default keyframe, microseconds
    for name in names:
        values = report["clips"][name]
        assert METRIC_KEYS <= set(values) and all(np.isfinite(v) for v in values.values())
        result = json.loads((out / f"{name}.json").read_text())
        assert np.asarray(result["xyz"]).shape == (2, 64, 3)
    for key in METRIC_KEYS:
        assert report["mean"][key] == pytest.approx(np.mean([report["clips"][n][key] for n in names]))
    rows = list(csv.DictReader((out / METRICS_CSV).open()))
    assert [r["clip"] for r in rows] == [*report["clips"], "mean"]
    assert float(rows[0]["min_ade"]) == report["clips"][rows[0]["clip"]]["min_ade"]
    with Image.open(out / SUMMARY_PLOT) as summary:
        assert summary.size[0] > 300 and summary.size[1] > 200
    assert "3 clips scored, 0 failed" in capsys.readouterr().out

    # A rerun computes nothing and scores the same results.
    stamps = {name: (out / f"{name}.json").stat().st_mtime_ns for name in names}
    assert cli.main(["evaluate", "--data", str(dataset), "--out-dir", str(out), *model_args(fixture_dir)]) == 0
    again = json.loads((out / METRICS_FILE).read_text())
    assert again["settings"]["computed"] == 0 and again["settings"]["reused"] == 3
    assert again["clips"] == report["clips"]
    assert stamps == {name: (out / f"{name}.json").stat().st_mtime_ns for name in names}


def _hand_made(directory, results):
    """Two clips with ground truth and result files whose samples are the truth shifted by known
    offsets: clip a, samples shifted by 1 m along x and 2 m along y; clip b, by 3 m along y and
    (0.6, 0.8) m."""
    clips = directory / "clips"
    clips.mkdir()
    offsets = {"a": [(1.0, 0.0), (0.0, 2.0)], "b": [(0.0, 3.0), (0.6, 0.8)]}
    for index, (name, shifts) in enumerate(offsets.items()):
        clip = synthetic_clip(index, image_size=(32, 48), speed=5.0 + index, curvature=0.02, with_future=True)
        save_clip(clips / f"{name}.npz", clip)
        xyz = np.stack([clip.ego_future_xyz + np.array([dx, dy, 0.0], np.float32) for dx, dy in shifts])
        rotation = np.stack([clip.ego_future_rot] * len(shifts))
        (results / f"{name}.json").write_text(json.dumps({"xyz": xyz.tolist(), "rotation": rotation.tolist()}))
    return clips


def test_score_only_gives_hand_computed_values(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    clips = _hand_made(tmp_path, results)
    assert cli.main(["evaluate", "--score-only", "--data", str(clips), "--out-dir", str(results), "--quiet"]) == 0
    report = json.loads((results / METRICS_FILE).read_text())
    a, b = report["clips"]["a"], report["clips"]["b"]
    # Every step of a sample is off by the same distance: ADE = FDE = that distance at any horizon.
    # The box corners move with the pose: corner distance = the best sample's offset as well.
    expected_a = {"min_ade": 1.0, "ade": 1.0, "fde": 1.0, "min_fde": 1.0, "corner_distance": 1.0}
    expected_b = {"min_ade": 1.0, "ade": 3.0, "fde": 1.0, "min_fde": 1.0, "corner_distance": 1.0}
    for values, expected in ((a, expected_a), (b, expected_b)):
        for key, value in expected.items():
            assert values[key] == pytest.approx(value, rel=1e-5), key
        for horizon in ("0.5", "1.0", "3.0", "5.0"):
            assert values[f"min_ade/by_t={horizon}"] == pytest.approx(values["min_ade"], rel=1e-5)
    assert report["mean"]["ade"] == pytest.approx(2.0, rel=1e-5)
    assert report["settings"]["score_only"] is True


def test_broken_and_missing_clips_are_reported_and_counted(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    clips = _hand_made(tmp_path, results)
    (clips / "broken.npz").write_bytes(b"not an archive")
    save_clip(clips / "no_result.npz", synthetic_clip(3, with_future=True))
    code = cli.main(["evaluate", "--score-only", "--data", str(clips), "--out-dir", str(results), "--quiet"])
    assert code == 1
    report = json.loads((results / METRICS_FILE).read_text())
    assert report["num_clips"] == 2 and report["num_failed"] == 2
    assert set(report["failed"]) == {"broken", "no_result"}
    assert "not an .npz archive" in report["failed"]["broken"]
    assert "no_result.json is unreadable" in report["failed"]["no_result"]
    err = capsys.readouterr().err
    assert "broken" in err and "no_result" in err


def test_options_are_checked_before_anything_runs(tmp_path, capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    save_clip(clips / "a.npz", synthetic_clip(0, with_future=True))
    assert cli.main(["evaluate", "--data", str(clips), "--out-dir", str(tmp_path / "out")]) == 1
    assert "pass --model to run the clips, or --score-only" in capsys.readouterr().err
    assert cli.main(["evaluate", "--score-only", "--data", str(clips), "--out-dir", str(tmp_path / "none")]) == 1
    assert "no results directory" in capsys.readouterr().err
    assert cli.main(["evaluate", "--score-only", "--data", str(clips), "--clips", "a,zzz", "--out-dir",
                     str(clips)]) == 1
    assert "no clips named ['zzz']" in capsys.readouterr().err
