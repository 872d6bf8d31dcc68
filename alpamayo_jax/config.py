"""Model configuration: frozen dataclasses built strictly from Hugging Face `config.json` files.

An Alpamayo-R1 checkpoint carries two configs:

* the Alpamayo `config.json` (model_type ``alpamayo_r1``): expert overrides, action projections,
  action space, flow matching, trajectory tokenizers and token ids;
* the backbone's Qwen3-VL `config.json` (model_type ``qwen3_vl``), which the reference reads from
  the directory named by ``vlm_name_or_path``: the vision tower and the language model.

`AlpamayoConfig.from_hf_config(config, backbone)` turns both into one frozen tree. Every parser is
strict: a field it does not know raises `ConfigError` naming the field; fields that are knowingly
ignored are listed in `IGNORED_FIELDS`, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any


class ConfigError(ValueError):
    """A config dict that cannot be turned into a model config (unknown, missing or bad field)."""


# Fields that are present in real config files but have no effect on this implementation.
# Keep this the single place that says what is ignored and why.
IGNORED_FIELDS: dict[str, dict[str, str]] = {
    "alpamayo_r1": {
        "architectures": "informational",
        "transformers_version": "informational",
        "attn_implementation": "the reference overrides it to SDPA on load; attention here is exact",
        "keep_same_dtype": "parameters take the dtype chosen at load time",
        "dtype": "parameters take the dtype chosen at load time",
        "model_dtype": "parameters take the dtype chosen at load time",
        "torch_dtype": "parameters take the dtype chosen at load time",
        "add_special_tokens": "tokenizer extension, handled by input processing",
        "vlm_name_or_path": "where the backbone config lives; passed separately",
        "vlm_backend": "only the Qwen3-VL backbone exists",
        "image_height": "unused by the reference inference code",
        "image_width": "unused by the reference inference code",
        "hist_traj_embed_cfg": "unused by the reference inference code",
        "expert_non_causal_attention": "checked to be true; the expert is always non-causal",
    },
    "qwen3_vl": {
        "architectures": "informational",
        "transformers_version": "informational",
        "dtype": "parameters take the dtype chosen at load time",
        "torch_dtype": "parameters take the dtype chosen at load time",
        "tie_word_embeddings": "checked to be false; lm_head is a separate matrix",
        "video_token_id": "video input is not supported",
    },
    "qwen3_vl_text": {
        "initializer_range": "training-time initialisation only",
        "use_cache": "caching is explicit in this implementation",
        "attention_dropout": "inference has no dropout",
        "dtype": "parameters take the dtype chosen at load time",
        "torch_dtype": "parameters take the dtype chosen at load time",
        "tie_word_embeddings": "checked to be false at the top level",
        "pad_token_id": "generation settings come from the Alpamayo config",
    },
    "expert_cfg": {
        "dtype": "parameters take the dtype chosen at load time",
        "torch_dtype": "parameters take the dtype chosen at load time",
    },
    "qwen3_vl_vision": {
        "initializer_range": "training-time initialisation only",
        "model_type": "informational",
        "dtype": "parameters take the dtype chosen at load time",
        "torch_dtype": "parameters take the dtype chosen at load time",
    },
}


class _Fields:
    """Consumes a config dict field by field and complains about what is left over."""

    def __init__(self, data: Mapping[str, Any], where: str, ignored: Mapping[str, str] = {}):
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        self._data = dict(data)
        self._where = where
        for name in ignored:
            self._data.pop(name, None)

    def required(self, name: str, kind: type | tuple[type, ...] = (int, float, str, list, dict, bool)):
        if name not in self._data:
            raise ConfigError(f"{self._where}: missing required field {name!r}")
        return self._check(name, self._data.pop(name), kind)

    def optional(self, name: str, default: Any, kind: type | tuple[type, ...] = object):
        if name not in self._data:
            return default
        return self._check(name, self._data.pop(name), kind)

    def target(self, expected_class: str) -> None:
        """Checks the Hydra `_target_` names the class this implementation reproduces."""
        target = self.optional("_target_", None, str)
        self.optional("_recursive_", None, bool)
        if target is not None and target.rsplit(".", 1)[-1] != expected_class:
            raise ConfigError(
                f"{self._where}: _target_ {target!r} is not supported (expected a {expected_class})"
            )

    def finish(self) -> None:
        if self._data:
            names = ", ".join(repr(k) for k in sorted(self._data))
            raise ConfigError(f"{self._where}: unknown field(s) {names}")

    def _check(self, name, value, kind):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool):
            raise ConfigError(f"{self._where}: field {name!r} must be an integer, got {value!r}")
        if not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ConfigError(f"{self._where}: field {name!r} must be {expected}, got {value!r}")
        return value


def _int_tuple(value: Any, where: str, name: str, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(f"{where}: field {name!r} must be a list of integers, got {value!r}")
    if length is not None and len(value) != length:
        raise ConfigError(f"{where}: field {name!r} must have {length} entries, got {value!r}")
    return tuple(value)


def _float_tuple(value: Any, where: str, name: str, length: int) -> tuple[float, ...]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != length
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(f"{where}: field {name!r} must be {length} numbers, got {value!r}")
    return tuple(float(v) for v in value)


# ---------------------------------------------------------------------------------------------
# Transformer decoders (the Qwen3-VL language model and the action expert share one layer type)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes of a Qwen3 decoder stack (QK-norm, GQA, SwiGLU, interleaved MRoPE)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)

    def __post_init__(self):
        name = type(self).__name__
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{name}: {field} must be positive, got {getattr(self, field)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{name}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{name}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ConfigError(
                f"{name}: mrope_section {self.mrope_section} must have 3 entries summing to "
                f"head_dim // 2 = {self.head_dim // 2}"
            )
        # Interleaved layout: H and W frequencies take slots 1, 4, 7, ... and 2, 5, 8, ...
        t, h, w = self.mrope_section
        if not (h <= t and w <= t):
            raise ConfigError(f"{name}: interleaved MRoPE needs mrope_section T >= H, W; got {self.mrope_section}")

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclasses.dataclass(frozen=True)
class TextConfig(DecoderConfig):
    """The Qwen3-VL language model: a decoder with token embedding and an untied `lm_head`."""

    vocab_size: int = 0
    max_position_embeddings: int = 262_144
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.vocab_size <= 0:
            raise ConfigError(f"TextConfig: vocab_size must be positive, got {self.vocab_size}")

    @classmethod
    def from_hf_config(cls, text: Mapping[str, Any], *, vocab_size: int | None = None) -> TextConfig:
        """Parses a Qwen3-VL `text_config` dict. `vocab_size` overrides the stored one (the
        Alpamayo checkpoint resizes the embedding to the extended tokenizer)."""
        return cls(**_decoder_fields(text, "text_config", vocab_size=vocab_size))


@dataclasses.dataclass(frozen=True)
class ExpertConfig(DecoderConfig):
    """The action expert: the language model's decoder with `expert_cfg` overrides, no embedding
    and no `lm_head`. Layers, KV heads and head_dim must equal the language model's, since expert
    layer l attends to the language model's KV cache of layer l."""

    @classmethod
    def from_text_config(cls, text: TextConfig, overrides: Mapping[str, Any]) -> ExpertConfig:
        """Derives the expert config as the reference does: a copy of the text config with the
        `expert_cfg` fields set on it; then checks cache compatibility."""
        f = _Fields(overrides, "expert_cfg", IGNORED_FIELDS["expert_cfg"])
        values = {field.name: getattr(text, field.name) for field in dataclasses.fields(DecoderConfig)}
        for name, inherited in values.items():
            if name == "mrope_section":
                section = f.optional(name, None, list)
                if section is not None:
                    values[name] = _int_tuple(section, "expert_cfg", name, 3)
            else:
                values[name] = f.optional(name, inherited, type(inherited))
        f.finish()
        expert = cls(**values)
        mismatched = [
            f"{name} (expert {getattr(expert, name)} != language model {getattr(text, name)})"
            for name in ("num_hidden_layers", "num_key_value_heads", "head_dim")
            if getattr(expert, name) != getattr(text, name)
        ]
        if mismatched:
            raise ConfigError(
                "expert_cfg: the expert reads the language model's KV cache layer by layer, so it "
                "must keep the same " + ", ".join(mismatched)
            )
        return expert


def _decoder_fields(text: Mapping[str, Any], where: str, vocab_size: int | None) -> dict[str, Any]:
    f = _Fields(text, where, IGNORED_FIELDS["qwen3_vl_text"])
    model_type = f.optional("model_type", "qwen3_vl_text", str)
    if model_type != "qwen3_vl_text":
        raise ConfigError(f"{where}: model_type must be 'qwen3_vl_text', got {model_type!r}")
    values: dict[str, Any] = {
        "hidden_size": f.required("hidden_size", int),
        "intermediate_size": f.required("intermediate_size", int),
        "num_hidden_layers": f.required("num_hidden_layers", int),
        "num_attention_heads": f.required("num_attention_heads", int),
        "num_key_value_heads": f.required("num_key_value_heads", int),
        "head_dim": f.required("head_dim", int),
        "rms_norm_eps": f.required("rms_norm_eps", float),
        "rope_theta": f.required("rope_theta", float),
        "max_position_embeddings": f.optional("max_position_embeddings", 262_144, int),
        "bos_token_id": f.optional("bos_token_id", None, (int, type(None))),
        "eos_token_id": f.optional("eos_token_id", None, (int, type(None))),
    }
    stored_vocab = f.required("vocab_size", int)
    values["vocab_size"] = stored_vocab if vocab_size is None else vocab_size
    if f.optional("hidden_act", "silu", str) != "silu":
        raise ConfigError(f"{where}: only hidden_act 'silu' is supported")
    if f.optional("attention_bias", False, bool):
        raise ConfigError(f"{where}: attention_bias=true is not supported (Qwen3-VL has none)")
    rope = _Fields(f.required("rope_scaling", dict), f"{where}.rope_scaling")
    rope_type = rope.optional("rope_type", "default", str)
    rope.optional("type", rope_type, str)
    if rope_type != "default":
        raise ConfigError(f"{where}.rope_scaling: rope_type {rope_type!r} is not supported")
    values["mrope_section"] = _int_tuple(
        rope.required("mrope_section", list), f"{where}.rope_scaling", "mrope_section", 3
    )
    if not rope.optional("mrope_interleaved", True, bool):
        raise ConfigError(
            f"{where}.rope_scaling: mrope_interleaved=false is not supported; Qwen3-VL interleaves"
        )
    rope.finish()
    f.finish()
    return values


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen3-VL vision transformer, patch merger and DeepStack mergers."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"VisionConfig: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
            )
        side = round(self.num_position_embeddings**0.5)
        if side * side != self.num_position_embeddings:
            raise ConfigError(
                f"VisionConfig: num_position_embeddings {self.num_position_embeddings} is not a square"
            )
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"VisionConfig: deepstack_visual_indexes {bad} outside 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values`: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merged_dim(self) -> int:
        """Width of a 2x2 block of patches, the input of the patch mergers."""
        return self.hidden_size * self.spatial_merge_size**2

    @property
    def num_grid_per_side(self) -> int:
        return round(self.num_position_embeddings**0.5)

    @classmethod
    def from_hf_config(cls, vision: Mapping[str, Any]) -> VisionConfig:
        where = "vision_config"
        f = _Fields(vision, where, IGNORED_FIELDS["qwen3_vl_vision"])
        if f.optional("hidden_act", "gelu_pytorch_tanh", str) != "gelu_pytorch_tanh":
            raise ConfigError(f"{where}: only hidden_act 'gelu_pytorch_tanh' is supported")
        config = cls(
            depth=f.required("depth", int),
            hidden_size=f.required("hidden_size", int),
            intermediate_size=f.required("intermediate_size", int),
            num_heads=f.required("num_heads", int),
            out_hidden_size=f.required("out_hidden_size", int),
            num_position_embeddings=f.required("num_position_embeddings", int),
            deepstack_visual_indexes=_int_tuple(
                f.required("deepstack_visual_indexes", list), where, "deepstack_visual_indexes"
            ),
            in_channels=f.optional("in_channels", 3, int),
            patch_size=f.required("patch_size", int),
            temporal_patch_size=f.required("temporal_patch_size", int),
            spatial_merge_size=f.required("spatial_merge_size", int),
        )
        f.finish()
        return config


# ---------------------------------------------------------------------------------------------
# Action side
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActionInProjConfig:
    """`PerWaypointActionInProjV2`: Fourier features of (accel, curvature, t) per waypoint, then an
    MLP with RMSNorms and a final LayerNorm, producing the expert's input embeddings."""

    hidden_size: int = 512
    num_enc_layers: int = 2
    num_fourier_feats: int = 20
    max_freq: float = 100.0

    def __post_init__(self):
        if self.num_fourier_feats % 2:
            raise ConfigError(f"action_in_proj_cfg: num_fourier_feats must be even, got {self.num_fourier_feats}")
        if self.num_enc_layers < 1:
            raise ConfigError(f"action_in_proj_cfg: num_enc_layers must be >= 1, got {self.num_enc_layers}")

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ActionInProjConfig:
        f = _Fields(cfg, "action_in_proj_cfg")
        f.target("PerWaypointActionInProjV2")
        config = cls(
            hidden_size=f.required("hidden_size", int),
            num_enc_layers=f.required("num_enc_layers", int),
            num_fourier_feats=f.required("num_fourier_feats", int),
            max_freq=f.optional("max_freq", 100.0, float),
        )
        f.finish()
        return config


@dataclasses.dataclass(frozen=True)
class ActionSpaceConfig:
    """`UnicycleAccelCurvatureActionSpace`: normalised (acceleration, curvature) per 0.1 s step,
    rolled out by a unicycle model; the regularisation weights of the inverse solvers."""

    accel_mean: float
    accel_std: float
    curvature_mean: float
    curvature_std: float
    accel_bounds: tuple[float, float] = (-9.8, 9.8)
    curvature_bounds: tuple[float, float] = (-0.33, 0.33)
    dt: float = 0.1
    n_waypoints: int = 64
    theta_lambda: float = 1e-6
    theta_ridge: float = 1e-8
    v_lambda: float = 1e-6
    v_ridge: float = 1e-4
    a_lambda: float = 1e-4
    a_ridge: float = 1e-4
    kappa_lambda: float = 1e-4
    kappa_ridge: float = 1e-4

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], where: str = "action_space_cfg") -> ActionSpaceConfig:
        f = _Fields(cfg, where)
        f.target("UnicycleAccelCurvatureActionSpace")
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name.endswith("_bounds"):
                if field.name in f._data:
                    values[field.name] = _float_tuple(f.required(field.name, list), where, field.name, 2)
            elif field.default is dataclasses.MISSING:
                values[field.name] = f.required(field.name, float)
            else:
                values[field.name] = f.optional(field.name, field.default, type(field.default))
        f.finish()
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class FlowMatchingConfig:
    """Euler flow matching from noise (t = 0) to actions (t = 1)."""

    num_inference_steps: int = 10

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> FlowMatchingConfig:
        f = _Fields(cfg, "diffusion_cfg")
        f.target("FlowMatching")
        if f.optional("int_method", "euler", str) != "euler":
            raise ConfigError("diffusion_cfg: only int_method 'euler' is supported")
        f.optional("x_dims", None)  # filled at run time by the reference: (n_waypoints, 2)
        config = cls(num_inference_steps=f.optional("num_inference_steps", 10, int))
        f.finish()
        return config


@dataclasses.dataclass(frozen=True)
class HistoryTokenizerConfig:
    """`DeltaTrajectoryTokenizer`: quantised xyz deltas of the ego history."""

    num_bins: int = 1000
    xyz_min: tuple[float, float, float] = (-4.0, -4.0, -10.0)
    xyz_max: tuple[float, float, float] = (4.0, 4.0, 10.0)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> HistoryTokenizerConfig:
        f = _Fields(cfg, "hist_traj_tokenizer_cfg")
        f.target("DeltaTrajectoryTokenizer")
        config = cls(num_bins=f.optional("num_bins", 1000, int))
        f.finish()
        return config


@dataclasses.dataclass(frozen=True)
class FutureTokenizerConfig:
    """`DiscreteTrajectoryTokenizer`: quantised normalised actions (training and AR decoding only)."""

    action_space: ActionSpaceConfig
    num_bins: int = 3000
    dims_min: tuple[float, float] = (-10.0, -10.0)
    dims_max: tuple[float, float] = (10.0, 10.0)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> FutureTokenizerConfig:
        where = "traj_tokenizer_cfg"
        f = _Fields(cfg, where)
        f.target("DiscreteTrajectoryTokenizer")
        config = cls(
            action_space=ActionSpaceConfig.from_hf_config(
                f.required("action_space_cfg", dict), f"{where}.action_space_cfg"
            ),
            num_bins=f.optional("num_bins", 3000, int),
            dims_min=_float_tuple(f.optional("dims_min", [-10.0, -10.0], list), where, "dims_min", 2),
            dims_max=_float_tuple(f.optional("dims_max", [10.0, 10.0], list), where, "dims_max", 2),
        )
        f.finish()
        return config


@dataclasses.dataclass(frozen=True)
class TrajectoryTokenIds:
    """Special token ids that frame the trajectory parts of the prompt."""

    history_start: int
    history_end: int
    future_start: int
    future_end: int
    history: int
    future: int

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> TrajectoryTokenIds:
        f = _Fields(cfg, "traj_token_ids")
        config = cls(**{field.name: f.required(field.name, int) for field in dataclasses.fields(cls)})
        f.finish()
        return config


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AlpamayoConfig:
    """Alpamayo-R1: Qwen3-VL backbone + flow-matching action expert + unicycle action space."""

    vision: VisionConfig
    text: TextConfig
    expert: ExpertConfig
    action_in_proj: ActionInProjConfig
    action_space: ActionSpaceConfig
    flow_matching: FlowMatchingConfig
    history_tokenizer: HistoryTokenizerConfig
    future_tokenizer: FutureTokenizerConfig
    traj_token_ids: TrajectoryTokenIds
    traj_token_start_idx: int
    traj_vocab_size: int
    tokens_per_history_traj: int = 48
    tokens_per_future_traj: int = 128
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    min_pixels: int = 163_840
    max_pixels: int = 196_608

    def __post_init__(self):
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision_config.out_hidden_size ({self.vision.out_hidden_size}) must equal the "
                f"language model hidden_size ({self.text.hidden_size})"
            )
        if len(self.vision.deepstack_visual_indexes) > self.text.num_hidden_layers:
            raise ConfigError("more DeepStack feature sets than language-model layers")
        if self.future_tokenizer.num_bins + self.history_tokenizer.num_bins != self.traj_vocab_size:
            raise ConfigError(
                f"traj_vocab_size ({self.traj_vocab_size}) must equal future bins "
                f"({self.future_tokenizer.num_bins}) + history bins ({self.history_tokenizer.num_bins})"
            )
        if self.traj_token_start_idx + self.traj_vocab_size > self.text.vocab_size:
            raise ConfigError("trajectory tokens extend past vocab_size")

    @property
    def history_token_start_idx(self) -> int:
        """Id of history bin 0: history tokens follow the future bins."""
        return self.traj_token_start_idx + self.future_tokenizer.num_bins

    @property
    def n_waypoints(self) -> int:
        return self.action_space.n_waypoints

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], backbone: Mapping[str, Any]) -> AlpamayoConfig:
        """Builds the config from the Alpamayo `config.json` dict and the backbone's Qwen3-VL
        `config.json` dict. Raises `ConfigError` on any unknown, missing or inconsistent field."""
        f = _Fields(config, "config.json", IGNORED_FIELDS["alpamayo_r1"])
        if not config.get("expert_non_causal_attention", True):
            raise ConfigError("config.json: expert_non_causal_attention=false is not supported")
        model_type = f.required("model_type", str)
        if model_type != "alpamayo_r1":
            raise ConfigError(f"config.json: model_type must be 'alpamayo_r1', got {model_type!r}")

        b = _Fields(backbone, "backbone config.json", IGNORED_FIELDS["qwen3_vl"])
        if b.required("model_type", str) != "qwen3_vl":
            raise ConfigError("backbone config.json: model_type must be 'qwen3_vl'")
        if backbone.get("tie_word_embeddings", False):
            raise ConfigError("backbone config.json: tie_word_embeddings=true is not supported")

        text = TextConfig.from_hf_config(b.required("text_config", dict), vocab_size=f.required("vocab_size", int))
        vision = VisionConfig.from_hf_config(b.required("vision_config", dict))
        token_ids = {
            name: b.optional(name, default, int)
            for name, default in (
                ("image_token_id", 151655),
                ("vision_start_token_id", 151652),
                ("vision_end_token_id", 151653),
            )
        }
        b.finish()

        out_proj = _Fields(f.required("action_out_proj_cfg", dict), "action_out_proj_cfg")
        out_proj.target("Linear")
        out_proj.finish()

        result = cls(
            vision=vision,
            text=text,
            expert=ExpertConfig.from_text_config(text, f.required("expert_cfg", dict)),
            action_in_proj=ActionInProjConfig.from_hf_config(f.required("action_in_proj_cfg", dict)),
            action_space=ActionSpaceConfig.from_hf_config(f.required("action_space_cfg", dict)),
            flow_matching=FlowMatchingConfig.from_hf_config(f.required("diffusion_cfg", dict)),
            history_tokenizer=HistoryTokenizerConfig.from_hf_config(
                f.optional("hist_traj_tokenizer_cfg", {}, dict)
            ),
            future_tokenizer=FutureTokenizerConfig.from_hf_config(f.required("traj_tokenizer_cfg", dict)),
            traj_token_ids=TrajectoryTokenIds.from_hf_config(f.required("traj_token_ids", dict)),
            traj_token_start_idx=f.required("traj_token_start_idx", int),
            traj_vocab_size=f.required("traj_vocab_size", int),
            tokens_per_history_traj=f.optional("tokens_per_history_traj", 48, int),
            tokens_per_future_traj=f.optional("tokens_per_future_traj", 128, int),
            min_pixels=f.optional("min_pixels", 163_840, int),
            max_pixels=f.optional("max_pixels", 196_608, int),
            **token_ids,
        )
        f.finish()
        return result


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def load_preset_json(name: str) -> dict[str, Any]:
    """Reads a JSON preset shipped in `configs/` (installed as `alpamayo_jax.configs`)."""
    path = resources.files("alpamayo_jax.configs") / f"{name}.json"
    if not path.is_file():
        available = sorted(p.name[:-5] for p in resources.files("alpamayo_jax.configs").iterdir()
                           if p.name.endswith(".json"))
        raise ValueError(f"unknown preset {name!r}; available: {available}")
    return json.loads(path.read_text())


def alpamayo_r1_10b() -> AlpamayoConfig:
    """The released Alpamayo-R1-10B (Qwen3-VL-8B backbone, 2.3B expert)."""
    return AlpamayoConfig.from_hf_config(
        load_preset_json("alpamayo_r1_10b"), load_preset_json("qwen3_vl_8b_backbone")
    )


def tiny() -> AlpamayoConfig:
    """The tiny random-weight configuration of the reference fixture (`tests/fixtures/tiny_ar1_dev`)."""
    return AlpamayoConfig.from_hf_config(load_preset_json("tiny"), load_preset_json("tiny_backbone"))
