"""`alpamayo-jax loss` and `alpamayo-jax train` for both stages: the loss command reproduces NVIDIA's
fine-tuning numbers (stage 1: the two-term loss and every VLM gradient; stage 2: the flow-matching
loss and the expert's gradients) from clip files built from the fixture's inputs; a short training
run writes its run directory, resumes, and exports a model that `infer` runs; stage 2 starts from a
stage-1 export's VLM; clips without ground truth are a clear error before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from alpamayo_jax import cli
from alpamayo_jax.processing.clip import Clip
from alpamayo_jax.processing.clip_file import save_clip
from alpamayo_jax.processing.synthetic import synthetic_clip
from tests.parity import assert_close


def test_loss_command_reproduces_the_reference(fixture_dir, examples, train_golden, tmp_path):
    directory, paths = examples
    out = tmp_path / "loss.safetensors"
    run = subprocess.run([sys.executable, "-m", "alpamayo_jax.cli", "loss", "--stage", "2", "--model",
                          str(fixture_dir / "hf"), "--processor-dir", str(fixture_dir / "vlm"), "--examples",
                          *map(str, paths), "--flow-timesteps", str(directory / "t.npy"), "--flow-noise",
                          str(directory / "noise.npy"), "--expert-attention", "reference", "--out", str(out)],
                         check=False, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert run.returncode == 0, run.stderr
    written = load_file(out)
    # End to end (x fitted here): the README's end-to-end tolerances.
    assert_close(written["loss"], train_golden["stage2.loss"], 5e-5, "loss command: stage2.loss")
    expected = {key[len("grad.stage2."):]: value for key, value in train_golden.items()
                if key.startswith("grad.stage2.")}
    assert set(written) == {"loss"} | {f"grad.{key}" for key in expected}
    for key, value in expected.items():
        assert written[f"grad.{key}"].dtype == np.float32
        assert_close(written[f"grad.{key}"], value, 5e-2, f"loss command: grad {key}")


def test_stage1_loss_command_reproduces_the_reference(fixture_dir, examples, train_golden, tmp_path):
    """`loss --stage 1` (no flow arrays): the loss, its two terms and every VLM gradient within the
    fixture README's tolerances (without remat: the parity tests take the remat path)."""
    _, paths = examples
    out = tmp_path / "loss1.safetensors"
    run = subprocess.run([sys.executable, "-m", "alpamayo_jax.cli", "loss", "--stage", "1", "--model",
                          str(fixture_dir / "hf"), "--processor-dir", str(fixture_dir / "vlm"), "--examples",
                          *map(str, paths), "--out", str(out)], check=False, capture_output=True, text=True,
                         timeout=600, env={**os.environ})
    assert run.returncode == 0, run.stderr
    assert "future_traj" in run.stdout
    written = load_file(out)
    for name, tolerance in (("loss", 1e-6), ("loss.future_traj", 1e-6), ("loss.others", 2e-6)):
        assert_close(written[name], train_golden[f"stage1.{name}"], tolerance, f"loss --stage 1: {name}")
    expected = {key[len("grad.stage1."):]: value for key, value in train_golden.items()
                if key.startswith("grad.stage1.")}
    assert set(written) == {"loss", "loss.future_traj", "loss.others"} | {f"grad.{key}" for key in expected}
    worst = max(assert_close(written[f"grad.{key}"], value, 5e-5, f"loss --stage 1: grad {key}")
                for key, value in expected.items())
    print(f"loss --stage 1: worst gradient relative error {worst:.2e} over {len(expected)} tensors")


def test_stage_specific_options_are_checked(fixture_dir, examples, tmp_path, capsys):
    directory, paths = examples
    base = ["loss", "--model", str(fixture_dir / "hf"), "--examples", *map(str, paths), "--out",
            str(tmp_path / "x.safetensors")]
    assert cli.main([*base, "--stage", "1", "--flow-noise", str(directory / "noise.npy")]) == 1
    assert "stage 1 has no flow matching" in capsys.readouterr().err
    assert cli.main([*base, "--stage", "2", "--flow-noise", str(directory / "noise.npy")]) == 1
    assert "--stage 2 needs the flow-matching draws: pass --flow-timesteps" in capsys.readouterr().err
    assert cli.main([*base, "--stage", "1", "--expert-attention", "reference"]) == 1
    assert "--expert-attention is stage 2's" in capsys.readouterr().err


def test_stage2_starts_from_the_stage1_export(fixture_dir, tmp_path):
    """Stage 1 trains the VLM and exports a bundle; `train --stage 2 --model <that bundle>` loads it
    strictly and trains the expert on THAT VLM: the stage-2 export's VLM is the stage-1 VLM bit for
    bit (and differs from the base checkpoint's), its expert is new. (NVIDIA's stage-2 code loads
    the stage-1 checkpoint in an order that keeps the base VLM weights.)"""
    from alpamayo_jax.inference.pipeline import Pipeline
    from alpamayo_jax.io.bundle import load_bundle
    from alpamayo_jax.nn.variables import module_variables

    data = tmp_path / "clips"
    data.mkdir()
    for i in range(2):
        clip = synthetic_clip(i, image_size=(32, 48), speed=5.0 + i, with_future=True)
        save_clip(data / f"c{i}.npz", Clip.create(clip.camera_frames, clip.ego_history_xyz, clip.ego_history_rot,
                                                  ego_future_xyz=clip.ego_future_xyz,
                                                  ego_future_rot=clip.ego_future_rot,
                                                  cot=f"Keep the lane at {5 + i} m/s."))
    common = ["--processor-dir", str(fixture_dir / "vlm"), "--data", str(data), "--batch-size", "2", "--steps", "2",
              "--warmup", "1", "--lr", "1e-3", "--quiet"]
    assert cli.main(["train", "--stage", "1", "--model", str(fixture_dir / "hf"), *common, "--gradient-accumulation",
                     "1", "--out", str(tmp_path / "run1"), "--export", str(tmp_path / "stage1")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and {"loss.future_traj", "loss.others"} <= set(records[0])
    assert cli.main(["train", "--stage", "2", "--model", str(tmp_path / "stage1"), *common,
                     "--out", str(tmp_path / "run2"), "--export", str(tmp_path / "stage2")]) == 0
    models = {name: module_variables(load_bundle(tmp_path / name)[0]) for name in ("stage1", "stage2")}
    base = module_variables(Pipeline.load(fixture_dir / "hf", processor_dir=fixture_dir / "vlm").model)
    vlm = [path for path in base if path.startswith("vlm.")]
    expert = [path for path in base if path.startswith(("expert.", "action_"))]

    def equal(a, b, path):
        return np.array_equal(np.asarray(a[path].get_value()), np.asarray(b[path].get_value()))

    assert all(equal(models["stage2"], models["stage1"], path) for path in vlm)  # stage 2 kept the stage-1 VLM
    assert not all(equal(models["stage1"], base, path) for path in vlm)  # which stage 1 trained
    assert all(equal(models["stage1"], base, path) for path in expert)  # stage 1 left the expert alone
    assert not all(equal(models["stage2"], models["stage1"], path) for path in expert)  # stage 2 trained it
    report = json.loads((tmp_path / "stage1" / "conversion_report.json").read_text())
    assert report["provenance"]["stage"] == 1


def test_train_resume_export_infer(fixture_dir, tmp_path, capsys):
    data = tmp_path / "clips"
    data.mkdir()
    for i in range(2):
        save_clip(data / f"c{i}.npz", synthetic_clip(i, image_size=(32, 48), speed=5.0 + i, with_future=True))
    base = ["train", "--stage", "2", "--model", str(fixture_dir / "hf"), "--processor-dir", str(fixture_dir / "vlm"),
            "--data", str(data), "--out", str(tmp_path / "run"), "--batch-size", "2", "--save-every", "2",
            "--lr", "1e-3", "--warmup", "1", "--quiet"]
    assert cli.main([*base, "--steps", "2"]) == 0
    assert cli.main([*base, "--steps", "4", "--resume", "--export", str(tmp_path / "trained")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert cli.main(["infer", "--model", str(tmp_path / "trained"), "--processor-dir", str(fixture_dir / "vlm"),
                     "--clip", str(data / "c0.npz"), "--greedy", "--max-new-tokens", "2",
                     "--out", str(tmp_path / "result.json")]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert np.isfinite(result["xyz"]).all()
    report = json.loads((tmp_path / "trained" / "conversion_report.json").read_text())
    assert report["provenance"]["step"] == 4 and report["provenance"]["stage"] == 2
    # Back to the Hugging Face layout: the frozen VLM is the source's, the expert's head trained.
    assert cli.main(["export", "--model", str(tmp_path / "trained"), "--out", str(tmp_path / "hf")]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    original = load_file(fixture_dir / "hf" / "model.safetensors")
    assert set(exported) == set(original)
    assert np.array_equal(exported["vlm.lm_head.weight"], original["vlm.lm_head.weight"])  # frozen
    assert not np.array_equal(exported["action_out_proj.weight"], original["action_out_proj.weight"])  # trained


def test_train_on_a_mesh_with_fsdp_and_remat(fixture_dir, tmp_path):
    """The parallel options run through (one device here; tests/test_sharding.py runs the step on
    eight); --fsdp without --mesh is refused."""
    data = tmp_path / "clips"
    data.mkdir()
    save_clip(data / "c0.npz", synthetic_clip(0, image_size=(32, 48), with_future=True))
    base = ["train", "--stage", "2", "--model", str(fixture_dir / "hf"), "--processor-dir", str(fixture_dir / "vlm"),
            "--data", str(data), "--steps", "1", "--warmup", "0", "--quiet"]
    assert cli.main([*base, "--out", str(tmp_path / "run"), "--mesh", "single", "--fsdp", "--remat"]) == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert cli.main([*base, "--out", str(tmp_path / "run2"), "--fsdp"]) == 1


def test_clips_without_ground_truth_are_named_before_loading(fixture_dir, tmp_path, capsys, monkeypatch):
    from alpamayo_jax.inference.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("loaded the model first"))
    data = tmp_path / "clips"
    data.mkdir()
    save_clip(data / "with.npz", synthetic_clip(0, with_future=True))
    save_clip(data / "without.npz", synthetic_clip(1))
    code = cli.main(["train", "--stage", "2", "--model", str(fixture_dir / "hf"), "--data", str(data),
                     "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "without.npz: no ground-truth future" in err and "with.npz" not in err.replace("without", "")
    assert cli.main(["train", "--stage", "1", "--model", str(fixture_dir / "hf"), "--data", str(data),
                     "--out", str(tmp_path / "run"), "--quiet"]) == 1
    assert "without.npz: no ground-truth future" in capsys.readouterr().err


def test_train_on_a_physical_ai_av_root(fixture_dir, tmp_path):
    """--data also takes a dataset root in the PhysicalAI-AV layout: its clips at t0 = 5.1 s."""
    from alpamayo_jax.data.synthetic_dataset import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "pai", num_clips=2, seed=3).root
    assert cli.main(["train", "--stage", "2", "--model", str(fixture_dir / "hf"), "--processor-dir",
                     str(fixture_dir / "vlm"), "--data", str(root), "--out", str(tmp_path / "run"), "--steps", "1",
                     "--warmup", "0", "--batch-size", "2", "--quiet"]) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["step"] == 1 and np.isfinite(record["loss"])
