"""`alpamayo-jax verify --stage 2`: NVIDIA's stage-2 training code vs ours, gradient by gradient.

The comparison itself needs NVIDIA's source tree (ALPAMAYO_REFERENCE_SRC, an NVlabs/alpamayo
checkout at commit 1cba38c) and its Python dependencies (hydra-core, omegaconf,
antlr4-python3-runtime, colorlog, torchvision) on the path; without them those tests skip and
say what is missing (CI has neither). The clear error for a missing reference always runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from alpamayo_jax import cli

verify_training = pytest.importorskip("alpamayo_reference.verify_training",
                                      reason="the PyTorch reference (the `test` extra: torch, transformers)")
REFERENCE_ENV = "ALPAMAYO_REFERENCE_SRC"


def _arguments(fixture_dir, examples, reference_src) -> list[str]:
    directory, paths = examples
    return ["verify", "--stage", "2", "--model", str(fixture_dir / "hf"), "--processor-dir", str(fixture_dir / "vlm"),
            "--examples", *map(str, paths), "--flow-timesteps", str(directory / "t.npy"),
            "--flow-noise", str(directory / "noise.npy"), "--reference-src", str(reference_src)]


# ---------------------------------------------------------------- always: a missing reference

def test_missing_reference_source_is_a_clear_error(fixture_dir, examples, tmp_path, capsys):
    missing = tmp_path / "no-such-tree"
    with pytest.raises(verify_training.ReferenceUnavailable, match="not a directory.*NVlabs/alpamayo"):
        verify_training.verify_stage2(fixture_dir / "hf", examples[1], processor_dir=fixture_dir / "vlm",
                                      reference_src=missing, flow_timesteps=np.zeros(2, np.float32),
                                      flow_noise=np.zeros((2, 64, 2), np.float32))
    assert cli.main(_arguments(fixture_dir, examples, missing)) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "NVlabs/alpamayo" in err
    # Not a source tree: the files it lacks are named.
    (tmp_path / "other").mkdir()
    assert cli.main(_arguments(fixture_dir, examples, tmp_path / "other")) == 2
    assert "finetune/sft/models/sft_alpamayo_r1.py" in capsys.readouterr().err
    with pytest.raises(verify_training.ReferenceUnavailable, match="--reference-src"):
        verify_training.check_reference(None)


def test_missing_reference_dependencies_are_named(tmp_path, monkeypatch):
    for name in verify_training.REFERENCE_FILES:  # a tree with the right files, contents irrelevant here
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    # Only hydra and torchvision missing (every other dependency reported present).
    monkeypatch.setattr(verify_training.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("hydra", "torchvision") else object())
    with pytest.raises(verify_training.ReferenceUnavailable) as error:
        verify_training.check_reference(tmp_path)
    message = str(error.value)
    assert "hydra (hydra-core==1.3.8), torchvision (torchvision==0.28.0)." in message
    assert "omegaconf" not in message and "PYTHONPATH" in message
    monkeypatch.setattr(verify_training.importlib.util, "find_spec", lambda name, *a: object())
    assert verify_training.check_reference(tmp_path) == tmp_path


def test_verify_without_stage_still_needs_hf_dir(fixture_dir, capsys):
    assert cli.main(["verify", "--model", str(fixture_dir / "hf")]) == 2
    assert "--hf-dir is required" in capsys.readouterr().err


# ---------------------------------------------------------------- with NVIDIA's code

@pytest.fixture(scope="module")
def reference_src():
    value = os.environ.get(REFERENCE_ENV)
    if not value:
        pytest.skip(f"set {REFERENCE_ENV} to an NVlabs/alpamayo source tree (commit 1cba38c) with hydra-core, "
                    "omegaconf, antlr4-python3-runtime, colorlog and torchvision importable")
    try:
        return verify_training.check_reference(Path(value))
    except verify_training.ReferenceUnavailable as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def report(fixture_dir, examples, reference_src):
    directory, paths = examples
    return verify_training.verify_stage2(fixture_dir / "hf", paths, processor_dir=fixture_dir / "vlm",
                                         reference_src=reference_src,
                                         flow_timesteps=np.load(directory / "t.npy"),
                                         flow_noise=np.load(directory / "noise.npy"))


def test_reference_reproduces_the_fixture(report, train_golden):
    """Same code, same numbers: exactly, but for the instruction-set dependence of PyTorch's CPU
    kernels (bit-exact with AVX2 kernels, see convert/verify_training.py)."""
    reference = report.reference
    np.testing.assert_array_equal(reference.actions, train_golden["stage2.x"])
    np.testing.assert_array_equal(reference.noisy_actions, train_golden["stage2.noisy_x"])
    np.testing.assert_array_equal(reference.timesteps, train_golden["stage2.timesteps"][:, 0, 0])
    np.testing.assert_array_equal(reference.vlm_inputs["input_ids"], train_golden["stage2.vlm_input_ids"])
    np.testing.assert_array_equal(reference.vlm_inputs["pixel_values"], train_golden["data.pixel_values"])
    expected = {key[len("grad.stage2."):]: value for key, value in train_golden.items()
                if key.startswith("grad.stage2.")}
    assert set(reference.gradients) == set(expected)
    tolerance = 2e-6  # observed 5.4e-7 across CPU kernels, 1.9e-7 across thread counts
    assert abs(reference.loss - float(train_golden["stage2.loss"])) <= tolerance * abs(reference.loss)
    for key, value in expected.items():
        scale = np.abs(value).max()
        assert np.abs(reference.gradients[key] - value).max() <= tolerance * scale, key


def test_reference_mode_matches_nvidia(report):
    assert report.ok, "\n".join(f"{e.stage}: {e.relative:.3e}" for e in report.errors if not e.ok)
    gradients = [e for e in report.errors if e.stage.startswith("grad ")]
    assert len(gradients) == 46
    assert max(e.relative for e in gradients) < 2e-5  # the fixture README's x-injected tolerance


def test_cli_default_attention_differs(fixture_dir, examples, reference_src, tmp_path, capsys):
    """Our default (bidirectional, padding masked) is not what NVIDIA trains: exit 1, and the JSON
    says by how much."""
    out = tmp_path / "report.json"
    code = cli.main([*_arguments(fixture_dir, examples, reference_src), "--expert-attention", "default",
                     "--json", str(out)])
    assert code == 1, capsys.readouterr().err
    written = json.loads(out.read_text())
    rows = {row["stage"]: row for row in written["errors"]}
    assert not written["ok"] and rows["batch input_ids (history fused)"]["ok"]
    assert all(not row["ok"] for stage, row in rows.items() if stage.startswith("grad "))
    assert "verification FAILED" in capsys.readouterr().out
