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
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=q.shape[-1] ** -0.5)
    if bias is None:
        return out
    attends = jnp.any(bias > MASK_VALUE, axis=-1, keepdims=True)  # (B | 1, N | 1, T | 1, 1)
    return jnp.where(jnp.swapaxes(attends, 1, 2), out, jnp.zeros((), out.dtype))


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
        keys, values = k, v
        if prefix_kv is not None:
            prefix_k, prefix_v = prefix_kv
            keys = jnp.concatenate([prefix_k.astype(k.dtype), k], axis=1)
            values = jnp.concatenate([prefix_v.astype(v.dtype), v], axis=1)
        out = dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), bias)
        return self.o_proj(out), (k, v)
