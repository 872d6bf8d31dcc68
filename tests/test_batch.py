"""Many clips to one result file each (`alpamayo_jax.inference.batch`, `alpamayo-jax batch`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from alpamayo_jax.inference.batch import clip_paths, result_record, run_clips
from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import Pipeline, sample_trajectories
from alpamayo_jax.processing.clip import Clip
from alpamayo_jax.processing.clip_file import save_clip

@pytest.fixture(scope="module")
def pipeline(fixture_dir):
    return Pipeline.load(fixture_dir / "hf", processor_dir=fixture_dir / "vlm")


@pytest.fixture(scope="module")
def sampled(pipeline):
    return InferenceConfig.from_model(pipeline.config, num_samples=2, temperature=1.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def greedy(pipeline):
    return InferenceConfig.from_model(pipeline.config, greedy=True, max_new_tokens=2)


@pytest.fixture(scope="module")
def clips(golden):
    frames, xyz, rot = golden["input.image_frames"], golden["input.ego_history_xyz"][0, 0], golden["input.ego_history_rot"][0, 0]
    return {"a": Clip.create(frames, xyz, rot), "b": Clip.create(frames[::-1], xyz, rot),
            "c": Clip.create(frames[:, ::-1], xyz, rot)}


@pytest.fixture
def clip_dir(tmp_path, clips):
    directory = tmp_path / "clips"
    directory.mkdir()
    for name, clip in clips.items():
        save_clip(directory / f"{name}.npz", clip)
    return directory


def test_results_are_the_batched_runs(pipeline, sampled, clips, clip_dir, tmp_path):
    key = jax.random.key(5)
    seen = []
    summary = run_clips(pipeline, clip_paths(clip_dir), tmp_path / "out", key, sampled, batch_size=2,
                        on_clip=lambda path, status: seen.append((path.stem, status)),
                        provenance={"model": "tiny", "seed": 5})
    assert [p.name for p in summary.written] == ["a.json", "b.json", "c.json"] and not summary.failed
    assert seen == [("a", "written"), ("b", "written"), ("c", "written")]
    # Batch 0 = (a, b); batch 1 = (c, c): the short batch is filled with a copy, whose result is dropped.
    first = sample_trajectories(pipeline, [clips["a"], clips["b"]], jax.random.fold_in(key, 0), sampled)
    second = sample_trajectories(pipeline, [clips["c"], clips["c"]], jax.random.fold_in(key, 1), sampled)
    for name, samples, index in [("a", first, 0), ("b", first, 1), ("c", second, 0)]:
        written = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        expected = result_record(samples, index, settings=sampled)
        assert written["generated_token_ids"] == expected["generated_token_ids"]
        assert written["num_generated_tokens"] == expected["num_generated_tokens"]
        assert written["settings"] == sampled.to_json() and (written["model"], written["seed"]) == ("tiny", 5)
        np.testing.assert_array_equal(np.asarray(written["xyz"], np.float32), samples.xyz[index])
        assert np.asarray(written["rotation"]).shape == (2, 64, 3, 3)
        key_rule = {"key": "fold_in(key, number)"}
        assert written["batch"] == ({"number": 0, "clips": ["a", "b"], "size": 2, **key_rule} if name != "c"
                                    else {"number": 1, "clips": ["c"], "size": 2, **key_rule})

    # A rerun keeps what exists; overwrite recomputes.
    again = run_clips(pipeline, clip_paths(clip_dir), tmp_path / "out", key, sampled, batch_size=2)
    assert len(again.skipped) == 3 and not again.written
    forced = run_clips(pipeline, clip_paths(clip_dir)[:1], tmp_path / "out", key, sampled, overwrite=True)
    assert [p.name for p in forced.written] == ["a.json"]


def test_unreadable_clips_are_reported_and_the_rest_run(pipeline, greedy, clip_dir, tmp_path):
    (clip_dir / "broken.npz").write_bytes(b"not a zip")
    listing = tmp_path / "clips.txt"
    listing.write_text("# two clips\nclips/broken.npz\n\nclips/a.npz\n")
    summary = run_clips(pipeline, clip_paths(listing), tmp_path / "out", jax.random.key(0), greedy)
    assert [p.name for p in summary.written] == ["a.json"]
    assert list(summary.failed) == [clip_dir / "broken.npz"]
    assert "not an .npz archive" in summary.failed[clip_dir / "broken.npz"]
    assert not (tmp_path / "out" / "broken.json").exists()


def test_clip_sources_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="no clip directory or clip list"):
        clip_paths(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no clips"):
        clip_paths(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("missing.npz\n")
    with pytest.raises(FileNotFoundError, match="lists clips that do not exist"):
        clip_paths(listing)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for folder in "xy":
        (tmp_path / folder / "same.npz").write_bytes(b"")
    listing.write_text("x/same.npz\ny/same.npz\n")
    with pytest.raises(ValueError, match=r"several clips named \['same'\]"):
        clip_paths(listing)


def test_batch_command(fixture_dir, clip_dir, tmp_path):
    (clip_dir / "broken.npz").write_bytes(b"not a zip")
    out = tmp_path / "results"
    command = [sys.executable, "-m", "alpamayo_jax.cli", "batch", "--model", str(fixture_dir / "hf"),
               "--processor-dir", str(fixture_dir / "vlm"), "--clips", str(clip_dir), "--out-dir", str(out),
               "--greedy", "--max-new-tokens", "4", "--mesh", "data2", "--plots"]
    # Two CPU devices: batches of two clips (the data axis) split over them.
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 1  # one clip failed
    assert "3 clips written, 0 skipped (results exist), 1 failed" in run.stdout
    assert "failed: " + str(clip_dir / "broken.npz") in run.stderr
    assert run.stderr.count(str(clip_dir / "broken.npz")) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c}{suffix}" for c in "abc"
                                                          for suffix in (".json", ".png", ".cameras.png"))
    result = json.loads((out / "a.json").read_text())
    assert np.asarray(result["xyz"]).shape == (1, 64, 3) and len(result["generated_token_ids"][0]) <= 4


def test_multi_host_options_go_together(fixture_dir, clip_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "alpamayo_jax.cli", "batch", "--model", str(fixture_dir / "hf"),
                          "--clips", str(clip_dir), "--out-dir", str(tmp_path / "out"), "--coordinator",
                          "localhost:1234"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "--coordinator, --num-processes and --process-id go together" in run.stderr


def test_clips_of_different_image_sizes_run_in_separate_batches(pipeline, greedy, clips, tmp_path):
    from alpamayo_jax.processing.synthetic import synthetic_clip

    directory = tmp_path / "mixed"
    directory.mkdir()
    save_clip(directory / "a.npz", clips["a"])
    save_clip(directory / "small.npz", synthetic_clip(0, image_size=(40, 64)))
    summary = run_clips(pipeline, clip_paths(directory), tmp_path / "out", jax.random.key(0), greedy, batch_size=2)
    assert [p.name for p in summary.written] == ["a.json", "small.json"] and not summary.failed
    batches = [json.loads((tmp_path / "out" / name).read_text())["batch"] for name in ("a.json", "small.json")]
    rule = "fold_in(key, number)"
    assert batches == [{"number": 0, "clips": ["a"], "size": 2, "key": rule},
                       {"number": 1, "clips": ["small"], "size": 2, "key": rule}]


def test_batch_options_are_checked(pipeline, clip_dir, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_clips(pipeline, clip_paths(clip_dir), tmp_path / "out", jax.random.key(0), batch_size=0)


def test_reseeding_per_clip_makes_results_independent_of_batches(pipeline, sampled, clips, clip_dir, tmp_path):
    """With `reseed_per_clip` every clip samples from the run's key itself, as if the seed were
    re-set before each clip: batch sizes 1 and 2 give each clip the same tokens, and the result is
    that of the clip run alone with that key."""
    key = jax.random.key(9)
    for size in (1, 2):
        run_clips(pipeline, clip_paths(clip_dir), tmp_path / str(size), key, sampled, batch_size=size,
                  reseed_per_clip=True)
    alone = sample_trajectories(pipeline, [clips["b"]], key[None], sampled)
    for name in ("a", "b", "c"):
        one, two = (json.loads((tmp_path / str(size) / f"{name}.json").read_text()) for size in (1, 2))
        assert one["generated_token_ids"] == two["generated_token_ids"]
        np.testing.assert_allclose(one["xyz"], two["xyz"], atol=1e-4)
        assert two["batch"]["key"] == "the run's key for every clip"
    b = json.loads((tmp_path / "2" / "b.json").read_text())
    assert b["generated_token_ids"] == alone.generated_token_ids[0]
