"""Bad options and inputs of the command line: a clean one-line error each, given before the model
is loaded (so that no minutes of work are lost), and nothing written.

Most cases call `alpamayo_jax.cli.main` in-process with `Pipeline.load` replaced by a function that
fails the test: an error that reaches the user proves the option was checked first. A few run the
installed command as a subprocess to check what a user sees (exit code, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from alpamayo_jax import cli
from alpamayo_jax.inference.pipeline import Pipeline
from alpamayo_jax.processing.clip import Clip
from alpamayo_jax.processing.clip_file import save_clip


@pytest.fixture(scope="module")
def clip_file(golden, tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "clip.npz"
    save_clip(path, Clip.create(golden["input.image_frames"], golden["input.ego_history_xyz"][0, 0],
                                golden["input.ego_history_rot"][0, 0]))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(Pipeline, "load", refuse)


def infer_args(fixture_dir, clip_file, out, *extra):
    return ["infer", "--model", str(fixture_dir / "hf"), "--processor-dir", str(fixture_dir / "vlm"),
            "--clip", str(clip_file), "--out", str(out), *extra]


def run_main(args, capsys) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", "-1"], "num_samples must be a whole number >= 1, got -1"),
    (["--num-samples", "0"], "num_samples must be a whole number >= 1, got 0"),
    (["--num-flow-steps", "0"], "num_flow_steps must be a whole number >= 1, got 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a whole number >= 1, got 0"),
    (["--temperature", "inf"], "temperature must be a finite number > 0, got inf"),
    (["--temperature", "nan"], "temperature must be a finite number > 0, got nan"),
    (["--temperature", "0"], "for argmax decoding, use greedy decoding: --greedy"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "-2"], "top_k must be a whole number >= 0"),
    (["--greedy", "--temperature", "0.6"], "temperature cannot be given with it"),
    (["--mesh", "3by4"], "unknown mesh '3by4'"),
    (["--mesh", "model2"], "mesh 1x2 needs 2 devices, 1 available"),
    (["--inputs", "recorded.safetensors"], "pass exactly one of --clip and --inputs"),
])
def test_bad_options_fail_before_the_model_loads(fixture_dir, clip_file, tmp_path, capsys, no_model_load,
                                                 extra, message):
    code, err = run_main(infer_args(fixture_dir, clip_file, tmp_path / "out.json", *extra), capsys)
    assert code == 1 and message in err, err
    assert err.startswith("alpamayo-jax infer: error: ") and err.count("\n") == 1  # one line
    assert not (tmp_path / "out.json").exists()


def test_output_paths_are_checked_first(fixture_dir, clip_file, tmp_path, capsys, no_model_load):
    (tmp_path / "a_directory").mkdir()
    cases = [
        ([], tmp_path / "a_directory", f"--out {tmp_path / 'a_directory'} is a directory"),
        ([], tmp_path / "missing" / "out.json", f"directory {tmp_path / 'missing'} does not exist"),
        (["--plot", str(tmp_path / "missing" / "p.png")], tmp_path / "out.json",
         f"--plot {tmp_path / 'missing' / 'p.png'}: directory {tmp_path / 'missing'} does not exist"),
        (["--plot", str(tmp_path / "a_directory")], tmp_path / "out.json", "is a directory"),
    ]
    for extra, out, message in cases:
        code, err = run_main(infer_args(fixture_dir, clip_file, out, *extra), capsys)
        assert code == 1 and message in err, err
    assert not (tmp_path / "out.json").exists()


def test_noise_files_are_checked_first(fixture_dir, clip_file, tmp_path, capsys, no_model_load):
    np.save(tmp_path / "wrong_shape.npy", np.zeros((2, 64, 2), np.float32))
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    cases = [
        (clip_file, "is an .npz archive; save the noise array alone with np.save (.npy)"),
        (tmp_path / "wrong_shape.npy", "noise must be (1, 64, 2) = (clips * num_samples, waypoints, 2), got (2, 64, 2)"),
        (tmp_path / "text.npy", "noise must hold floating-point values"),
        (tmp_path / "garbage.npy", "is not a readable .npy array"),
        (tmp_path / "absent.npy", "--noise file not found"),
    ]
    for noise, message in cases:
        code, err = run_main(infer_args(fixture_dir, clip_file, tmp_path / "out.json", "--noise", str(noise)), capsys)
        assert code == 1 and message in err, err
        assert err.count(str(noise)) == 1, err  # the file is named once


def test_bad_clips_fail_before_the_model_loads(fixture_dir, golden, tmp_path, capsys, no_model_load):
    frames = golden["input.image_frames"]
    xyz, rot = golden["input.ego_history_xyz"][0, 0], golden["input.ego_history_rot"][0, 0]
    wide = np.zeros((4, 4, 3, 2, 402), np.uint8)  # aspect ratio 201 > 200
    np.savez(tmp_path / "wide.npz", camera_frames=wide, ego_history_xyz=xyz, ego_history_rot=rot)
    far = xyz.copy()
    far[:, 0] -= 50.0  # the last pose is not the t0 origin
    np.savez(tmp_path / "far.npz", camera_frames=frames, ego_history_xyz=far, ego_history_rot=rot)
    np.savez(tmp_path / "names.npz", camera_frames=frames, ego_history_xyz=xyz, ego_history_rot=rot,
             camera_names=np.array(["cross_left_120fov", "front_wide_120fov", "rear_120fov", "front_tele_30fov"]))
    for name, message in (("wide", "aspect ratio"), ("far", "origin"), ("names", "rear_120fov")):
        path = tmp_path / f"{name}.npz"
        code, err = run_main(infer_args(fixture_dir, path, tmp_path / "out.json"), capsys)
        assert code == 1 and message in err and err.count(str(path)) == 1, err


def test_export_refuses_an_existing_directory_unless_forced(fixture_dir, tmp_path, capsys):
    from alpamayo_jax.io.convert import convert_checkpoint

    bundle = tmp_path / "bundle"
    convert_checkpoint(fixture_dir / "hf", fixture_dir / "vlm", bundle)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_main(["export", "--model", str(bundle), "--out", str(out)], capsys)
    assert code == 1 and f"{out} already exists; pass --force to replace it" in err, err
    assert (out / "keep.txt").read_text() == "mine"  # nothing lost
    assert cli.main(["export", "--model", str(bundle), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def _command(*args):
    return subprocess.run([sys.executable, "-m", "alpamayo_jax.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ})


def test_what_a_user_sees(fixture_dir, clip_file, tmp_path):
    """As a subprocess: argparse rejects a seed JAX would truncate; a negative sample count is one
    line, no traceback; `--help` says where the defaults come from."""
    seed = _command(*infer_args(fixture_dir, clip_file, tmp_path / "out.json", "--seed", str(2**70)))
    assert seed.returncode == 2 and "argument --seed: must be in 0 .. 4294967295" in seed.stderr
    negative = _command(*infer_args(fixture_dir, clip_file, tmp_path / "out.json", "--num-samples", "-1"))
    assert negative.returncode == 1 and "Traceback" not in negative.stderr
    assert negative.stderr.strip() == "alpamayo-jax infer: error: num_samples must be a whole number >= 1, got -1"
    helped = _command("infer", "--help")
    text = " ".join(helped.stdout.split())
    assert "default: the checkpoint's num_inference_steps" in text
    assert "default: the checkpoint's tokens_per_future_traj" in text
    assert "--top-k" in text and "default: the reference's 0.6" in text
