"""The action expert on the language model's KV cache.

The expert is a Qwen3 decoder stack without token embedding or lm_head (`TextDecoder` with no
vocabulary). Its layer l attends to the language model's cached keys/values of layer l, read only,
followed by its own action tokens; the action tokens see each other bidirectionally. Nothing is
written to or cropped from the language model's cache.

Per row i of the batch, `offset_i` is the sequence index right after the first
`<|traj_future_start|>` (or the sequence length when it never came). The action tokens take the
positions `offset_i + rope_delta_i + k` (k = 0..T-1) on all three MRoPE axes, i.e. where the next
tokens would have gone, and cache columns from `offset_i` on (tokens a row generated after its
`<|traj_future_start|>` while other rows were still running) are hidden.

Shapes: B batch, T action tokens (waypoints), L layers, K kv heads, S cache capacity, H head_dim,
E expert width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from alpamayo_jax.models.kv_cache import KVCache
from alpamayo_jax.models.text import DecoderOutput, TextDecoder
from alpamayo_jax.nn.attention import bias_from_mask, causal_mask


@struct.dataclass
class ExpertContext:
    """What the expert reads from the language model for one batch of rows."""

    k: jax.Array  # (L, B, K, S, H) cached keys, read only (a tuple of L (B, K, S, H): `per_layer`)
    v: jax.Array  # (L, B, K, S, H) cached values, read only
    position_ids: jax.Array  # (3, B, T)
    bias: jax.Array  # (B, 1, 1, S + T) additive attention bias, the same for every action token, or
    #                  (B, 1, T, S + T) when the action tokens attend causally (the reference's training)

    def per_layer(self) -> ExpertContext:
        """The same view with `k` and `v` as tuples of L (B, K, S, H) arrays, for a loop that runs
        the expert many times on one context (the Euler steps). XLA does not hoist the layer
        slices of the stacked cache out of such a loop, so every step would copy every layer's
        keys and values: 240 copies, 114 ms of a 1.57 s flow on the 263M bench model (one thread)."""
        return self.replace(k=tuple(self.k), v=tuple(self.v))


def expert_position_ids(offsets: jax.Array, rope_deltas: jax.Array, num_tokens: int) -> jax.Array:
    """(3, B, T) int32: `offset_i + rope_delta_i + k` on all three MRoPE axes."""
    positions = (offsets + rope_deltas)[:, None] + jnp.arange(num_tokens)  # (B, T)
    return jnp.broadcast_to(positions.astype(jnp.int32), (3, *positions.shape))


def expert_attention_bias(visible_prefix: jax.Array, num_tokens: int, *, causal: bool = False) -> jax.Array:
    """Additive bias over [prefix (S) || action tokens (T)] from `visible_prefix` (B, S) bool:
    (B, 1, 1, S + T) with the action tokens fully visible to each other, or with `causal`
    (B, 1, T, S + T), action token k seeing action tokens 0..k only."""
    batch = visible_prefix.shape[0]
    if causal:
        actions = jnp.broadcast_to(causal_mask(num_tokens), (batch, num_tokens, num_tokens))
        prefix = jnp.broadcast_to(visible_prefix[:, None, :], (batch, num_tokens, visible_prefix.shape[1]))
        return bias_from_mask(jnp.concatenate([prefix, actions], axis=2)[:, None])
    mask = jnp.concatenate([visible_prefix, jnp.ones((batch, num_tokens), bool)], axis=1)
    return bias_from_mask(mask[:, None, None, :])


def visible_cache_columns(cache: KVCache, offsets: jax.Array) -> jax.Array:
    """(B, S) bool: cache column s is visible to row i iff s < min(offset_i, cache length) and
    it holds a real token (not left padding)."""
    before_offset = jnp.arange(cache.capacity)[None, :] < jnp.minimum(offsets, cache.length)[:, None]
    return before_offset & cache.mask


def expert_context(cache: KVCache, offsets: jax.Array, rope_deltas: jax.Array, num_tokens: int) -> ExpertContext:
    """Builds the expert's view of `cache` for rows with the given `offsets` (B,) and
    `rope_deltas` (B,): the inference view, action tokens attending to each other in full."""
    return ExpertContext(
        k=cache.k,
        v=cache.v,
        position_ids=expert_position_ids(offsets, rope_deltas, num_tokens),
        bias=expert_attention_bias(visible_cache_columns(cache, offsets), num_tokens),
    )


def run_expert(expert: TextDecoder, inputs_embeds: jax.Array, context: ExpertContext,
               return_layer_outputs: bool = False, *, remat: bool = False) -> DecoderOutput:
    """Expert decoder over action embeddings (B, T, E); hidden states after the final norm.
    `remat` recomputes each layer in the backward pass (`TextDecoder`)."""
    return expert(inputs_embeds, context.position_ids, context.bias, (context.k, context.v),
                  return_layer_outputs=return_layer_outputs, remat=remat)
