"""Grouped-query attention of the Qwen3 decoders, with QK-norm, rotary and a read-only prefix.

Shapes: B batch, T new tokens, S prefix (cached) tokens, D model width, N query heads,
K key/value heads, H head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alpamayo_jax.config import DecoderConfig
from alpamayo_jax.nn.axes import axes
from alpamayo_jax.nn.norms import RMSNorm
from alpamayo_jax.nn.rotary import apply_rotary

# Additive bias for masked attention entries, as the reference's float masks use.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)

KV = tuple[jax.Array, jax.Array]  # keys, values: (B, S, K, H) each


def bias_from_mask(mask: jax.Array) -> jax.Array:
    """Boolean "may attend" mask -> additive float32 bias (0 or MASK_VALUE)."""
    return jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)


def causal_mask(num_tokens: int) -> jax.Array:
    """(T, T) bool: token t may attend to tokens 0..t."""
    return jnp.tril(jnp.ones((num_tokens, num_tokens), dtype=bool))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(H) + bias) v with GQA; softmax in float32.

    q (B, T, N, H); k, v (B, S, K, H); bias broadcastable to (B, N, T, S). Returns (B, T, N, H).
    A query that may attend to no key at all (left padding) gets zeros, as PyTorch's attention
    with a boolean mask gives: a bias of MASK_VALUE everywhere would instead attend to every key.
    """
    return _zero_unattended(jax.nn.dot_product_attention(q, k, v, bias=bias, scale=q.shape[-1] ** -0.5), bias)


def _zero_unattended(out: jax.Array, bias: jax.Array | None) -> jax.Array:
    """`out` (B, T, N, H) with zeros for the queries `bias` lets attend to no key."""
    if bias is None:
        return out
    attends = jnp.any(bias > MASK_VALUE, axis=-1, keepdims=True)  # (B | 1, N | 1, T | 1, 1)
    return jnp.where(jnp.swapaxes(attends, 1, 2), out, jnp.zeros((), out.dtype))


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, prefix_k: jax.Array,
                     prefix_v: jax.Array) -> jax.Array:
    """`dot_product_attention` over [prefix || new] keys without joining them: the scores of the
    prefix (S) and of the new tokens (T) share one softmax, and each set of values is weighted
    on its own. Joining a long cached prefix to one new token would copy the whole cache in every
    layer at every step.

    q (B, T, N, H); k, v (B, T, K, H); prefix_k, prefix_v (B, S, K, H); bias broadcastable to
    (B, N, T, S + T) as for the joined keys. Returns (B, T, N, H)."""
    batch, num_new, num_heads, head_dim = q.shape
    num_prefix, num_kv = prefix_k.shape[1], k.shape[2]
    group = num_heads // num_kv
    qg = q.reshape(batch, num_new, num_kv, group, head_dim) * jnp.asarray(head_dim ** -0.5, q.dtype)

    def scores(keys, part_bias):  # (B, K, G, T, len)
        out = jnp.einsum("btkgh,bskh->bkgts", qg, keys, preferred_element_type=jnp.float32)
        if part_bias is None:
            return out
        part_bias = jnp.asarray(part_bias, jnp.float32)
        heads = part_bias.shape[1]
        part_bias = part_bias.reshape(part_bias.shape[0], num_kv if heads > 1 else 1, group if heads > 1 else 1,
                                      *part_bias.shape[2:])
        return out + part_bias

    prefix_bias = None if bias is None else bias[..., :num_prefix]
    new_bias = None if bias is None else bias[..., num_prefix:]
    prefix_scores, new_scores = scores(prefix_k, prefix_bias), scores(k, new_bias)
    peak = jnp.maximum(prefix_scores.max(axis=-1, keepdims=True), new_scores.max(axis=-1, keepdims=True))
    prefix_weights, new_weights = jnp.exp(prefix_scores - peak), jnp.exp(new_scores - peak)
    total = prefix_weights.sum(axis=-1, keepdims=True) + new_weights.sum(axis=-1, keepdims=True)
    def weighted(weights, values):  # (B, K, G, T, H) float32
        return jnp.einsum("bkgts,bskh->bkgth", weights.astype(values.dtype), values,
                          preferred_element_type=jnp.float32)

    out = (weighted(prefix_weights, prefix_v) + weighted(new_weights, v)) / total
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, num_new, num_heads, head_dim).astype(q.dtype)
    return _zero_unattended(out, bias)


class Attention(nnx.Module):
    """Qwen3 attention: q/k/v projections, per-head RMSNorm on q and k, rotary, GQA, output
    projection. New tokens attend to an optional read-only `prefix_kv` followed by themselves."""

    def __init__(self, config: DecoderConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim

        def proj(einsum: str, shape, names):
            return nnx.Einsum(einsum, shape, param_dtype=param_dtype, kernel_metadata=axes(*names), rngs=rngs)

        self.q_proj = proj("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"))
        self.k_proj = proj("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.v_proj = proj("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.o_proj = proj("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"))
        norm = dict(eps=config.rms_norm_eps, axis_name="head_dim", param_dtype=param_dtype, rngs=rngs)
        self.q_norm = RMSNorm(h, **norm)
        self.k_norm = RMSNorm(h, **norm)

    def __call__(
        self,
        x: jax.Array,  # (B, T, D)
        cos: jax.Array,  # (B, T, H)
        sin: jax.Array,  # (B, T, H)
        bias: jax.Array | None,  # broadcastable to (B, N, T, S + T)
        prefix_kv: KV | None = None,
    ) -> tuple[jax.Array, KV]:
        """Returns the output (B, T, D) and this call's own keys/values (B, T, K, H), keys after
        k_norm and rotary, ready to be stored in a cache."""
        q = apply_rotary(self.q_norm(self.q_proj(x)), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(x)), cos, sin)
        v = self.v_proj(x)
        if prefix_kv is None:
            out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias)
        else:
            prefix_k, prefix_v = prefix_kv
            out = prefix_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias, prefix_k.astype(q.dtype),
                                   prefix_v.astype(q.dtype))
        return self.o_proj(out), (k, v)
