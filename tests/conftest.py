"""Shared test fixtures: the reference fixture directory, its golden tensors and checkpoint.

Parity tests run in float32 with the highest matmul precision, so that differences measure the
implementation rather than the platform's reduced-precision matmuls.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from alpamayo_jax.compilation_cache import ENV_VAR, setup_compilation_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One persistent compilation cache per test run, in a fresh directory removed at exit: this
# process, the pytest-xdist workers (which inherit the variable) and every command-line child the
# tests start compile a program once and load it after that; nothing outside the run is read.
# tests/test_compilation.py gives its children their own directories.
if ENV_VAR not in os.environ:
    os.environ[ENV_VAR] = tempfile.mkdtemp(prefix="alpamayo-jax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ[ENV_VAR], ignore_errors=True)
setup_compilation_cache()

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "tiny_ar1_dev"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    """Tensors recorded from NVIDIA's reference code on the tiny checkpoint (see README there)."""
    return load_file(FIXTURE_DIR / "golden.safetensors")


@pytest.fixture(scope="session")
def golden_meta() -> dict:
    return json.loads((FIXTURE_DIR / "golden.json").read_text())


@pytest.fixture(scope="session")
def checkpoint() -> dict[str, np.ndarray]:
    """The tiny reference checkpoint (`AlpamayoR1.save_pretrained`, float32)."""
    return load_file(FIXTURE_DIR / "hf" / "model.safetensors")


@pytest.fixture(scope="session")
def tiny_model(checkpoint):
    """The whole tiny model with the reference checkpoint loaded through the weight map."""
    from flax import nnx

    from alpamayo_jax.config import tiny
    from alpamayo_jax.io.assign import load_tensors_into
    from alpamayo_jax.io.weight_map import alpamayo_rules
    from alpamayo_jax.models.alpamayo import AlpamayoR1

    model = AlpamayoR1(tiny(), rngs=nnx.Rngs(0))
    load_tensors_into(model, checkpoint, alpamayo_rules())
    return model


@pytest.fixture(scope="session")
def abstract_10b():
    """The full-size model through `abstract_module` (bf16 shapes only, nothing allocated)."""
    import jax.numpy as jnp

    from alpamayo_jax.config import alpamayo_r1_10b
    from alpamayo_jax.models.alpamayo import AlpamayoR1
    from alpamayo_jax.nn.abstract import abstract_module

    return abstract_module(AlpamayoR1, alpamayo_r1_10b(), param_dtype=jnp.bfloat16)


@pytest.fixture(scope="session")
def tiny_split(tiny_model):
    """`tiny_model` split once, as the jitted stages take it."""
    from alpamayo_jax.nn.module_jit import SplitModule

    return SplitModule.of(tiny_model)


def recorded_inputs(golden, config=None):
    """The fixture's sample as `ModelInputs`, from the reference processor's recorded outputs."""
    from alpamayo_jax.config import tiny
    from alpamayo_jax.processing.model_inputs import assemble_inputs

    return assemble_inputs(golden["processor.input_ids"], golden["processor.pixel_values"],
                           golden["processor.image_grid_thw"], golden["input.ego_history_xyz"][:, 0],
                           golden["input.ego_history_rot"][:, 0], config=config or tiny())


@pytest.fixture(scope="session")
def fixture_inputs(golden):
    return recorded_inputs(golden)


@pytest.fixture(scope="session")
def train_golden() -> dict[str, np.ndarray]:
    """Tensors recorded from NVIDIA's fine-tuning code on the tiny checkpoint (train/README.md)."""
    return load_file(FIXTURE_DIR / "train" / "train_golden.safetensors")


@pytest.fixture(scope="session")
def examples(train_golden, tmp_path_factory):
    """The fixture's two training samples as clip files (batch order), with its stage-2 flow
    draws as t.npy (B,) and noise.npy (B, 64, 2): (directory, clip paths)."""
    from alpamayo_jax.processing.clip import Clip
    from alpamayo_jax.processing.clip_file import save_clip

    directory = tmp_path_factory.mktemp("examples")
    paths = []
    for b in range(2):
        clip = Clip.create(train_golden[f"input.image_frames.{b}"], train_golden["input.ego_history_xyz"][b, 0],
                           train_golden["input.ego_history_rot"][b, 0],
                           ego_future_xyz=train_golden["input.ego_future_xyz"][b, 0],
                           ego_future_rot=train_golden["input.ego_future_rot"][b, 0])
        paths.append(directory / f"sample{b}.npz")
        save_clip(paths[-1], clip)
    np.save(directory / "t.npy", train_golden["stage2.timesteps"][:, 0, 0])
    np.save(directory / "noise.npy", train_golden["stage2.noise"])
    return directory, paths
