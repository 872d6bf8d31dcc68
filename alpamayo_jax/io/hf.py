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
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from alpamayo_jax.config import AlpamayoConfig, ConfigError, load_preset_json
from alpamayo_jax.io.assign import Assignment, Placement, export_tensors, load_tensors_into
from alpamayo_jax.io.atomic import atomic_directory
from alpamayo_jax.io.safetensors import DTYPES, CheckpointReader, write_safetensors
from alpamayo_jax.io.weight_map import alpamayo_rules
from alpamayo_jax.nn.abstract import abstract_module
from alpamayo_jax.models.alpamayo import AlpamayoR1
from alpamayo_jax.sharding import param_shardings

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


# (config field as the files name it, value in the parsed config, checkpoint key, axis whose size
# equals the field (None: the number of layers/blocks under the key's `{i}`), divisor)
def _size_checks(config: AlpamayoConfig) -> list[tuple[str, int, str, int | None, int]]:
    text, vision, expert, proj = config.text, config.vision, config.expert, config.action_in_proj
    lm, visual = "vlm.model.language_model.", "vlm.model.visual."
    return [
        ("config.json vocab_size", text.vocab_size, lm + "embed_tokens.weight", 0, 1),
        ("backbone text_config.hidden_size", text.hidden_size, lm + "embed_tokens.weight", 1, 1),
        ("backbone text_config.num_hidden_layers", text.num_hidden_layers, lm + "layers.{i}.mlp.up_proj.weight",
         None, 1),
        ("backbone text_config.intermediate_size", text.intermediate_size, lm + "layers.0.mlp.up_proj.weight", 0, 1),
        ("backbone text_config.head_dim", text.head_dim, lm + "layers.0.self_attn.q_norm.weight", 0, 1),
        ("backbone text_config.num_attention_heads", text.num_attention_heads,
         lm + "layers.0.self_attn.q_proj.weight", 0, text.head_dim),
        ("backbone text_config.num_key_value_heads", text.num_key_value_heads,
         lm + "layers.0.self_attn.k_proj.weight", 0, text.head_dim),
        ("backbone vision_config.depth", vision.depth, visual + "blocks.{i}.norm1.weight", None, 1),
        ("backbone vision_config.hidden_size", vision.hidden_size, visual + "pos_embed.weight", 1, 1),
        ("backbone vision_config.num_position_embeddings", vision.num_position_embeddings,
         visual + "pos_embed.weight", 0, 1),
        ("backbone vision_config.intermediate_size", vision.intermediate_size,
         visual + "blocks.0.mlp.linear_fc1.weight", 0, 1),
        ("backbone vision_config.out_hidden_size", vision.out_hidden_size, visual + "merger.linear_fc2.weight", 0, 1),
        ("backbone vision_config.patch_size", vision.patch_size, visual + "patch_embed.proj.weight", 4, 1),
        ("backbone vision_config.temporal_patch_size", vision.temporal_patch_size,
         visual + "patch_embed.proj.weight", 2, 1),
        ("backbone vision_config.deepstack_visual_indexes (count)", len(vision.deepstack_visual_indexes),
         visual + "deepstack_merger_list.{i}.norm.weight", None, 1),
        ("config.json expert_cfg.hidden_size", expert.hidden_size, "expert.norm.weight", 0, 1),
        ("config.json expert_cfg.intermediate_size", expert.intermediate_size,
         "expert.layers.0.mlp.up_proj.weight", 0, 1),
        ("config.json expert_cfg.num_attention_heads", expert.num_attention_heads,
         "expert.layers.0.self_attn.q_proj.weight", 0, expert.head_dim),
        ("config.json action_in_proj_cfg.hidden_size", proj.hidden_size, "action_in_proj.encoder.trunk.0.weight",
         0, 1),
        ("config.json action_in_proj_cfg.num_fourier_feats", proj.num_fourier_feats, "action_in_proj.sinus.0.freqs",
         1, 1 / 2),
    ]


def config_weight_disagreements(config: AlpamayoConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Sizes the config states that the checkpoint's tensors contradict, each naming the config
    field, both values and the tensor that shows it. Tensors that are absent are left to the strict
    weight-map check."""
    problems = []
    for field, stated, key, axis, divisor in _size_checks(config):
        if axis is None:
            pattern = re.compile(re.escape(key).replace(r"\{i\}", r"(\d+)") + r"\Z")
            indexes = [int(m.group(1)) for k in shapes if (m := pattern.match(k))]
            if not indexes:
                continue
            found, evidence = max(indexes) + 1, key.replace("{i}", str(max(indexes)))
        else:
            if key not in shapes or len(shapes[key]) <= axis:
                continue
            found, evidence = int(shapes[key][axis] / divisor), f"{key} {tuple(shapes[key])}"
        if found != stated:
            problems.append(f"{field} = {stated}, but the weights have {found} ({evidence}): "
                            "the config does not describe this checkpoint")
    return problems


def abstract_model(hf_dir: str | os.PathLike, *, backbone_dir=None, dtype=None
                   ) -> tuple[AlpamayoR1, AlpamayoConfig, CheckpointReader]:
    """The model for a checkpoint directory, created abstractly (`abstract_module`, nothing
    allocated) in `dtype` (default: the checkpoint's own), and the validated reader of its files."""
    config, _, _ = read_hf_config(hf_dir, backbone_dir)
    reader = CheckpointReader(hf_dir)
    disagreements = config_weight_disagreements(config, {k: s for k, (s, _) in reader.describe().items()})
    if disagreements:
        raise ConfigError("config and weights disagree:\n  " + "\n  ".join(disagreements))
    param_dtype = jnp.dtype(dtype) if dtype is not None else checkpoint_dtype(reader)
    model = abstract_module(AlpamayoR1, config, param_dtype=param_dtype)
    return model, config, reader


def load_hf_checkpoint(
    hf_dir: str | os.PathLike,
    *,
    backbone_dir: str | os.PathLike | None = None,
    dtype=None,
    place: Placement | None = None,
    mesh: jax.sharding.Mesh | None = None,
    on_tensor: Callable[[Assignment, np.ndarray], None] | None = None,
) -> tuple[AlpamayoR1, AlpamayoConfig]:
    """Builds the model from a Hugging Face checkpoint directory, streaming tensor by tensor.

    The model is created abstractly (`abstract_module`), every header is checked and the whole
    key/shape plan validated before any data is read; then each tensor is read, cast to `dtype`
    (default: the checkpoint's own) and placed with `place`, or straight into its sharding on
    `mesh` (`alpamayo_jax.sharding`), or on the default device.
    """
    model, config, reader = abstract_model(hf_dir, backbone_dir=backbone_dir, dtype=dtype)
    if mesh is not None:
        if place is not None:
            raise ValueError("pass place or mesh, not both")
        shardings = param_shardings(model, mesh)

        def place(path: str, value: np.ndarray) -> jax.Array:
            return jax.device_put(value, shardings[path])

    load_tensors_into(model, reader, alpamayo_rules(), place=place, on_tensor=on_tensor)
    return model, config


def save_hf_checkpoint(model: AlpamayoR1, out_dir: str | os.PathLike, config: dict, *,
                       force: bool = False) -> Path:
    """Writes the model back as `model.safetensors` with the reference's key names, plus its
    Alpamayo `config.json`, into a new directory that appears only when complete. An existing
    `out_dir` raises FileExistsError unless `force` (then it is replaced)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, force=force) as staging:
        write_safetensors(staging / "model.safetensors", export_tensors(model, alpamayo_rules()),
                          metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
