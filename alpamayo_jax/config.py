"""Model configuration: frozen dataclasses built strictly from Hugging Face `config.json` files.

An Alpamayo-R1 checkpoint carries two configs:

* the Alpamayo `config.json` (model_type ``alpamayo_r1``): expert overrides, action projections,
  action space, flow matching, trajectory tokenizers and token ids, several of them Hydra sections
  whose `_target_` names the reference class they configure;
* the backbone's Qwen3-VL `config.json` (model_type ``qwen3_vl``), which the reference reads from
  the directory named by ``vlm_name_or_path``: the vision tower and the language model.

`AlpamayoConfig.from_hf_config(config, backbone)` turns both into one frozen tree. Every
constructor argument of the classes those configs describe is, here, either

* parsed, with the reference constructor's own default when absent (`save_pretrained` leaves out
  values equal to the default), and honoured by the computation;
* rejected for the values this implementation does not reproduce, with a `ConfigError` that
  names the field and says why; or
* listed in `IGNORED_FIELDS`, and nowhere else, with the reason it cannot change the result.

Any other field raises `ConfigError` naming it as unknown.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any


class ConfigError(ValueError):
    """A config dict that cannot be turned into a model config (unknown, missing or bad field)."""


_LOAD_DTYPE = "parameters take the dtype chosen at load time"

# Fields that a config may carry but that cannot change this implementation's result, by section:
# the model_type of a Hugging Face config, or the `config.json` key of a Hydra section. The
# expert's `expert_cfg` is parsed as text_config fields, so the "qwen3_vl_text" entries apply to it
# as well. Keep this the single place that says what is ignored and why.
IGNORED_FIELDS: dict[str, dict[str, str]] = {
    # AlpamayoR1Config, ReasoningVLAConfig, and PretrainedConfig keys that real files carry
    "alpamayo_r1": {
        "architectures": "informational",
        "transformers_version": "informational",
        "dtype": _LOAD_DTYPE,
        "torch_dtype": _LOAD_DTYPE,
        "model_dtype": _LOAD_DTYPE,
        "attn_implementation": (
            "selects the PyTorch attention kernel: for the same mask, kernels differ only by rounding, "
            "and attention here is exact (for its effect on the expert's training-time mask in the "
            "reference, see expert_non_causal_attention)"
        ),
        "vlm_name_or_path": "where the reference finds the backbone config, which is passed in separately",
        "image_height": "stored by the reference, never read",
        "image_width": "stored by the reference, never read",
        "hist_traj_embed_cfg": "stored by the reference, never read",
    },
    "qwen3_vl": {
        "architectures": "informational",
        "transformers_version": "informational",
        "dtype": _LOAD_DTYPE,
        "torch_dtype": _LOAD_DTYPE,
        "video_token_id": "video input is not supported, so no prompt contains the token",
    },
    "qwen3_vl_text": {
        "vocab_size": (
            "replaced by config.json's vocab_size, the size of the extended tokenizer that the "
            "checkpoint's embedding was resized to (read only when a text config is parsed alone)"
        ),
        "initializer_range": "initialisation only; every weight comes from the checkpoint",
        "use_cache": "the reference passes use_cache explicitly; caching here is explicit",
        "max_position_embeddings": (
            "transformers reads it only for dynamic RoPE types, which are rejected; positions are "
            "not limited by it"
        ),
        "bos_token_id": "generation continues a given prompt, so no BOS token is ever inserted",
        "pad_token_id": "the reference sets generation's pad token from the tokenizer",
        "dtype": _LOAD_DTYPE,
        "torch_dtype": _LOAD_DTYPE,
    },
    # text_config fields that the expert, a decoder stack without embedding or lm_head, never reads
    "expert_cfg": {
        "vocab_size": "the expert has no token embedding and no lm_head",
        "tie_word_embeddings": "the expert has no token embedding and no lm_head",
        "eos_token_id": "the expert generates no tokens",
    },
    "qwen3_vl_vision": {
        "initializer_range": "initialisation only; every weight comes from the checkpoint",
        "model_type": "informational",
        "dtype": _LOAD_DTYPE,
        "torch_dtype": _LOAD_DTYPE,
    },
    "hist_traj_tokenizer_cfg": {
        "ego_yaw_min": "read only with predict_yaw=true, which is rejected",
        "ego_yaw_max": "read only with predict_yaw=true, which is rejected",
        "load_weights": "accepted and unused by the reference: this tokenizer has no weights",
    },
    "traj_tokenizer_cfg": {
        "load_weights": "swallowed by the reference constructor's **kwargs: this tokenizer has no weights",
    },
    "action_in_proj_cfg": {
        "in_dims": "the reference replaces it with the action space's (n_waypoints, 2) at construction",
        "out_dim": "the reference replaces it with the expert's hidden_size at construction",
    },
    "action_out_proj_cfg": {
        "in_features": "the reference replaces it with the expert's hidden_size at construction",
        "out_features": "the reference replaces it with the action dimension (2) at construction",
        "device": "placement only",
        "dtype": _LOAD_DTYPE,
    },
    "diffusion_cfg": {
        "x_dims": "the reference replaces it with the action space's (n_waypoints, 2) at construction",
        "train_ignore_guidance_rate": "stored by the reference, never read: Alpamayo-R1 has no guidance",
        "inference_guidance_weight": "stored by the reference, never read: Alpamayo-R1 has no guidance",
    },
}

# Training-time flow-time distributions of the reference's `FlowMatching` (`train_timestep_sampler`).
TIMESTEP_SAMPLERS = ("beta", "uniform")


class _Fields:
    """Consumes a config dict field by field and complains about what is left over."""

    def __init__(self, data: Mapping[str, Any], where: str, ignored: Mapping[str, str] = {}):
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        self._data = dict(data)
        self.where = where
        for name in ignored:
            self._data.pop(name, None)

    def required(self, name: str, kind: type | tuple[type, ...] = (int, float, str, list, dict, bool)):
        if name not in self._data:
            raise ConfigError(f"{self.where}: missing required field {name!r}")
        return self._check(name, self._data.pop(name), kind)

    def optional(self, name: str, default: Any, kind: type | tuple[type, ...] = object):
        if name not in self._data:
            return default
        return self._check(name, self._data.pop(name), kind)

    def section(self, name: str, why: str) -> Mapping[str, Any]:
        """A nested mapping that must be present and not null; `why` says what needs it."""
        if name not in self._data:
            raise ConfigError(f"{self.where}: missing required field {name!r} ({why})")
        value = self._data.pop(name)
        if value is None:
            raise ConfigError(f"{self.where}: field {name!r} is null ({why})")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.where}: field {name!r} must be a mapping, got {value!r}")
        return value

    def target(self, expected_class: str) -> None:
        """Checks the Hydra `_target_` names the class this implementation reproduces."""
        target = self.optional("_target_", None, str)
        self.optional("_recursive_", None, bool)
        if target is not None and target.rsplit(".", 1)[-1] != expected_class:
            raise ConfigError(
                f"{self.where}: _target_ {target!r} is not supported (expected a {expected_class})"
            )

    def finish(self) -> None:
        if self._data:
            names = ", ".join(repr(k) for k in sorted(self._data))
            raise ConfigError(f"{self.where}: unknown field(s) {names}")

    def _check(self, name, value, kind):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool):
            raise ConfigError(f"{self.where}: field {name!r} must be an integer, got {value!r}")
        if not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ConfigError(f"{self.where}: field {name!r} must be {expected}, got {value!r}")
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


def _defaults(cls: type, f: _Fields, names: tuple[str, ...]) -> dict[str, Any]:
    """Scalar fields `names` of dataclass `cls`, each defaulting to (and typed like) its dataclass
    default, which is the reference constructor's default."""
    defaults = {field.name: field.default for field in dataclasses.fields(cls)}
    return {name: f.optional(name, defaults[name], type(defaults[name])) for name in names}


def _check_range(where: str, name: str, lo: tuple[float, ...], hi: tuple[float, ...]) -> None:
    if not all(a < b for a, b in zip(lo, hi)):
        raise ConfigError(f"{where}: {name} min {lo} must be below max {hi} on every axis")


# ---------------------------------------------------------------------------------------------
# Transformer decoders (the Qwen3-VL language model and the action expert share one layer type)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes of a Qwen3 decoder stack (QK-norm, GQA, SwiGLU, interleaved MRoPE).

    mrope_section: rotary frequencies per position axis (T, H, W), from `rope_scaling`.
    """

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
    """The Qwen3-VL language model: a decoder with token embedding and an untied `lm_head`.

    vocab_size: rows of the embedding and of `lm_head`.
    eos_token_id: where generation stops; None when absent.
    """

    vocab_size: int = 0
    eos_token_id: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.vocab_size <= 0:
            raise ConfigError(f"TextConfig: vocab_size must be positive, got {self.vocab_size}")

    @classmethod
    def from_hf_config(cls, text: Mapping[str, Any], *, vocab_size: int | None = None) -> TextConfig:
        """Parses a Qwen3-VL `text_config` dict. `vocab_size` replaces the stored one, which is
        then ignored (the Alpamayo checkpoint resizes the embedding to the extended tokenizer);
        without it the stored one is required."""
        ignored = dict(IGNORED_FIELDS["qwen3_vl_text"])
        if vocab_size is None:
            del ignored["vocab_size"]
        f = _Fields(text, "text_config", ignored)
        if vocab_size is None:
            vocab_size = f.required("vocab_size", int)
        values = _text_fields(f)
        f.finish()
        return cls(vocab_size=vocab_size, **values)


@dataclasses.dataclass(frozen=True)
class ExpertConfig(DecoderConfig):
    """The action expert: the language model's decoder with `expert_cfg` overrides, no embedding
    and no `lm_head`. Layers, KV heads and head_dim must equal the language model's, since expert
    layer l attends to the language model's KV cache of layer l."""

    @classmethod
    def from_text_config(
        cls, text_config: Mapping[str, Any], expert_cfg: Mapping[str, Any] | None
    ) -> ExpertConfig:
        """Derives the expert config as the reference does: a copy of the backbone's `text_config`
        dict with each `expert_cfg` key set on it (a key replaces the whole value, so an
        `expert_cfg.rope_scaling` replaces the text config's), parsed by the same text-config
        parser; `expert_cfg` null or absent means no overrides. Then checks cache compatibility."""
        if expert_cfg is not None and not isinstance(expert_cfg, Mapping):
            raise ConfigError(f"expert_cfg: expected a mapping, got {type(expert_cfg).__name__}")
        overrides = {k: v for k, v in (expert_cfg or {}).items() if k not in IGNORED_FIELDS["expert_cfg"]}
        text = _decoder_values(text_config, "text_config")
        expert = cls(**_decoder_values({**text_config, **overrides}, "expert_cfg"))
        mismatched = [
            f"{name} (expert {getattr(expert, name)} != language model {text[name]})"
            for name in ("num_hidden_layers", "num_key_value_heads", "head_dim")
            if getattr(expert, name) != text[name]
        ]
        if mismatched:
            raise ConfigError(
                "expert_cfg: the expert reads the language model's KV cache layer by layer, so it "
                "must keep the same " + ", ".join(mismatched)
            )
        return expert


def _decoder_values(text: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The `DecoderConfig` fields of a text-config dict (its vocab_size is ignored)."""
    f = _Fields(text, where, IGNORED_FIELDS["qwen3_vl_text"])
    values = _text_fields(f)
    f.finish()
    return {field.name: values[field.name] for field in dataclasses.fields(DecoderConfig)}


def _text_fields(f: _Fields) -> dict[str, Any]:
    """Every `Qwen3VLTextConfig` constructor field but vocab_size and the ignored ones: the
    `DecoderConfig` fields plus the EOS token id."""
    where = f.where
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
        "eos_token_id": f.optional("eos_token_id", None, (int, type(None))),
    }
    if f.optional("hidden_act", "silu", str) != "silu":
        raise ConfigError(f"{where}: only hidden_act 'silu' is supported")
    if f.optional("attention_bias", False, bool):
        raise ConfigError(f"{where}: attention_bias=true is not supported (Qwen3-VL has none)")
    if f.optional("attention_dropout", 0.0, float) != 0.0:
        raise ConfigError(
            f"{where}: a non-zero attention_dropout is not supported: no dropout is implemented, "
            "so training would differ from the reference's"
        )
    if f.optional("tie_word_embeddings", False, bool):
        raise ConfigError(
            f"{where}: tie_word_embeddings=true is not supported: transformers would tie lm_head to "
            "the token embedding, while lm_head here is a separate matrix"
        )
    rope = _Fields(
        f.section("rope_scaling", "transformers' Qwen3-VL rotary embedding reads it"), f"{where}.rope_scaling"
    )
    rope_type = rope.optional("rope_type", "default", str)
    rope.optional("type", rope_type, str)
    if rope_type != "default":
        raise ConfigError(f"{where}.rope_scaling: rope_type {rope_type!r} is not supported")
    values["mrope_section"] = _int_tuple(
        rope.optional("mrope_section", [24, 20, 20], list), f"{where}.rope_scaling", "mrope_section", 3
    )
    if not rope.optional("mrope_interleaved", True, bool):
        raise ConfigError(
            f"{where}.rope_scaling: mrope_interleaved=false is not supported; Qwen3-VL interleaves"
        )
    rope.finish()
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
    MLP with RMSNorms and a final LayerNorm, producing the expert's input embeddings.

    Defaults are the reference constructor's: hidden_size 1024, num_enc_layers 4,
    num_fourier_feats 20 (per input, even: half sines, half cosines), max_freq 100.
    """

    hidden_size: int = 1024
    num_enc_layers: int = 4
    num_fourier_feats: int = 20
    max_freq: float = 100.0

    def __post_init__(self):
        if self.hidden_size < 1:
            raise ConfigError(f"action_in_proj_cfg: hidden_size must be >= 1, got {self.hidden_size}")
        if self.num_fourier_feats < 2 or self.num_fourier_feats % 2:
            raise ConfigError(
                f"action_in_proj_cfg: num_fourier_feats must be even and >= 2, got {self.num_fourier_feats}"
            )
        if self.num_enc_layers < 1:
            raise ConfigError(f"action_in_proj_cfg: num_enc_layers must be >= 1, got {self.num_enc_layers}")
        if not self.max_freq > 0:
            raise ConfigError(f"action_in_proj_cfg: max_freq must be positive, got {self.max_freq}")

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ActionInProjConfig:
        f = _Fields(cfg, "action_in_proj_cfg", IGNORED_FIELDS["action_in_proj_cfg"])
        f.target("PerWaypointActionInProjV2")
        config = cls(**_defaults(cls, f, ("hidden_size", "num_enc_layers", "num_fourier_feats", "max_freq")))
        f.finish()
        return config


def _check_action_out_proj(cfg: Mapping[str, Any]) -> None:
    """`action_out_proj_cfg`, a `torch.nn.Linear` from the expert width to the 2 action channels:
    nothing in it is configurable here."""
    f = _Fields(cfg, "action_out_proj_cfg", IGNORED_FIELDS["action_out_proj_cfg"])
    f.target("Linear")
    if not f.optional("bias", True, bool):
        raise ConfigError(
            "action_out_proj_cfg: bias=false is not supported: the output projection here has a bias "
            "and checkpoints carry it"
        )
    f.finish()


@dataclasses.dataclass(frozen=True)
class ActionSpaceConfig:
    """`UnicycleAccelCurvatureActionSpace`: normalised (acceleration, curvature) per `dt` step,
    rolled out by a unicycle model; the regularisation weights of the inverse solvers.

    Every field defaults to the reference constructor's default. accel/curvature mean and std
    normalise the actions (the model's copies are checkpoint buffers); the bounds are the
    (min, max) that `unicycle.is_within_bounds` accepts, in physical units.
    """

    accel_mean: float = 0.0
    accel_std: float = 1.0
    curvature_mean: float = 0.0
    curvature_std: float = 1.0
    accel_bounds: tuple[float, float] = (-9.8, 9.8)
    curvature_bounds: tuple[float, float] = (-0.2, 0.2)
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

    def __post_init__(self):
        for name in ("accel_std", "curvature_std", "dt"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ActionSpaceConfig: {name} must be positive, got {getattr(self, name)}")
        if self.n_waypoints < 1:
            raise ConfigError(f"ActionSpaceConfig: n_waypoints must be >= 1, got {self.n_waypoints}")
        for name in ("accel_bounds", "curvature_bounds"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(f"ActionSpaceConfig: {name} {(lo, hi)} must be (min, max)")

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], where: str = "action_space_cfg") -> ActionSpaceConfig:
        f = _Fields(cfg, where)
        f.target("UnicycleAccelCurvatureActionSpace")
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name.endswith("_bounds"):
                values[field.name] = _float_tuple(
                    f.optional(field.name, list(field.default), (list, tuple)), where, field.name, 2
                )
            else:
                values[field.name] = f.optional(field.name, field.default, type(field.default))
        f.finish()
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class FlowMatchingConfig:
    """`FlowMatching` from noise (t = 0) to actions (t = 1), integrated by Euler steps.

    num_inference_steps: Euler steps at inference (reference default 10).
    train_timestep_sampler: the training flow-time distribution, "beta" (reference default:
        t = 0.999 - 0.999 s, s ~ Beta(1.5, 1)) or "uniform" (t ~ U[0, 1)).
    """

    num_inference_steps: int = 10
    train_timestep_sampler: str = "beta"

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ConfigError(
                f"diffusion_cfg: num_inference_steps must be >= 1, got {self.num_inference_steps}"
            )
        if self.train_timestep_sampler not in TIMESTEP_SAMPLERS:
            raise ConfigError(
                f"diffusion_cfg: train_timestep_sampler {self.train_timestep_sampler!r} is not supported "
                f"(the reference knows {', '.join(map(repr, TIMESTEP_SAMPLERS))})"
            )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> FlowMatchingConfig:
        f = _Fields(cfg, "diffusion_cfg", IGNORED_FIELDS["diffusion_cfg"])
        f.target("FlowMatching")
        int_method = f.optional("int_method", "euler", str)
        if int_method != "euler":
            raise ConfigError(f"diffusion_cfg: int_method {int_method!r} is not supported; only 'euler' is")
        config = cls(**_defaults(cls, f, ("num_inference_steps", "train_timestep_sampler")))
        f.finish()
        return config


@dataclasses.dataclass(frozen=True)
class HistoryTokenizerConfig:
    """`DeltaTrajectoryTokenizer`: the per-step xyz deltas of the ego history, each axis quantised
    to `num_bins` bins over [xyz_min, xyz_max] (config.json: ego_xyz_min, ego_xyz_max). Defaults
    are the reference constructor's: 1000 bins over (-4, -4, -10) .. (4, 4, 10)."""

    num_bins: int = 1000
    xyz_min: tuple[float, float, float] = (-4.0, -4.0, -10.0)
    xyz_max: tuple[float, float, float] = (4.0, 4.0, 10.0)

    def __post_init__(self):
        if self.num_bins < 2:
            raise ConfigError(f"hist_traj_tokenizer_cfg: num_bins must be >= 2, got {self.num_bins}")
        _check_range("hist_traj_tokenizer_cfg", "ego_xyz", self.xyz_min, self.xyz_max)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> HistoryTokenizerConfig:
        where = "hist_traj_tokenizer_cfg"
        f = _Fields(cfg, where, IGNORED_FIELDS[where])
        f.target("DeltaTrajectoryTokenizer")
        if f.optional("predict_yaw", False, bool):
            raise ConfigError(
                f"{where}: predict_yaw=true is not supported: yaw tokens are not implemented (the "
                "prompt carries 3 tokens, dx dy dz, per history pose)"
            )
        xyz = {
            bound: _float_tuple(f.optional(name, list(getattr(cls, bound)), (list, tuple)), where, name, 3)
            for bound, name in (("xyz_min", "ego_xyz_min"), ("xyz_max", "ego_xyz_max"))
        }
        config = cls(num_bins=f.optional("num_bins", cls.num_bins, int), **xyz)
        f.finish()
        return config


@dataclasses.dataclass(frozen=True)
class FutureTokenizerConfig:
    """`DiscreteTrajectoryTokenizer`: the normalised actions fitted to the future, quantised to
    `num_bins` bins over [dims_min, dims_max] per action channel (training and AR decoding only).
    The reference has no defaults for these: all are required."""

    action_space: ActionSpaceConfig
    num_bins: int
    dims_min: tuple[float, float]
    dims_max: tuple[float, float]

    def __post_init__(self):
        if self.num_bins < 2:
            raise ConfigError(f"traj_tokenizer_cfg: num_bins must be >= 2, got {self.num_bins}")
        _check_range("traj_tokenizer_cfg", "dims", self.dims_min, self.dims_max)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> FutureTokenizerConfig:
        where = "traj_tokenizer_cfg"
        f = _Fields(cfg, where, IGNORED_FIELDS[where])
        f.target("DiscreteTrajectoryTokenizer")
        config = cls(
            action_space=ActionSpaceConfig.from_hf_config(
                f.section("action_space_cfg", "the tokenizer's action space is built from it"),
                f"{where}.action_space_cfg",
            ),
            num_bins=f.required("num_bins", int),
            dims_min=_float_tuple(f.required("dims_min", list), where, "dims_min", 2),
            dims_max=_float_tuple(f.required("dims_max", list), where, "dims_max", 2),
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
    """Alpamayo-R1: Qwen3-VL backbone + flow-matching action expert + unicycle action space.

    traj_token_start_idx: id of `<i0>`; the future tokenizer's bins come first, then the history's.
    traj_vocab_size: number of `<i*>` tokens (reference default 768); generation masks them.
    tokens_per_history_traj, tokens_per_future_traj: prompt placeholders for the history (3 per
        pose) and the rollout's default token budget (reference defaults 16 and 64).
    image_token_id, vision_start_token_id, vision_end_token_id: from the backbone config
        (transformers' defaults when absent).
    min_pixels, max_pixels: the image processor's pixel budget. The reference's default is null,
        and its inference helper then uses 163840 and 196608, which are the defaults here.
    """

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
    traj_vocab_size: int = 768
    tokens_per_history_traj: int = 16
    tokens_per_future_traj: int = 64
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
        bins = self.future_tokenizer.num_bins + self.history_tokenizer.num_bins
        if bins > self.traj_vocab_size:
            raise ConfigError(
                f"traj_vocab_size ({self.traj_vocab_size}) must hold the future bins "
                f"({self.future_tokenizer.num_bins}) and, after them, the history bins "
                f"({self.history_tokenizer.num_bins})"
            )
        if self.traj_token_start_idx + self.traj_vocab_size > self.text.vocab_size:
            raise ConfigError("trajectory tokens extend past vocab_size")
        for name in ("tokens_per_history_traj", "tokens_per_future_traj"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config.json: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(
                f"config.json: need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}"
            )

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
        `config.json` dict. Raises `ConfigError` on any unknown, missing, unsupported or
        inconsistent field."""
        f = _Fields(config, "config.json", IGNORED_FIELDS["alpamayo_r1"])
        model_type = f.required("model_type", str)
        if model_type != "alpamayo_r1":
            raise ConfigError(f"config.json: model_type must be 'alpamayo_r1', got {model_type!r}")
        _check_alpamayo_flags(f)

        b = _Fields(backbone, "backbone config.json", IGNORED_FIELDS["qwen3_vl"])
        if b.required("model_type", str) != "qwen3_vl":
            raise ConfigError("backbone config.json: model_type must be 'qwen3_vl'")
        if b.optional("tie_word_embeddings", False, bool):
            raise ConfigError(
                "backbone config.json: tie_word_embeddings=true is not supported: lm_head here is a "
                "separate matrix"
            )
        default_config = "the reference would build transformers' default one; not supported"
        text_config = b.section("text_config", default_config)
        text = TextConfig.from_hf_config(text_config, vocab_size=f.required("vocab_size", int))
        vision = VisionConfig.from_hf_config(b.section("vision_config", default_config))
        defaults = {field.name: field.default for field in dataclasses.fields(cls)}
        token_ids = {
            name: b.optional(name, defaults[name], int)
            for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id")
        }
        b.finish()

        _check_action_out_proj(
            f.section("action_out_proj_cfg", "the reference builds the output projection from it")
        )
        hist_cfg = f.section(
            "hist_traj_tokenizer_cfg",
            "without it the reference tokenises the history with the future tokenizer; not supported",
        )
        fut_cfg = f.section(
            "traj_tokenizer_cfg",
            "without it the reference has no future tokenizer and starts the history bins at <i0>; "
            "not supported",
        )
        pixels = {}
        for name in ("min_pixels", "max_pixels"):  # null, as absent, means this project's default
            value = f.optional(name, None, (int, type(None)))
            pixels[name] = defaults[name] if value is None else value
        result = cls(
            vision=vision,
            text=text,
            expert=ExpertConfig.from_text_config(
                text_config, f.optional("expert_cfg", None, (dict, type(None)))
            ),
            action_in_proj=ActionInProjConfig.from_hf_config(
                f.section("action_in_proj_cfg", "the reference builds the input projection from it")
            ),
            action_space=ActionSpaceConfig.from_hf_config(
                f.section("action_space_cfg", "the reference builds the action space from it")
            ),
            flow_matching=FlowMatchingConfig.from_hf_config(
                f.section("diffusion_cfg", "the reference builds the flow-matching sampler from it")
            ),
            history_tokenizer=HistoryTokenizerConfig.from_hf_config(hist_cfg),
            future_tokenizer=FutureTokenizerConfig.from_hf_config(fut_cfg),
            traj_token_ids=TrajectoryTokenIds.from_hf_config(
                f.section("traj_token_ids", "the prompt's trajectory tokens are located by it")
            ),
            traj_token_start_idx=f.required("traj_token_start_idx", int),
            **_defaults(cls, f, ("traj_vocab_size", "tokens_per_history_traj", "tokens_per_future_traj")),
            **pixels,
            **token_ids,
        )
        f.finish()
        return result


def _check_alpamayo_flags(f: _Fields) -> None:
    """The `config.json` switches whose other values this implementation does not reproduce."""
    backend = f.optional("vlm_backend", "qwenvl3", str)
    if backend.lower() != "qwenvl3":
        raise ConfigError(
            f"config.json: vlm_backend {backend!r} is not supported: only the Qwen3-VL backbone "
            "('qwenvl3') is implemented"
        )
    if not f.optional("add_special_tokens", False, bool):
        raise ConfigError(
            "config.json: add_special_tokens=false (the reference's default when absent) is not "
            "supported: the reference then adds only the six trajectory tokens as special tokens, "
            "while the inference prompt needs <|cot_start|> and the others as special tokens"
        )
    if not f.optional("keep_same_dtype", True, bool):
        raise ConfigError(
            "config.json: keep_same_dtype=false is not supported: the reference then leaves the "
            "action projections in their construction dtype (e.g. float32) while the expert runs in "
            "its own (e.g. bf16); here all parameters share one dtype"
        )
    if not f.optional("expert_non_causal_attention", True, bool):
        raise ConfigError(
            "config.json: expert_non_causal_attention=false is not supported: with "
            "flash_attention_2 (the released checkpoint's attn_implementation) the reference then "
            "trains the expert causally over the action tokens, while they attend to each other "
            "bidirectionally here"
        )


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
