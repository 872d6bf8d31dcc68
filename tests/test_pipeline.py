"""End to end against NVIDIA's reference fixture: cameras + ego history in, tokens, Chain-of-
Causation text and trajectories out (greedy, with the reference's initial noise injected); the
precomputed-inputs path; sampling determinism; the `infer` and `demo` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from alpamayo_jax import cli
from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import Pipeline, sample_from_inputs, sample_trajectories
from alpamayo_jax.processing.clip import Clip
from tests.conftest import recorded_inputs
from tests.parity import assert_close


@pytest.fixture(scope="module")
def pipeline(fixture_dir):
    return Pipeline.load(fixture_dir / "hf", processor_dir=fixture_dir / "vlm")


@pytest.fixture(scope="module")
def history(golden):
    return golden["input.ego_history_xyz"][0], golden["input.ego_history_rot"][0]  # (1, 16, 3), (1, 16, 3, 3)


@pytest.fixture(scope="module")
def inputs(pipeline, golden, history):
    return pipeline.prepare(Clip.create(golden["input.image_frames"], history[0][0], history[1][0]))


def greedy(pipeline, max_new_tokens, **options):
    return InferenceConfig.from_model(pipeline.config, greedy=True, max_new_tokens=max_new_tokens, **options)


@pytest.mark.parametrize("case", ["main", "short"])
def test_end_to_end_matches_reference(pipeline, golden, history, inputs, case):
    prefix, max_new_tokens = ("", 24) if case == "main" else ("short.", 4)
    np.testing.assert_array_equal(inputs.input_ids, golden["fused.input_ids"])
    np.testing.assert_array_equal(inputs.pixel_values, golden["processor.pixel_values"])
    samples = sample_from_inputs(pipeline, inputs, jax.random.key(0), greedy(pipeline, max_new_tokens),
                                 noise=golden["diffusion.noise"])
    raw = golden[f"{prefix}gen.sequences_raw"][0, golden["fused.input_ids"].shape[1]:]
    assert samples.generated_token_ids == [[raw.tolist()]]
    assert_close(samples.actions[0], golden[f"{prefix}rollout.sampled_action"], 1e-5, f"{prefix}sampled_action")
    assert_close(samples.xyz[0], golden[f"{prefix}rollout.pred_xyz"][0, 0], 1e-4, f"{prefix}pred_xyz")
    assert_close(samples.rotation[0], golden[f"{prefix}rollout.pred_rot"][0, 0], 1e-4, f"{prefix}pred_rot")
    # The fixture's random weights never emit <|cot_end|>, so the reference extracts "" as well.
    assert samples.cot == [[""]]
    assert set(samples.timings) == {"generate", "flow_matching", "rollout", "decode_text"}


def test_recorded_inputs_path(pipeline, golden):
    inputs = recorded_inputs(golden, pipeline.config)
    np.testing.assert_array_equal(inputs.input_ids, golden["fused.input_ids"])
    samples = sample_from_inputs(pipeline, inputs, jax.random.key(0), greedy(pipeline, 24),
                                 noise=golden["diffusion.noise"])
    assert_close(samples.xyz[0], golden["rollout.pred_xyz"][0, 0], 1e-4, "pred_xyz from recorded inputs")


def test_sampling_is_deterministic_per_key(pipeline, inputs):
    settings = InferenceConfig.from_model(pipeline.config, num_samples=2, temperature=1.5, max_new_tokens=8)

    def run(seed):
        return sample_from_inputs(pipeline, inputs, jax.random.key(seed), settings)

    first, again, other = run(1), run(1), run(2)
    assert first.xyz.shape == (1, 2, 64, 3) and first.rotation.shape == (1, 2, 64, 3, 3)
    assert first.generated_token_ids == again.generated_token_ids
    np.testing.assert_array_equal(first.xyz, again.xyz)
    assert first.generated_token_ids != other.generated_token_ids
    assert not np.allclose(first.xyz, other.xyz)
    start = pipeline.config.traj_token_start_idx
    tokens = np.array(first.generated_token_ids + other.generated_token_ids).reshape(-1)
    assert not ((tokens >= start) & (tokens < start + pipeline.config.traj_vocab_size)).any()


def test_per_clip_keys_make_a_clip_independent_of_its_batch(pipeline, golden, history):
    """With one key per clip, a clip sampled alone and beside another clip gets the same tokens
    and noise (trajectories equal to float rounding); with one batch key it would not."""
    settings = InferenceConfig.from_model(pipeline.config, num_samples=2, temperature=1.5, max_new_tokens=8)
    frames = golden["input.image_frames"]
    clips = [Clip.create(f, history[0][0], history[1][0]) for f in (frames, frames[:, ::-1])]
    key, other = jax.random.key(7), jax.random.key(8)
    alone = sample_trajectories(pipeline, clips[:1], key[None], settings)
    batched = sample_trajectories(pipeline, clips[::-1], jnp.stack([other, key]), settings)
    assert batched.generated_token_ids[1] == alone.generated_token_ids[0]
    error = float(np.abs(batched.xyz[1] - alone.xyz[0]).max())
    print(f"per-clip key: xyz alone vs batched, max abs difference {error:.2e} m")
    assert error <= 1e-4
    with pytest.raises(ValueError, match="one key per clip|one PRNG key or"):
        sample_trajectories(pipeline, clips, jnp.stack([key, other, key]), settings)


def test_bad_noise_is_rejected(pipeline, inputs):
    for noise, message in ((np.zeros((2, 64, 2)), "noise must be"), (np.full((1, 64, 2), np.nan), "non-finite"),
                           (np.zeros((1, 64, 2), np.int32), "floating-point")):
        with pytest.raises(ValueError, match=message):
            sample_from_inputs(pipeline, inputs, jax.random.key(0), greedy(pipeline, 2), noise=noise)


def _cli(*args, cwd=None, devices=1):
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-m", "alpamayo_jax.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


def _check_result(path, num_samples):
    result = json.loads(path.read_text())
    assert np.asarray(result["xyz"]).shape == (num_samples, 64, 3)
    assert np.asarray(result["rotation"]).shape == (num_samples, 64, 3, 3)
    assert np.asarray(result["actions"]).shape == (num_samples, 64, 2)
    assert len(result["generated_token_ids"]) == len(result["cot"]) == num_samples
    assert [len(ids) for ids in result["generated_token_ids"]] >= result["num_generated_tokens"]
    assert {"generate", "flow_matching", "rollout"} <= set(result["timings"])
    assert set(result["settings"]) == {"num_samples", "greedy", "temperature", "top_p", "top_k", "max_new_tokens",
                                       "num_flow_steps"}
    assert result["settings"]["num_samples"] == num_samples and isinstance(result["seed"], int) and result["model"]
    return result


def _check_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == (600, 600)  # the bird's-eye view, 6 x 6 inches at 100 dpi (tests/test_plots.py
        assert len(image.getcolors(maxcolors=100_000) or []) > 3  # checks what it shows)


def test_infer_command(fixture_dir, golden, history, tmp_path):
    from alpamayo_jax.processing.clip import Clip
    from alpamayo_jax.processing.clip_file import save_clip

    clip_path = tmp_path / "clip.npz"
    save_clip(clip_path, Clip.create(golden["input.image_frames"], history[0][0], history[1][0]))
    np.save(tmp_path / "noise.npy", golden["diffusion.noise"])
    out, plot = tmp_path / "out.json", tmp_path / "plot.png"
    run = _cli("infer", "--model", str(fixture_dir / "hf"), "--processor-dir", str(fixture_dir / "vlm"),
               "--clip", str(clip_path), "--noise", str(tmp_path / "noise.npy"), "--greedy",
               "--max-new-tokens", "24", "--out", str(out), "--plot", str(plot))
    assert run.returncode == 0, run.stderr
    result = _check_result(out, 1)
    assert result["settings"] == {"num_samples": 1, "greedy": True, "temperature": None, "top_p": None,
                                  "top_k": None, "max_new_tokens": 24, "num_flow_steps": 10}
    assert result["model"] == str(fixture_dir / "hf") and result["seed"] == 0
    assert_close(np.asarray(result["xyz"]), golden["rollout.pred_xyz"][0, 0], 1e-4, "infer --clip pred_xyz")
    _check_png(plot)

    inputs_path = tmp_path / "inputs.safetensors"
    save_file({"input_ids": golden["processor.input_ids"], "pixel_values": golden["processor.pixel_values"],
               "image_grid_thw": golden["processor.image_grid_thw"], "ego_history_xyz": history[0],
               "ego_history_rot": history[1]}, inputs_path)
    # In this process: the child above ran the command as a user runs it.
    assert cli.main(["infer", "--model", str(fixture_dir / "hf"), "--processor-dir", str(fixture_dir / "vlm"),
                     "--inputs", str(inputs_path), "--noise", str(tmp_path / "noise.npy"), "--greedy",
                     "--max-new-tokens", "24", "--out", str(tmp_path / "out2.json")]) == 0
    assert_close(np.asarray(_check_result(tmp_path / "out2.json", 1)["xyz"]), golden["rollout.pred_xyz"][0, 0],
                 1e-4, "infer --inputs pred_xyz")
    # Tensor parallel over two CPU devices: the same result.
    run = _cli("infer", "--model", str(fixture_dir / "hf"), "--processor-dir", str(fixture_dir / "vlm"),
               "--clip", str(clip_path), "--noise", str(tmp_path / "noise.npy"), "--greedy",
               "--max-new-tokens", "24", "--out", str(tmp_path / "out3.json"), "--mesh", "model2", devices=2)
    assert run.returncode == 0, run.stderr
    assert_close(np.asarray(_check_result(tmp_path / "out3.json", 1)["xyz"]), golden["rollout.pred_xyz"][0, 0],
                 1e-4, "infer --mesh model2 pred_xyz")


def test_demo_command(tmp_path):
    """The shipped demo model (trained by scripts/make_demo_model.py) loads and, on a new synthetic
    scene, writes readable text: greedy, exactly the scene's own explanation; sampled, sentences
    made of the explanations' words."""
    import re

    from alpamayo_jax.data.driving_scenes import EXPLANATIONS

    run = _cli("demo", "--num-samples", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "sample 1:" in run.stdout and "after 6.4 s" in run.stdout
    _check_png(tmp_path / "alpamayo_demo.png")
    result = _check_result(tmp_path / "alpamayo_demo.json", 2)
    assert result["model"] == "embedded demo model"
    assert result["settings"]["num_samples"] == 2 and result["settings"]["greedy"] is False
    vocabulary = set(re.findall(r"[a-z]+", " ".join(EXPLANATIONS.values()).lower()))
    for text in result["cot"]:
        words = re.findall(r"[a-z]+", text.lower())
        assert len(words) >= 4 and set(words) <= vocabulary, text
    greedy = _cli("demo", "--greedy", "--seed", "2", "--out", "greedy.json", "--plot", "greedy.png", cwd=tmp_path)
    assert greedy.returncode == 0, greedy.stderr
    scene = re.search(r"the scene's own explanation: '([^']+)'", greedy.stdout).group(1)
    assert json.loads((tmp_path / "greedy.json").read_text())["cot"] == [scene]


def test_clips_of_different_sizes_share_a_left_padded_batch(pipeline, golden, history, inputs):
    """A smaller clip is padded on the left next to the fixture's: the pads are masked in the
    prefill, the decode steps and the expert, so each row equals its own run (greedy, same noise)."""
    from alpamayo_jax.processing.synthetic import synthetic_clip

    small = synthetic_clip(3, image_size=(32, 32))
    fixture_clip = Clip.create(golden["input.image_frames"], history[0][0], history[1][0])
    batch = pipeline.prepare([fixture_clip, small])
    alone = pipeline.prepare(small)
    padding = batch.prompt_length - alone.prompt_length
    assert padding > 0 and not batch.attention_mask[1, :padding].any() and batch.attention_mask[0].all()
    np.testing.assert_array_equal(batch.input_ids[1, padding:], alone.input_ids[0])
    np.testing.assert_array_equal(batch.rope_deltas[1], alone.rope_deltas[0] - padding)

    settings = greedy(pipeline, 12)
    noise = np.random.default_rng(0).normal(size=(2, 64, 2)).astype(np.float32)
    together = sample_from_inputs(pipeline, batch, jax.random.key(0), settings, noise=noise)
    first = sample_from_inputs(pipeline, inputs, jax.random.key(0), settings, noise=noise[:1])
    second = sample_from_inputs(pipeline, alone, jax.random.key(0), settings, noise=noise[1:])
    for row, own in ((0, first), (1, second)):
        # The batch runs until its slowest row stops; a row's tokens equal its own run up to its stop.
        mine = own.generated_token_ids[0][0]
        assert together.generated_token_ids[row][0][:len(mine)] == mine
        assert_close(together.actions[row], own.actions[0], 1e-5, f"row {row} actions, batched vs alone")
        assert_close(together.xyz[row], own.xyz[0], 1e-5, f"row {row} xyz, batched vs alone")


def test_own_token_counts_exclude_the_padding_after_eos():
    from alpamayo_jax.inference.pipeline import own_token_counts

    eos, pad = 482, 480
    raw = np.array([[5, 6, eos, pad, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad]])
    np.testing.assert_array_equal(own_token_counts(raw, eos), [3, 5, 1])
