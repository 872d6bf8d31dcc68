"""Qwen3-VL: the vision tower spliced into the language model's input, with DeepStack injection.

The visual tokens of all images replace the `<|image_pad|>` placeholder embeddings in sequence
order (row-major over batch and tokens, like torch's `masked_scatter`); the DeepStack feature sets
are scattered the same way into dense (J, B, T, D) tensors, zero outside image tokens, that the
decoder adds after its first J layers. Positions (3, B, T) are computed on the host
(`alpamayo_jax.processing.rope_index`) and passed in.

Shapes: B batch, T tokens, P patches, C flattened patch, M visual tokens (P / 4), D width,
V vocabulary, J DeepStack feature sets.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpamayo_jax.config import TextConfig, VisionConfig
from alpamayo_jax.models.kv_cache import KVCache
from alpamayo_jax.models.text import CausalLM, LMOutput
from alpamayo_jax.models.vision import ImageGrid, VisionModel, as_image_grid, num_visual_tokens


class _HasVisionAndText(Protocol):
    vision: VisionConfig
    text: TextConfig
    image_token_id: int


class MultimodalEmbeddings(NamedTuple):
    inputs_embeds: jax.Array  # (B, T, D) token embeddings with visual tokens spliced in
    deepstack_embeds: jax.Array | None  # (J, B, T, D), zero outside image tokens; None if J = 0
    visual_mask: jax.Array  # (B, T) bool, the placeholder positions


def check_image_placeholders(input_ids, image_token_id: int, num_visual: int) -> None:
    """Raises ValueError if concrete `input_ids` do not hold exactly `num_visual` image
    placeholder tokens. Traced ids cannot be inspected and are not checked."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    found = int(np.sum(np.asarray(input_ids) == image_token_id))
    if found != num_visual:
        raise ValueError(
            f"image placeholders and visual tokens do not match: input_ids hold {found} "
            f"<|image_pad|> tokens (id {image_token_id}) but the images give {num_visual} visual "
            f"tokens (sum of t*h*w / merge^2 over image_grid_thw)"
        )


def scatter_visual_rows(mask: jax.Array, rows: jax.Array, fill: jax.Array) -> jax.Array:
    """`fill` with the positions where `mask` is true replaced, in row-major order, by consecutive
    rows of `rows` (torch `masked_scatter` on whole feature vectors), with static shapes.

    mask (B, T) bool; rows (..., M, D); fill broadcastable to (..., B, T, D). The number of true
    entries in `mask` must equal M (checked on the host where possible).
    """
    batch, length = mask.shape
    flat = mask.reshape(-1)
    source = jnp.clip(jnp.cumsum(flat) - 1, 0, rows.shape[-2] - 1)  # (B*T,) row taken at each slot
    gathered = jnp.take(rows, source, axis=-2)  # (..., B*T, D)
    gathered = gathered.reshape(*rows.shape[:-2], batch, length, rows.shape[-1])
    return jnp.where(mask[..., None], gathered, fill)


class Qwen3VL(CausalLM):
    """`Qwen3VLForConditionalGeneration`: `visual`, `language_model`, `lm_head`.

    Construct as `Qwen3VL(vision_config, text_config, image_token_id=..., rngs=...)` or
    `Qwen3VL.from_config(config)` with any object carrying `.vision`, `.text` and
    `.image_token_id` (e.g. an `AlpamayoConfig`). Parameter paths match
    `alpamayo_jax.io.weight_map.qwen3_vl_rules()`.

    Calling it with `pixel_values` runs the multimodal prefill; without, it is the plain
    `CausalLM` (decode steps read the KV cache; DeepStack only applies to image tokens).
    """

    def __init__(self, vision: VisionConfig, text: TextConfig, *, image_token_id: int,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(f"vision out_hidden_size ({vision.out_hidden_size}) must equal the language "
                             f"model hidden_size ({text.hidden_size})")
        if len(vision.deepstack_visual_indexes) > text.num_hidden_layers:
            raise ValueError("more DeepStack feature sets than language-model layers")
        super().__init__(text, param_dtype=param_dtype, rngs=rngs)
        self.vision_config = vision
        self.image_token_id = image_token_id
        self.visual = VisionModel(vision, param_dtype=param_dtype, rngs=rngs)

    @classmethod
    def from_config(cls, config: _HasVisionAndText, *, param_dtype=jnp.float32, rngs: nnx.Rngs) -> Qwen3VL:
        """Builds from a config with `.vision`, `.text` and `.image_token_id` (`AlpamayoConfig`)."""
        return cls(config.vision, config.text, image_token_id=config.image_token_id, param_dtype=param_dtype,
                   rngs=rngs)

    def num_visual_tokens(self, image_grid_thw) -> int:
        """Placeholder tokens the prompt must hold for these images."""
        return num_visual_tokens(as_image_grid(image_grid_thw), self.vision_config.spatial_merge_size)

    def embed_multimodal(
        self,
        input_ids: jax.Array,  # (B, T) int, with <|image_pad|> placeholders
        pixel_values: jax.Array,  # (P, C)
        image_grid_thw,  # static (I, 3)
    ) -> MultimodalEmbeddings:
        """Token embeddings with the visual tokens spliced in, and the dense DeepStack features.

        Raises ValueError when (concrete) `input_ids` hold a different number of placeholders
        than the images produce visual tokens.
        """
        grid = as_image_grid(image_grid_thw)
        check_image_placeholders(input_ids, self.image_token_id, self.num_visual_tokens(grid))
        input_ids = jnp.asarray(input_ids)
        embeds = self.embed(input_ids)
        vision = self.visual(pixel_values, grid)
        mask = input_ids == self.image_token_id
        embeds = scatter_visual_rows(mask, vision.image_embeds.astype(embeds.dtype), embeds)
        deepstack = None
        if vision.deepstack_embeds.shape[0]:
            deepstack = scatter_visual_rows(mask, vision.deepstack_embeds.astype(embeds.dtype),
                                            jnp.zeros((), embeds.dtype))
        return MultimodalEmbeddings(embeds, deepstack, mask)

    def __call__(
        self,
        input_ids: jax.Array | None = None,  # (B, T) int
        *,
        pixel_values: jax.Array | None = None,  # (P, C); requires input_ids and image_grid_thw
        image_grid_thw: ImageGrid | None = None,  # static (I, 3)
        inputs_embeds: jax.Array | None = None,  # (B, T, D)
        position_ids: jax.Array | None = None,  # (3, B, T); required with pixel_values
        attention_mask: jax.Array | None = None,  # (B, T) bool: false on left padding
        cache: KVCache | None = None,
        deepstack_embeds: jax.Array | None = None,  # (J, B, T, D)
        num_logits: int | None = None,  # logits of the last num_logits positions only; None: all
        return_layer_outputs: bool = False,
        remat: bool = False,
    ) -> LMOutput:
        """Multimodal forward when `pixel_values` is given (prefill), else `CausalLM.__call__`.

        Layer outputs (with `return_layer_outputs`) are taken before each DeepStack addition;
        `remat` recomputes the language model's layers in the backward pass.
        """
        if pixel_values is not None:
            if input_ids is None or image_grid_thw is None:
                raise ValueError("pixel_values needs input_ids (to locate <|image_pad|>) and image_grid_thw")
            if inputs_embeds is not None or deepstack_embeds is not None:
                raise ValueError("with pixel_values, inputs_embeds and deepstack_embeds are computed here")
            if position_ids is None:
                raise ValueError("multimodal positions depend on the image layout: pass position_ids "
                                 "(3, B, T) from get_rope_index")
            mm = self.embed_multimodal(input_ids, pixel_values, image_grid_thw)
            input_ids, inputs_embeds, deepstack_embeds = None, mm.inputs_embeds, mm.deepstack_embeds
        return super().__call__(
            input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
            cache=cache,
            deepstack_embeds=deepstack_embeds, num_logits=num_logits,
            return_layer_outputs=return_layer_outputs, remat=remat,
        )
