"""The Qwen3-VL language model: token embedding, decoder stack, final norm and untied lm_head.

`TextDecoder` is the decoder stack (the reference's `Qwen3VLTextModel`); the action expert is the
same stack without the token embedding. `CausalLM` adds the `lm_head` and a static KV cache.

Shapes: B batch, T new tokens, S cache capacity, D width, V vocabulary, L layers,
K key/value heads, H head_dim, J DeepStack feature sets. Keys and values are (L, B, K, S, H),
the cache's layout (`alpamayo_jax.models.kv_cache`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from alpamayo_jax.config import DecoderConfig, TextConfig
from alpamayo_jax.models.kv_cache import KVCache
from alpamayo_jax.nn.attention import CacheWrite, CausalMask, bias_from_mask
from alpamayo_jax.nn.axes import axes
from alpamayo_jax.nn.decoder_layer import DecoderLayer
from alpamayo_jax.nn.linear import Linear
from alpamayo_jax.nn.norms import RMSNorm
from alpamayo_jax.nn.rotary import mrope_cos_sin


class DecoderOutput(NamedTuple):
    hidden_states: jax.Array  # (B, T, D) after the final norm
    k: jax.Array  # (L, B, K, T, H) keys of the new tokens (the cache's layout), after k_norm and rotary
    v: jax.Array  # (L, B, K, T, H)
    layer_outputs: tuple[jax.Array, ...] | None  # L x (B, T, D), raw layer outputs (before DeepStack)
    cache_k: jax.Array | None = None  # with a cache: its keys, the new tokens' written, in the form
    #                                   given: (L, B, K, S, H), or `KVCache.per_layer`'s
    cache_v: jax.Array | None = None


class TextDecoder(nnx.Module):
    """Decoder layers + final RMSNorm; with `vocab_size`, also the token embedding."""

    def __init__(self, config: DecoderConfig, *, vocab_size: int | None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        if vocab_size is not None:
            self.embed_tokens = nnx.Embed(
                vocab_size, config.hidden_size, param_dtype=param_dtype,
                embedding_metadata=axes("vocab", "embed"), rngs=rngs,
            )
        self.layers = nnx.List(
            [DecoderLayer(config, param_dtype=param_dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, axis_name="embed",
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        inputs_embeds: jax.Array,  # (B, T, D)
        position_ids: jax.Array,  # (3, B, T) MRoPE (t, h, w) positions
        bias: jax.Array | CausalMask | None,  # (B, N, T, S + T)-broadcastable; (B, N, T, S) with cache
        prefix_kv: tuple | None = None,  # keys, values: (L, B, K, S, H) or L of (B, K, S, H) each; read only
        deepstack_embeds: jax.Array | None = None,  # (J, B, T, D), added after layers 0..J-1
        return_layer_outputs: bool = False,
        remat: bool = False,
        cache: KVCache | None = None,
    ) -> DecoderOutput:
        """Either attends to a read-only `prefix_kv` followed by the new tokens, or writes the new
        tokens' keys/values into `cache` at its length, layer by layer, and attends to the cache
        (`CacheWrite`; `cache_k`/`cache_v` of the output in the cache's form, stacked or
        `per_layer`; the cache's mask and length unchanged). A loop should carry its cache
        per layer: a stacked one is split and stacked again in every call.

        With `remat`, each layer's activations are recomputed in the backward pass instead of
        stored (`nnx.remat` per layer): memory of one layer for the price of a second forward."""
        c = self.config
        if cache is not None and (prefix_kv is not None or remat):
            raise ValueError("a cached forward takes neither a read-only prefix_kv nor remat")
        cos, sin = mrope_cos_sin(position_ids, head_dim=c.head_dim, theta=c.rope_theta,
                                 mrope_section=c.mrope_section, dtype=inputs_embeds.dtype)
        num_deepstack = 0 if deepstack_embeds is None else deepstack_embeds.shape[0]
        if num_deepstack > len(self.layers):
            raise ValueError(f"{num_deepstack} DeepStack feature sets for {len(self.layers)} layers")
        x = inputs_embeds
        new_k, new_v, layer_outputs = [], [], []
        apply_layer = _recomputed_layer if remat else _layer
        layer_cache = None if cache is None else cache.per_layer()
        cache_kv = None if layer_cache is None else (layer_cache.k, layer_cache.v)
        for index, layer in enumerate(self.layers):
            if cache_kv is not None:
                write = CacheWrite(*cache_kv, layer=index, start=cache.length)
                x, cache_kv = layer(x, cos, sin, bias, cache=write)
            else:
                layer_prefix = None if prefix_kv is None else (prefix_kv[0][index], prefix_kv[1][index])
                x, (k, v) = apply_layer(layer, x, cos, sin, bias, layer_prefix)
                new_k.append(k)
                new_v.append(v)
            layer_outputs.append(x)
            if index < num_deepstack:
                x = x + deepstack_embeds[index].astype(x.dtype)
        if cache_kv is None:
            k, v, cache_k, cache_v = jnp.stack(new_k), jnp.stack(new_v), None, None
        else:
            batch, num_new, head_dim = x.shape[0], x.shape[1], self.config.head_dim
            k, v = (jnp.stack([jax.lax.dynamic_slice_in_dim(layer_part, cache.length, num_new, axis=1)
                               .reshape(batch, -1, num_new, head_dim) for layer_part in part])
                    for part in cache_kv)
            written = layer_cache.replace(k=cache_kv[0], v=cache_kv[1])
            written = written if cache.is_per_layer else written.stacked()
            cache_k, cache_v = written.k, written.v
        return DecoderOutput(
            hidden_states=self.norm(x),
            k=k,
            v=v,
            layer_outputs=tuple(layer_outputs) if return_layer_outputs else None,
            cache_k=cache_k,
            cache_v=cache_v,
        )


def _layer(layer: DecoderLayer, x, cos, sin, bias, prefix_kv):
    return layer(x, cos, sin, bias, prefix_kv)


_recomputed_layer = nnx.remat(_layer)


class LMOutput(NamedTuple):
    logits: jax.Array  # (B, T, V), or (B, n, V) with num_logits=n (the last n positions)
    hidden_states: jax.Array  # (B, T, D) after the final norm
    cache: KVCache | None  # the cache with the new tokens appended (None if none was given)
    k: jax.Array  # (L, B, K, T, H) keys of the new tokens
    v: jax.Array  # (L, B, K, T, H) values of the new tokens
    layer_outputs: tuple[jax.Array, ...] | None


class CausalLM(nnx.Module):
    """Token embedding -> decoder -> final norm -> untied lm_head, with an optional static cache.

    Parameter names follow the reference: `language_model.{embed_tokens,layers,norm}`, `lm_head`.
    """

    def __init__(self, config: TextConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.language_model = TextDecoder(config, vocab_size=config.vocab_size, param_dtype=param_dtype,
                                          rngs=rngs)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, param_dtype=param_dtype,
                              kernel_metadata=axes("embed", "vocab"), rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, D)."""
        return self.language_model.embed_tokens(input_ids)

    def __call__(
        self,
        input_ids: jax.Array | None = None,  # (B, T) int
        *,
        inputs_embeds: jax.Array | None = None,  # (B, T, D)
        position_ids: jax.Array | None = None,  # (3, B, T); default: consecutive from the cache length
        attention_mask: jax.Array | None = None,  # (B, T) bool: false on left padding; default all true
        cache: KVCache | None = None,
        deepstack_embeds: jax.Array | None = None,  # (J, B, T, D), zero outside visual tokens
        num_logits: int | None = None,  # logits of the last num_logits positions only; None: all
        return_layer_outputs: bool = False,
        remat: bool = False,
    ) -> LMOutput:
        """Causal forward over T new tokens, attending to the cache's real tokens (if any) and to
        themselves; no token attends to padding (`attention_mask` false), whose keys the cache
        keeps marked as such. `remat` recomputes each decoder layer in the backward pass
        (`TextDecoder`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        batch, num_new, _ = inputs_embeds.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length
        if position_ids is None:
            positions = start + jnp.arange(num_new, dtype=jnp.int32)
            position_ids = jnp.broadcast_to(positions, (3, batch, num_new))
        if position_ids.shape != (3, batch, num_new):
            raise ValueError(f"position_ids must be (3, {batch}, {num_new}), got {position_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones((batch, num_new), bool)
        elif attention_mask.shape != (batch, num_new):
            raise ValueError(f"attention_mask must be ({batch}, {num_new}), got {attention_mask.shape}")
        attention_mask = attention_mask.astype(bool)

        if cache is None:
            mask = CausalMask(attention_mask)
        else:
            cache.check_room(num_new)
            mask = bias_from_mask(cache.new_tokens_mask(attention_mask))[:, None]  # (B, 1, T, S)
        out = self.language_model(
            inputs_embeds, position_ids, mask, None,
            deepstack_embeds, return_layer_outputs, remat, cache,
        )
        hidden = out.hidden_states if num_logits is None else out.hidden_states[:, -num_logits:]
        return LMOutput(
            logits=self.lm_head(hidden),
            hidden_states=out.hidden_states,
            cache=None if cache is None else cache.written(out.cache_k, out.cache_v, attention_mask),
            k=out.k,
            v=out.v,
            layer_outputs=out.layer_outputs,
        )

    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        """An empty cache for `batch` rows and `capacity` tokens (prompt + new tokens)."""
        c = self.config
        return KVCache.empty(num_layers=c.num_hidden_layers, batch=batch, capacity=capacity,
                             num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                             dtype=dtype or self.lm_head.kernel.dtype)
