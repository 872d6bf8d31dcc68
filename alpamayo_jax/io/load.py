"""One call from a path to a ready model (or just its config): a converted bundle or a Hugging Face
checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.io.bundle import is_bundle, load_bundle, read_bundle_config
from alpamayo_jax.io.hf import CONFIG_FILE, load_hf_checkpoint, read_hf_config
from alpamayo_jax.models.alpamayo import AlpamayoR1


def load_model(path: str | os.PathLike, *, dtype=None, processor_dir: str | os.PathLike | None = None,
               mesh: jax.sharding.Mesh | None = None) -> tuple[AlpamayoR1, AlpamayoConfig]:
    """Loads the model from a bundle (see `alpamayo_jax.io.bundle`) or from a Hugging Face
    checkpoint directory (streamed tensor by tensor; its backbone config comes from
    `processor_dir`, `vlm_name_or_path` or a preset). `dtype` casts every parameter (default: as
    stored); with `mesh`, each tensor goes straight into its sharding (`alpamayo_jax.sharding`),
    never whole on one device. Reads local files only."""
    if _is_bundle(path):
        return load_bundle(path, dtype=dtype, mesh=mesh)
    return load_hf_checkpoint(path, backbone_dir=processor_dir, dtype=dtype, mesh=mesh)


def load_config(path: str | os.PathLike, *, processor_dir: str | os.PathLike | None = None) -> AlpamayoConfig:
    """The model config of a bundle or a Hugging Face checkpoint directory (resolved as
    `load_model` does), without reading any weights: cheap enough to check options against the
    checkpoint before loading it."""
    if _is_bundle(path):
        return read_bundle_config(path)
    return read_hf_config(path, processor_dir)[0]


def _is_bundle(path: str | os.PathLike) -> bool:
    """True for a bundle, False for a Hugging Face checkpoint directory; raises for anything else."""
    if is_bundle(path):
        return True
    if (Path(path) / CONFIG_FILE).is_file():
        return False
    raise FileNotFoundError(f"{path} is neither a converted bundle nor a Hugging Face checkpoint directory")
