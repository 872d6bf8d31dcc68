"""Bundles written from a Hugging Face checkpoint (`convert_checkpoint`) or from a model in memory,
such as a fine-tuned one (`save_model_bundle`), each with a report of what was written."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.io.assign import Assignment, plan_assignment, read_assignment
from alpamayo_jax.io.atomic import atomic_directory
from alpamayo_jax.io.bundle import (
    BACKBONE_CONFIG_FILE,
    CONFIG_FILE,
    PARAMS_DIR,
    PROCESSOR_DIR,
    is_bundle,
    param_group,
    save_param_group,
    save_params,
    write_bundle_files,
)
from alpamayo_jax.io.hf import abstract_model, read_hf_config
from alpamayo_jax.io.weight_map import alpamayo_rules
from alpamayo_jax.models.alpamayo import AlpamayoR1
from alpamayo_jax.nn.variables import module_variables
from alpamayo_jax.processing.chat_template import load_chat_template
from alpamayo_jax.processing.tokenizer import build_tokenizer

# Files of a processor directory copied as they are; the tokenizer is written extended.
PROCESSOR_FILES = ("chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "video_preprocessor_config.json")
REQUIRED_PROCESSOR_FILES = ("tokenizer.json", "preprocessor_config.json")
TOP_LEVEL_MODULES = ("vlm.visual", "vlm.language_model", "vlm.lm_head", "expert", "action_in_proj",
                     "action_out_proj", "action_space")
VERSIONED = ("jax", "jaxlib", "flax", "orbax-checkpoint", "numpy", "safetensors")


def _processor_writer(processor_dir: Path, config: AlpamayoConfig) -> Callable[[Path], None]:
    """Checks the processor directory and extends its tokenizer now (before any weight is read);
    returns the function that writes both into the bundle."""
    missing = [name for name in REQUIRED_PROCESSOR_FILES if not (processor_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"processor directory {processor_dir} lacks {missing}")
    if not ((processor_dir / "chat_template.jinja").is_file() or (processor_dir / "chat_template.json").is_file()):
        raise FileNotFoundError(f"processor directory {processor_dir} has no chat template "
                                "(chat_template.jinja or chat_template.json)")

    load_chat_template(processor_dir)  # fails early on a template that cannot be read
    tokenizer = build_tokenizer(processor_dir, config)

    def write(target: Path) -> None:
        for name in PROCESSOR_FILES:
            if (processor_dir / name).is_file():
                shutil.copy2(processor_dir / name, target / name)
        tokenizer.save(target)

    return write


def convert_checkpoint(
    hf_dir: str | os.PathLike,
    processor_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype=None,
    force: bool = False,
    on_tensor: Callable[[Assignment, np.ndarray], None] | None = None,
) -> dict:
    """Converts an Alpamayo-R1 Hugging Face checkpoint into a bundle at `out_dir`.

    `processor_dir` holds the backbone's tokenizer/processor files (and, unless the backbone is a
    known preset, its `config.json`); the bundle gets the tokenizer extended with the trajectory and
    special tokens, checked against the config's token ids. Every problem with the config, the files or the weights is
    reported before anything is written; `out_dir` appears only when the bundle is complete.
    `on_tensor(item, values)` is called after each tensor is read, with its values in checkpoint
    layout and the parameter's dtype (progress reporting). Peak memory is about the largest group
    of parameters (at least the largest tensor) plus a block of each read.
    Returns the conversion report (also written to the bundle).
    """
    hf_dir, processor_dir = Path(hf_dir), Path(processor_dir)
    started = time.perf_counter()
    config, config_dict, backbone_dict = read_hf_config(hf_dir, processor_dir)
    write_processor = _processor_writer(processor_dir, config)
    model, _, reader = abstract_model(hf_dir, backbone_dir=processor_dir, dtype=dtype)
    variables = module_variables(model)
    layout = reader.describe()
    plan = plan_assignment(variables, layout, alpamayo_rules())
    groups: dict[str, list[Assignment]] = {}
    for item in plan:
        groups.setdefault(param_group(item.path), []).append(item)
    checksums: dict[str, str] = {}
    source_dtypes = {str(layout[item.key][1]) for item in plan}

    with atomic_directory(out_dir, force=force) as staging:
        # One group (a decoder layer, a vision block, a module) in memory at a time.
        for group, items in groups.items():
            values = {}
            for item in items:
                digest = hashlib.sha256()  # of the stored bytes, fed block by block as they are read
                values[item.path] = read_assignment(item, reader, variables[item.path], on_tensor,
                                                    on_bytes=digest.update)
                checksums[item.key] = digest.hexdigest()
            save_param_group(staging / PARAMS_DIR, group, values)
            del values
        per_module = {name: sum(int(np.prod(v.shape)) for path, v in variables.items()
                                if path.startswith(name + "."))
                      for name in TOP_LEVEL_MODULES}
        report = {
            "source": {
                "checkpoint": str(hf_dir.absolute()),
                "processor": str(processor_dir.absolute()),
                "files": {p.name: p.stat().st_size for p in sorted(hf_dir.glob("*.safetensors*"))},
            },
            "num_tensors": len(checksums),
            "num_parameters": sum(per_module.values()),
            "parameters_per_module": per_module,
            "dtype": str(next(iter(variables.values())).dtype),
            "source_dtypes": sorted(source_dtypes),
            "sha256": dict(sorted(checksums.items())),
            "versions": {name: importlib.metadata.version(name) for name in VERSIONED},
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_bundle_files(staging, config=config_dict, backbone=backbone_dict, processor_writer=write_processor,
                           report=report)
    return report


def save_model_bundle(
    model: AlpamayoR1,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    processor_dir: str | os.PathLike | None = None,
    provenance: dict | None = None,
    force: bool = False,
) -> dict:
    """Writes `model`'s parameters as a bundle at `out_dir` that `infer` and `Pipeline.load` read.

    `source` is the bundle or Hugging Face checkpoint the model was loaded from (with its
    `processor_dir` for the latter): the bundle takes its config, backbone config and processor
    from there, so it must describe the same architecture (checked). `provenance` (e.g. the
    training run) goes into the report. Atomic, as `convert_checkpoint`. Returns the report."""
    source = Path(source)
    started = time.perf_counter()
    if is_bundle(source):
        config_dict = json.loads((source / CONFIG_FILE).read_text())
        backbone_dict = json.loads((source / BACKBONE_CONFIG_FILE).read_text())
        config = AlpamayoConfig.from_hf_config(config_dict, backbone_dict)

        def write_processor(target: Path) -> None:
            shutil.copytree(source / PROCESSOR_DIR, target, dirs_exist_ok=True)
    else:
        if processor_dir is None:
            raise ValueError(f"{source} is a Hugging Face checkpoint: its processor directory is needed too")
        config, config_dict, backbone_dict = read_hf_config(source, processor_dir)
        write_processor = _processor_writer(Path(processor_dir), config)
    if config != model.config:
        raise ValueError(f"the model's config differs from {source}'s; a bundle must describe the model it holds")
    variables = module_variables(model)
    with atomic_directory(out_dir, force=force) as staging:
        save_params(model, staging / PARAMS_DIR)
        report = {
            "source": {"model": str(source.absolute()),
                       **({"processor": str(Path(processor_dir).absolute())} if processor_dir else {})},
            **({"provenance": provenance} if provenance else {}),
            "num_parameters": sum(int(np.prod(v.shape)) for v in variables.values()),
            "dtype": str(next(iter(variables.values())).dtype),
            "versions": {name: importlib.metadata.version(name) for name in VERSIONED},
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_bundle_files(staging, config=config_dict, backbone=backbone_dict, processor_writer=write_processor,
                           report=report)
    return report
