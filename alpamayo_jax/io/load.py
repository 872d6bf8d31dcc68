"""One call from a path to a ready model: a converted bundle or a Hugging Face checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.io.bundle import is_bundle, load_bundle
from alpamayo_jax.io.hf import CONFIG_FILE, load_hf_checkpoint
from alpamayo_jax.models.alpamayo import AlpamayoR1


def load_model(path: str | os.PathLike, *, dtype=None, processor_dir: str | os.PathLike | None = None,
               mesh: jax.sharding.Mesh | None = None) -> tuple[AlpamayoR1, AlpamayoConfig]:
    """Loads the model from a bundle (see `alpamayo_jax.io.bundle`) or from a Hugging Face
    checkpoint directory (streamed tensor by tensor; its backbone config comes from
    `processor_dir`, `vlm_name_or_path` or a preset). `dtype` casts every parameter (default: as
    stored); with `mesh`, each tensor goes straight into its sharding (`alpamayo_jax.sharding`),
    never whole on one device. Reads local files only."""
    path = Path(path)
    if is_bundle(path):
        return load_bundle(path, dtype=dtype, mesh=mesh)
    if (path / CONFIG_FILE).is_file():
        return load_hf_checkpoint(path, backbone_dir=processor_dir, dtype=dtype, mesh=mesh)
    raise FileNotFoundError(f"{path} is neither a converted bundle nor a Hugging Face checkpoint directory")
