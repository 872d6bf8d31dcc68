"""Hugging Face checkpoints of Alpamayo-R1: config resolution, streaming load, export.

An Alpamayo checkpoint directory holds `config.json` and safetensors weights; its backbone config
(the Qwen3-VL `config.json`) lives in the directory `vlm_name_or_path` names. `resolve_backbone`
finds it, in this order: an explicit processor/backbone directory, `vlm_name_or_path` relative to
the checkpoint directory, then the presets shipped for known backbone names. Nothing touches the
network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpamayo_jax.config import AlpamayoConfig, ConfigError, load_preset_json
from alpamayo_jax.io.assign import Assignment, Placement, export_tensors, load_tensors_into
from alpamayo_jax.io.safetensors import DTYPES, CheckpointReader, write_safetensors
from alpamayo_jax.io.weight_map import alpamayo_rules
from alpamayo_jax.models.alpamayo import AlpamayoR1

CONFIG_FILE = "config.json"
# Backbones whose config ships as a preset: the Cosmos-Reason2-8B fine-tune has the
# Qwen3-VL-8B-Instruct architecture.
KNOWN_BACKBONES = {
    "nvidia/Cosmos-Reason2-8B": "qwen3_vl_8b_backbone",
    "Qwen/Qwen3-VL-8B-Instruct": "qwen3_vl_8b_backbone",
}


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None


def resolve_backbone(config: dict, hf_dir: Path, backbone_dir: str | os.PathLike | None = None) -> dict:
    """The backbone's Qwen3-VL config dict for the Alpamayo `config` stored in `hf_dir`."""
    name = config.get("vlm_name_or_path")
    tried = []
    for directory in ([Path(backbone_dir)] if backbone_dir else []) + ([hf_dir / name] if name else []):
        path = directory / CONFIG_FILE
        tried.append(str(path))
        if path.is_file():
            backbone = read_json(path)
            if backbone.get("model_type") == "qwen3_vl":
                return backbone
    if name in KNOWN_BACKBONES:
        return load_preset_json(KNOWN_BACKBONES[name])
    raise ConfigError(
        f"no Qwen3-VL backbone config found for vlm_name_or_path={name!r} (looked at {tried or 'nothing'}; "
        f"presets exist for {sorted(KNOWN_BACKBONES)}). Pass the backbone/processor directory."
    )


def read_hf_config(hf_dir: str | os.PathLike, backbone_dir=None) -> tuple[AlpamayoConfig, dict, dict]:
    """(parsed config, Alpamayo config dict, backbone config dict) of a checkpoint directory."""
    hf_dir = Path(hf_dir)
    config = read_json(hf_dir / CONFIG_FILE)
    backbone = resolve_backbone(config, hf_dir, backbone_dir)
    return AlpamayoConfig.from_hf_config(config, backbone), config, backbone


def checkpoint_dtype(reader: CheckpointReader) -> np.dtype:
    """The one floating dtype of a checkpoint's tensors; raises if they mix dtypes."""
    dtypes = {DTYPES[info.dtype] for info in reader.tensors.values()}
    floating = {d for d in dtypes if jnp.issubdtype(d, jnp.floating)}
    if len(floating) != 1:
        raise ValueError(f"the checkpoint mixes floating dtypes {sorted(map(str, floating))}; choose one with dtype=")
    return floating.pop()


def abstract_model(hf_dir: str | os.PathLike, *, backbone_dir=None, dtype=None
                   ) -> tuple[AlpamayoR1, AlpamayoConfig, CheckpointReader]:
    """The model for a checkpoint directory, created abstractly (`nnx.eval_shape`, nothing
    allocated) in `dtype` (default: the checkpoint's own), and the validated reader of its files."""
    config, _, _ = read_hf_config(hf_dir, backbone_dir)
    reader = CheckpointReader(hf_dir)
    param_dtype = jnp.dtype(dtype) if dtype is not None else checkpoint_dtype(reader)
    model = nnx.eval_shape(lambda: AlpamayoR1(config, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return model, config, reader


def load_hf_checkpoint(
    hf_dir: str | os.PathLike,
    *,
    backbone_dir: str | os.PathLike | None = None,
    dtype=None,
    place: Placement | None = None,
    on_tensor: Callable[[Assignment, np.ndarray], None] | None = None,
) -> tuple[AlpamayoR1, AlpamayoConfig]:
    """Builds the model from a Hugging Face checkpoint directory, streaming tensor by tensor.

    The model is created abstractly (`nnx.eval_shape`), every header is checked and the whole
    key/shape plan validated before any data is read; then each tensor is read, cast to `dtype`
    (default: the checkpoint's own) and placed with `place` (default device if None).
    """
    model, config, reader = abstract_model(hf_dir, backbone_dir=backbone_dir, dtype=dtype)
    load_tensors_into(model, reader, alpamayo_rules(), place=place, on_tensor=on_tensor)
    return model, config


def save_hf_checkpoint(model: AlpamayoR1, out_dir: str | os.PathLike, config: dict) -> Path:
    """Writes the model back as `model.safetensors` with the reference's key names, plus its
    Alpamayo `config.json`, into a new directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    write_safetensors(out_dir / "model.safetensors", export_tensors(model, alpamayo_rules()),
                      metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
