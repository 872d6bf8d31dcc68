"""The converted-model bundle: parameters in orbax plus everything inference needs offline.

Layout of a bundle directory:

    params/                    orbax checkpoint of every parameter and buffer (nested by path)
    config.json                the Alpamayo config, as in the source checkpoint
    backbone_config.json       the Qwen3-VL backbone config
    processor/                 tokenizer, chat template and image-processor settings
    conversion_report.json     what was converted: sources, counts, checksums, versions

A bundle is written into a temporary sibling directory and renamed into place only when complete,
so a failed or interrupted conversion leaves nothing behind; an existing bundle is replaced only
when asked to (`force=True`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.io.assign import module_variables
from alpamayo_jax.models.alpamayo import AlpamayoR1
from alpamayo_jax.nn.variables import Buffer

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
BACKBONE_CONFIG_FILE = "backbone_config.json"
PROCESSOR_DIR = "processor"
REPORT_FILE = "conversion_report.json"


def is_bundle(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file() and (path / BACKBONE_CONFIG_FILE).is_file()


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory next to `out_dir`; on success it becomes `out_dir`, on any
    error it is removed. An existing `out_dir` raises FileExistsError unless `force`, checked
    before any work is done."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} already exists; pass force=True (--force) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, retired / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _parameter_tree(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, Buffer)))


def write_bundle(
    staging: Path,
    model: AlpamayoR1,
    *,
    config: dict,
    backbone: dict,
    processor_writer: Callable[[Path], None],
    report: dict,
) -> None:
    """Fills `staging` (from `atomic_directory`) with a complete bundle."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / PARAMS_DIR, _parameter_tree(model))
    checkpointer.wait_until_finished()
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (staging / BACKBONE_CONFIG_FILE).write_text(json.dumps(backbone, indent=2, sort_keys=True) + "\n")
    processor = staging / PROCESSOR_DIR
    processor.mkdir()
    processor_writer(processor)
    (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def read_bundle_config(bundle: str | os.PathLike) -> AlpamayoConfig:
    bundle = Path(bundle)
    return AlpamayoConfig.from_hf_config(json.loads((bundle / CONFIG_FILE).read_text()),
                                         json.loads((bundle / BACKBONE_CONFIG_FILE).read_text()))


def load_bundle(
    bundle: str | os.PathLike,
    *,
    dtype=None,
    sharding: Callable[[str, jax.ShapeDtypeStruct], jax.sharding.Sharding | None] | None = None,
) -> tuple[AlpamayoR1, AlpamayoConfig]:
    """Restores the model from a bundle, every array cast to `dtype` (default: as stored) and
    placed with `sharding(path, abstract_array)` (default device if None)."""
    bundle = Path(bundle).absolute()
    if not is_bundle(bundle):
        raise FileNotFoundError(f"{bundle} is not a converted bundle (expected {PARAMS_DIR}/, {CONFIG_FILE}, "
                                f"{BACKBONE_CONFIG_FILE})")
    config = read_bundle_config(bundle)
    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.metadata(bundle / PARAMS_DIR).item_metadata.tree
    stored_dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(stored)}
    if dtype is None and len(stored_dtypes) != 1:
        raise ValueError(f"{bundle} stores mixed dtypes {sorted(stored_dtypes)}; choose one with dtype=")
    param_dtype = jnp.dtype(dtype if dtype is not None else stored_dtypes.pop())
    model = nnx.eval_shape(lambda: AlpamayoR1(config, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    variables = module_variables(model)
    target_tree = _parameter_tree(model)
    flat_targets = {}
    for path, variable in variables.items():
        placement = None if sharding is None else sharding(path, variable.get_value())
        flat_targets[path] = jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=placement)
    target = _unflatten(target_tree, flat_targets)
    restored = checkpointer.restore(bundle / PARAMS_DIR, target=target)
    state = nnx.state(model, nnx.Any(nnx.Param, Buffer))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model, config


def _unflatten(template: dict, flat: dict[str, object], prefix: str = "") -> dict:
    """`template`'s nesting with each leaf replaced by `flat['a.b.c']`."""
    return {key: _unflatten(value, flat, f"{prefix}{key}.") if isinstance(value, dict) else flat[f"{prefix}{key}"]
            for key, value in template.items()}
