"""The one table between Hugging Face checkpoint keys and parameter paths.

A `Rule` pairs a checkpoint key pattern with a parameter path pattern (`{i}` stands for a layer
index) and names the transform between the two layouts. Where two rules share a key pattern
(a torch `Sequential` mixing linear layers and norms), the one whose parameter exists in the
module applies. The same rules drive loading (checkpoint
-> parameters) and export (parameters -> checkpoint), so the two cannot drift apart.

Layouts:
* `linear`: a torch `Linear.weight` (out, in) <-> a kernel whose leading `in_dims` axes are the
  input and the rest the output, e.g. q_proj (D, N, H) or o_proj (N, H, D).
* `patch`: the Conv3d patch embedding (out, C, T, P, P) <-> a dense kernel (C*T*P*P, out) applied
  to the processor's flattened patches, whose rows are laid out [C][T][P][P].
* `same`: stored as is (norm scales, biases, embeddings, buffers).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Literal

import numpy as np

Layout = Literal["linear", "patch", "same"]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # checkpoint key pattern, e.g. "layers.{i}.mlp.up_proj.weight"
    param: str  # parameter path pattern, e.g. "layers.{i}.mlp.up_proj.kernel"
    layout: Layout = "same"
    in_dims: int = 1  # for `linear`: how many leading kernel axes form the input

    def mount(self, hf_prefix: str, param_prefix: str) -> Rule:
        return dataclasses.replace(self, hf=hf_prefix + self.hf, param=param_prefix + self.param)

    @property
    def hf_regex(self) -> re.Pattern:
        return _compile(self.hf)

    @property
    def param_regex(self) -> re.Pattern:
        return _compile(self.param)


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


def _mount(rules: Iterable[Rule], hf_prefix: str, param_prefix: str) -> list[Rule]:
    return [rule.mount(hf_prefix, param_prefix) for rule in rules]


# --- one decoder layer (language model and expert) -------------------------------------------
DECODER_LAYER = [
    Rule("input_layernorm.weight", "input_layernorm.scale"),
    Rule("post_attention_layernorm.weight", "post_attention_layernorm.scale"),
    Rule("self_attn.q_proj.weight", "self_attn.q_proj.kernel", "linear"),
    Rule("self_attn.k_proj.weight", "self_attn.k_proj.kernel", "linear"),
    Rule("self_attn.v_proj.weight", "self_attn.v_proj.kernel", "linear"),
    Rule("self_attn.o_proj.weight", "self_attn.o_proj.kernel", "linear", in_dims=2),
    Rule("self_attn.q_norm.weight", "self_attn.q_norm.scale"),
    Rule("self_attn.k_norm.weight", "self_attn.k_norm.scale"),
    Rule("mlp.gate_proj.weight", "mlp.gate_proj.kernel", "linear"),
    Rule("mlp.up_proj.weight", "mlp.up_proj.kernel", "linear"),
    Rule("mlp.down_proj.weight", "mlp.down_proj.kernel", "linear"),
]


def decoder_rules(*, with_embedding: bool) -> list[Rule]:
    """A `TextDecoder`: layers, final norm and (language model only) the token embedding."""
    rules = _mount(DECODER_LAYER, "layers.{i}.", "layers.{i}.") + [Rule("norm.weight", "norm.scale")]
    if with_embedding:
        rules.append(Rule("embed_tokens.weight", "embed_tokens.embedding"))
    return rules


# --- vision tower -----------------------------------------------------------------------------
def _merger(prefix: str) -> list[Rule]:
    return [
        Rule(f"{prefix}norm.weight", f"{prefix}norm.scale"),
        Rule(f"{prefix}norm.bias", f"{prefix}norm.bias"),
        Rule(f"{prefix}linear_fc1.weight", f"{prefix}linear_fc1.kernel", "linear"),
        Rule(f"{prefix}linear_fc1.bias", f"{prefix}linear_fc1.bias"),
        Rule(f"{prefix}linear_fc2.weight", f"{prefix}linear_fc2.kernel", "linear"),
        Rule(f"{prefix}linear_fc2.bias", f"{prefix}linear_fc2.bias"),
    ]


VISION_BLOCK = [
    Rule("norm1.weight", "norm1.scale"),
    Rule("norm1.bias", "norm1.bias"),
    Rule("norm2.weight", "norm2.scale"),
    Rule("norm2.bias", "norm2.bias"),
    Rule("attn.qkv.weight", "attn.qkv.kernel", "linear"),
    Rule("attn.qkv.bias", "attn.qkv.bias"),
    Rule("attn.proj.weight", "attn.proj.kernel", "linear"),
    Rule("attn.proj.bias", "attn.proj.bias"),
    Rule("mlp.linear_fc1.weight", "mlp.linear_fc1.kernel", "linear"),
    Rule("mlp.linear_fc1.bias", "mlp.linear_fc1.bias"),
    Rule("mlp.linear_fc2.weight", "mlp.linear_fc2.kernel", "linear"),
    Rule("mlp.linear_fc2.bias", "mlp.linear_fc2.bias"),
]


def vision_rules() -> list[Rule]:
    """The Qwen3-VL vision tower (`VisionModel`)."""
    return [
        Rule("patch_embed.proj.weight", "patch_embed.proj.kernel", "patch"),
        Rule("patch_embed.proj.bias", "patch_embed.proj.bias"),
        Rule("pos_embed.weight", "pos_embed.embedding"),
        *_mount(VISION_BLOCK, "blocks.{i}.", "blocks.{i}."),
        *_merger("merger."),
        *_merger("deepstack_merger_list.{i}."),
    ]


# --- action side ------------------------------------------------------------------------------
def action_in_proj_rules() -> list[Rule]:
    """`PerWaypointActionInProjV2`: Fourier buffers, the MLP trunk (torch `Sequential` indices
    kept: linears and RMSNorms at their positions, activations hold no weights) and a LayerNorm."""
    return [
        Rule("sinus.{i}.freqs", "sinus.{i}.freqs"),
        Rule("timestep_fourier_encoder.freqs", "timestep_fourier_encoder.freqs"),
        # Linear layers and RMSNorms share the key pattern; the module's structure tells them apart.
        Rule("encoder.trunk.{i}.weight", "encoder.trunk.{i}.kernel", "linear"),
        Rule("encoder.trunk.{i}.weight", "encoder.trunk.{i}.scale"),
        Rule("encoder.trunk.{i}.bias", "encoder.trunk.{i}.bias"),
        Rule("norm.weight", "norm.scale"),
        Rule("norm.bias", "norm.bias"),
    ]


ACTION_SPACE_BUFFERS = ("accel_mean", "accel_std", "curvature_mean", "curvature_std")


def causal_lm_rules() -> list[Rule]:
    """The text path of a transformers `Qwen3VLForConditionalGeneration` onto a `CausalLM`."""
    return [
        *_mount(decoder_rules(with_embedding=True), "model.language_model.", "language_model."),
        Rule("lm_head.weight", "lm_head.kernel", "linear"),
    ]


def qwen3_vl_rules() -> list[Rule]:
    """A transformers `Qwen3VLForConditionalGeneration` state dict onto a `Qwen3VL` module."""
    return [*_mount(vision_rules(), "model.visual.", "visual."), *causal_lm_rules()]


def alpamayo_rules() -> list[Rule]:
    """The full Alpamayo-R1 checkpoint (`AlpamayoR1.save_pretrained` keys)."""
    rules = [
        *_mount(qwen3_vl_rules(), "vlm.", "vlm."),
        *_mount(decoder_rules(with_embedding=False), "expert.", "expert."),
        *_mount(action_in_proj_rules(), "action_in_proj.", "action_in_proj."),
        Rule("action_out_proj.weight", "action_out_proj.kernel", "linear"),
        Rule("action_out_proj.bias", "action_out_proj.bias"),
        *[Rule(f"action_space.{name}", f"action_space.{name}") for name in ACTION_SPACE_BUFFERS],
    ]
    _check_unambiguous(rules)
    return rules


def _check_unambiguous(rules: list[Rule]) -> None:
    params = [rule.param for rule in rules]
    duplicates = {p for p in params if params.count(p) > 1}
    if duplicates:
        raise AssertionError(f"weight map has duplicate parameter patterns: {sorted(duplicates)}")


# --- layout transforms ------------------------------------------------------------------------
def layout_problem(rule: Rule, source_shape: tuple[int, ...], param_shape: tuple[int, ...]) -> str | None:
    """Why a checkpoint tensor of `source_shape` cannot fill a parameter of `param_shape` through
    `rule`, or None when it fits."""
    source_shape, param_shape = tuple(source_shape), tuple(param_shape)
    if rule.layout == "same":
        fits, expected = source_shape == param_shape, param_shape
    elif rule.layout == "linear":
        fan_in, fan_out = math.prod(param_shape[: rule.in_dims]), math.prod(param_shape[rule.in_dims:])
        fits, expected = source_shape == (fan_out, fan_in), (fan_out, fan_in)
    elif rule.layout == "patch":
        fan_in, fan_out = param_shape
        fits = len(source_shape) == 5 and source_shape[0] == fan_out and math.prod(source_shape[1:]) == fan_in
        expected = f"({fan_out}, C, T, P, P) with C*T*P*P = {fan_in}"
    else:
        raise AssertionError(rule.layout)
    if fits:
        return None
    return (f"shape {source_shape} does not fit parameter shape {param_shape} "
            f"({rule.layout} layout expects {expected})")


def to_param_layout(rule: Rule, array: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
    """Checkpoint tensor -> parameter layout. Raises ValueError on a shape that does not fit."""
    problem = layout_problem(rule, array.shape, param_shape)
    if problem:
        raise ValueError(problem)
    if rule.layout == "linear":
        return array.T.reshape(param_shape)
    if rule.layout == "patch":
        return array.reshape(param_shape[1], param_shape[0]).T
    return array


def checkpoint_shape(rule: Rule, param_shape: tuple[int, ...], conv_shape: tuple[int, ...] | None = None
                     ) -> tuple[int, ...]:
    """The checkpoint shape of a parameter. `conv_shape` is the Conv3d kernel shape that the
    `patch` layout flattens (kept as parameter metadata, see `PatchEmbed`)."""
    if rule.layout == "linear":
        return (math.prod(param_shape[rule.in_dims:]), math.prod(param_shape[: rule.in_dims]))
    if rule.layout == "patch":
        if conv_shape is None:
            raise ValueError(f"{rule.hf}: the patch layout needs the Conv3d kernel shape")
        return tuple(conv_shape)
    return tuple(param_shape)


def to_checkpoint_layout(rule: Rule, array: np.ndarray, conv_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Parameter -> checkpoint layout, the inverse of `to_param_layout`."""
    shape = checkpoint_shape(rule, array.shape, conv_shape)
    if rule.layout == "same":
        return array
    return array.reshape(math.prod(array.shape[: rule.in_dims]), -1).T.reshape(shape)
