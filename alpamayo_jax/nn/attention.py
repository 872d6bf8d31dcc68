"""Grouped-query attention of the Qwen3 decoders, with QK-norm, rotary and a read-only prefix.

Shapes: B batch, T new tokens, S prefix (cached) tokens, D model width, N query heads,
K key/value heads, H head_dim.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from alpamayo_jax.config import DecoderConfig
from alpamayo_jax.nn.axes import axes
from alpamayo_jax.nn.norms import RMSNorm
from alpamayo_jax.nn.rotary import apply_rotary

# Additive bias for masked attention entries, as the reference's float masks use.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)

KV = tuple[jax.Array, jax.Array]  # keys, values: (B, K, S, H) each, the KV cache's layout


class CacheWrite(NamedTuple):
    """Where a layer of a cached forward puts its new keys/values: slots `start`.. of layer `layer`
    of a cache held per layer (`KVCache.per_layer`). The layer then attends to its whole arrays,
    the new tokens included. Writing before reading lets XLA update the loop-carried cache of a
    decode loop in place; reading the old cache and writing afterwards makes it copy each layer's
    arrays, as it cannot tell that the products read them before the write."""

    k: tuple[jax.Array, ...]  # L x (B * K, S, H)
    v: tuple[jax.Array, ...]  # L x (B * K, S, H)
    layer: int
    start: jax.Array  # () int32: the first new token's slot

    def write(self, k_new: jax.Array, v_new: jax.Array) -> tuple[KV, tuple[tuple[jax.Array, ...], ...]]:
        """Writes the new keys/values (B, K, T, H) at `start` of this layer. Returns the layer's
        keys and values (B, K, S, H) holding them, and the cache's (k, v) tuples with them."""
        batch, num_heads, _, head_dim = k_new.shape

        def written(parts, new):
            rows = new.reshape(batch * num_heads, -1, head_dim).astype(parts[self.layer].dtype)
            part = jax.lax.dynamic_update_slice(parts[self.layer], rows, (0, self.start, 0))
            replaced = (*parts[:self.layer], part, *parts[self.layer + 1:])
            return part.reshape(batch, num_heads, -1, head_dim), replaced

        keys, k_parts = written(self.k, k_new)
        values, v_parts = written(self.v, v_new)
        return (keys, values), (k_parts, v_parts)


def bias_from_mask(mask: jax.Array) -> jax.Array:
    """Boolean "may attend" mask -> additive float32 bias (0 or MASK_VALUE)."""
    return jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)


def causal_mask(num_tokens: int) -> jax.Array:
    """(T, T) bool: token t may attend to tokens 0..t."""
    return jnp.tril(jnp.ones((num_tokens, num_tokens), dtype=bool))


class CausalMask(NamedTuple):
    """Causal self-attention of T new tokens, none attending to a key whose `key_mask` is false
    (left padding). Passed instead of a bias, its structure lets `causal_attention` skip the
    scores above the diagonal."""

    key_mask: jax.Array  # (B, T) bool


# Queries per block of `causal_attention`: scores of 64 queries stay in the CPU's caches. A long
# sequence gets fewer, longer blocks, which bounds the size of the unrolled program; one of up to
# ONE_BLOCK_TOKENS tokens stays one block (on one thread, 16 heads of 64, blocks save 2.5 ms per
# layer at 256 tokens and 31 ms at 512, for a program several times as large to compile).
QUERY_BLOCK = 64
MAX_QUERY_BLOCKS = 16
ONE_BLOCK_TOKENS = 512


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Causal self-attention (`CausalMask`) by blocks of queries, each attending only to the keys
    up to its last query: half the products of one (T, T) block, and small score blocks. At
    T = 1116 (16 heads of 64) on one CPU thread: 87 ms against 215 ms for one block. Up to
    `ONE_BLOCK_TOKENS` tokens, one block. Each row is `block_attention`'s arithmetic over its
    visible keys.

    On a GPU with 16-bit inputs, cuDNN's fused causal kernel instead (`use_fused_attention`).

    q (B, T, N, H); k, v (B, K, T, H); key_mask (B, T) bool. Returns (B, T, N, H)."""
    if use_fused_attention(q):
        return fused_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), key_mask, causal=True)
    num_tokens = q.shape[1]
    num_blocks = min(-(-num_tokens // QUERY_BLOCK), MAX_QUERY_BLOCKS) if num_tokens > ONE_BLOCK_TOKENS else 1
    size = -(-num_tokens // num_blocks)
    outputs = []
    for start in range(0, num_tokens, size):
        stop = min(start + size, num_tokens)
        visible = causal_mask(stop)[None, start:] & key_mask[:, None, :stop]  # (B, block, stop)
        outputs.append(block_attention(q[:, start:stop], [(k[:, :, :stop], v[:, :, :stop],
                                                            bias_from_mask(visible)[:, None])]))
    return jnp.concatenate(outputs, axis=1)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(H) + bias) v with GQA (`block_attention` over one block of keys;
    without a bias, cuDNN's fused kernel where `use_fused_attention` says so).

    q (B, T, N, H); k, v (B, S, K, H); bias broadcastable to (B, N, T, S). Returns (B, T, N, H).
    """
    if bias is None and use_fused_attention(q):
        return fused_attention(q, k, v)
    return block_attention(q, [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), bias)])


# Which kernel the attention of long sequences uses: "auto" (cuDNN's fused kernel where it takes
# the inputs, else XLA), "xla" or "cudnn" (an error where cuDNN does not take them). Read when a
# program is traced: set it before the first call.
ATTENTION_ENV_VAR = "ALPAMAYO_JAX_ATTENTION"
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def fused_attention_takes(backend: str, dtype, head_dim: int) -> bool:
    """Whether cuDNN's fused attention kernel takes these inputs: a GPU, 16-bit floats, head_dim
    a multiple of 8 up to 128."""
    return (backend == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= 128)


def use_fused_attention(q: jax.Array) -> bool:
    """Whether attention of the queries q (B, T, N, H) goes to cuDNN (`ATTENTION_ENV_VAR`)."""
    choice = os.environ.get(ATTENTION_ENV_VAR, "auto")
    if choice not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"{ATTENTION_ENV_VAR}={choice!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
    takes = fused_attention_takes(jax.default_backend(), q.dtype, q.shape[-1])
    if choice == "cudnn" and not takes:
        raise ValueError(f"{ATTENTION_ENV_VAR}=cudnn, but cuDNN's fused attention takes no {q.dtype} queries "
                         f"of head_dim {q.shape[-1]} on the {jax.default_backend()} backend "
                         "(it needs a GPU, bfloat16 or float16, head_dim a multiple of 8 up to 128)")
    return choice == "cudnn" or (choice == "auto" and takes)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None, *,
                    causal: bool = False, implementation: str = "cudnn") -> jax.Array:
    """Attention through `jax.nn.dot_product_attention` in the form cuDNN's fused kernel takes:
    a boolean key mask and the causal flag instead of a float bias. A query that sees no key
    gets zeros, as in `block_attention`. (`implementation="xla"` computes the same on any
    backend; the tests compare it with the other cores.)

    q (B, T, N, H); k, v (B, S, K, H); key_mask (B, S) bool or None. Returns (B, T, N, H)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)
    if key_mask is None:
        return out
    # With the causal flag, query t sees a key iff one of keys 0..t is unmasked (T == S).
    attends = jnp.cumsum(key_mask, axis=1) > 0 if causal else jnp.any(key_mask, axis=1, keepdims=True)
    return jnp.where(attends[:, :, None, None], out, jnp.zeros((), out.dtype))


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, prefix_k: jax.Array,
                     prefix_v: jax.Array) -> jax.Array:
    """`dot_product_attention` over [prefix || new] keys without joining them. Joining a long
    cached prefix to one new token would copy the whole cache in every layer at every step.

    q (B, T, N, H); k, v (B, K, T, H); prefix_k, prefix_v (B, K, S, H), the cache's layout (the
    products read them as stored); bias broadcastable to (B, N, T, S + T) as for the joined keys.
    Returns (B, T, N, H)."""
    num_prefix = prefix_k.shape[2]
    prefix_bias = None if bias is None else bias[..., :num_prefix]
    new_bias = None if bias is None else bias[..., num_prefix:]
    return block_attention(q, [(prefix_k, prefix_v, prefix_bias), (k, v, new_bias)])


def block_attention(q: jax.Array, blocks: list[tuple[jax.Array, jax.Array, jax.Array | None]]) -> jax.Array:
    """Attention of q (B, T, N, H) over the keys of several blocks sharing one softmax; each block
    is (keys (B, K, S_i, H), values (B, K, S_i, H), bias broadcastable to (B, N, T, S_i) or None).

    The arithmetic of PyTorch's fused attention kernels, which the reference runs: scores and
    softmax statistics in float32, the unnormalised weights exp(s - max) rounded to the values'
    dtype for the weighted sum (accumulated in float32), the division by the weights' sum last,
    one rounding to q's dtype. (In bfloat16, normalising before rounding the weights gives other
    values.) A query that may attend to no key at all (left padding) gets zeros, as PyTorch's
    attention with a boolean mask gives; a bias of MASK_VALUE everywhere would instead attend to
    every key. Returns (B, T, N, H).
    """
    batch, num_new, num_heads, head_dim = q.shape
    num_kv = blocks[0][0].shape[1]
    group = num_heads // num_kv
    qg = q.reshape(batch, num_new, num_kv, group, head_dim)
    # Several queries (prefill, vision, the expert): each key/value head's queries as one
    # (G * T, H) matrix, so that both products are plain batched matrix products over (B, K).
    # Left in (B, T, K, G, H), XLA's CPU kernels transposed the scores and values around each
    # product. One thread, the 263M bench model: vision attention of 16 images x 240 tokens
    # 32 ms against 74 ms, the prefill 6.3 s against 6.9 s, 10 flow steps 1.29 s against 1.66 s.
    # One query (decoding) keeps the (B, T, K, G, H) products: merged, the decode loop took 7.0 s
    # against 4.6 s for 64 tokens.
    merged = num_new > 1
    if merged:
        qg = jnp.transpose(qg, (0, 2, 3, 1, 4)).reshape(batch, num_kv, group * num_new, head_dim)

    def scores(keys, bias):  # (B, K, G, T, S_i) float32
        if merged:
            out = jnp.einsum("bkmh,bksh->bkms", qg, keys, preferred_element_type=jnp.float32)
            out = out.reshape(batch, num_kv, group, num_new, keys.shape[2])
        else:
            out = jnp.einsum("btkgh,bksh->bkgts", qg, keys, preferred_element_type=jnp.float32)
        out = out * head_dim ** -0.5
        if bias is None:
            return out
        bias = jnp.asarray(bias, jnp.float32)
        heads = bias.shape[1]
        return out + bias.reshape(bias.shape[0], num_kv if heads > 1 else 1, group if heads > 1 else 1,
                                  *bias.shape[2:])

    def weighted_values(weights, values):  # (B, K, G, T, S_i), (B, K, S_i, H) -> (B, K, G, T, H) float32
        weights = weights.astype(values.dtype)
        if not merged:
            return jnp.einsum("bkgts,bksh->bkgth", weights, values, preferred_element_type=jnp.float32)
        weights = weights.reshape(batch, num_kv, group * num_new, values.shape[2])
        out = jnp.einsum("bkms,bksh->bkmh", weights, values, preferred_element_type=jnp.float32)
        return out.reshape(batch, num_kv, group, num_new, head_dim)

    block_scores = [scores(keys, bias) for keys, _, bias in blocks]
    peak = block_scores[0].max(axis=-1, keepdims=True)
    for part in block_scores[1:]:
        peak = jnp.maximum(peak, part.max(axis=-1, keepdims=True))
    weights = [jnp.exp(part - peak) for part in block_scores]
    total = sum(part.sum(axis=-1, keepdims=True) for part in weights)
    out = sum(weighted_values(part, values) for part, (_, values, _) in zip(weights, blocks, strict=True))
    out = out / total
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, num_new, num_heads, head_dim).astype(q.dtype)
    attends = jnp.zeros((), bool)
    for _, _, bias in blocks:
        if bias is None:
            return out
        attends = attends | jnp.any(bias > MASK_VALUE, axis=-1, keepdims=True)  # (B | 1, N | 1, T | 1, 1)
    return jnp.where(jnp.swapaxes(attends, 1, 2), out, jnp.zeros((), out.dtype))


class Attention(nnx.Module):
    """Qwen3 attention: q/k/v projections, per-head RMSNorm on q and k, rotary, GQA, output
    projection. New tokens attend to an optional read-only `prefix_kv` followed by themselves, or,
    given a `CacheWrite`, are written into a stacked cache and attend to the layer's cache."""

    def __init__(self, config: DecoderConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.dtype = param_dtype  # the attention products' dtype (`alpamayo_jax.nn.precision`)

        def proj(einsum: str, shape, names):
            return nnx.Einsum(einsum, shape, dtype=param_dtype, param_dtype=param_dtype,
                              kernel_metadata=axes(*names), rngs=rngs)

        self.q_proj = proj("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"))
        self.k_proj = proj("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.v_proj = proj("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"))
        # Holds the (N, H, D) kernel; `_project_out` multiplies by it.
        self.o_proj = proj("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"))
        norm = dict(eps=config.rms_norm_eps, axis_name="head_dim", param_dtype=param_dtype, rngs=rngs)
        self.q_norm = RMSNorm(h, **norm)
        self.k_norm = RMSNorm(h, **norm)

    def _project_out(self, out: jax.Array) -> jax.Array:
        """o_proj of the attention output (B, T, N, H) -> (B, T, D), as one (N * H, D) product.
        Contracting (N, H) as two axes, XLA's CPU compiler transposed the whole (N, H, D) kernel
        inside the decode loop, at every step (263M bench model, one thread: 4.1 s against 5.1 s
        for 64 tokens)."""
        kernel = self.o_proj.kernel[...]
        return jnp.einsum("btm,md->btd", out.reshape(*out.shape[:2], -1).astype(self.dtype),
                          kernel.reshape(-1, kernel.shape[-1]).astype(self.dtype))

    def __call__(
        self,
        x: jax.Array,  # (B, T, D)
        cos: jax.Array,  # (B, T, H)
        sin: jax.Array,  # (B, T, H)
        bias: jax.Array | CausalMask | None,  # (B, N, T, S + T)-broadcastable; with `cache`, (B, N, T, S)
        prefix_kv: KV | None = None,
        cache: CacheWrite | None = None,
    ) -> tuple[jax.Array, KV]:
        """Returns the output (B, T, D) and this call's own keys/values in the cache's layout
        (B, K, T, H), keys after k_norm and rotary; with `cache`, the cache's (k, v) tuples with
        this call's written into them. A `CausalMask` (self-attention among
        the new tokens only) goes through `causal_attention`."""
        if prefix_kv is not None and cache is not None:
            raise ValueError("pass a read-only prefix_kv or a cache to write into, not both")
        if isinstance(bias, CausalMask) and (prefix_kv is not None or cache is not None):
            raise ValueError("a CausalMask describes self-attention among the new tokens: no prefix or cache")
        q = apply_rotary(self.q_norm(self.q_proj(x)), cos, sin).astype(self.dtype)
        k = jnp.swapaxes(apply_rotary(self.k_norm(self.k_proj(x)), cos, sin), 1, 2)
        v = jnp.swapaxes(self.v_proj(x), 1, 2)
        if cache is not None:
            (keys, values), written = cache.write(k, v)
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
            return self._project_out(block_attention(q, [(keys, values, bias)])), written
        own = (k.astype(self.dtype), v.astype(self.dtype))
        if isinstance(bias, CausalMask):
            out = causal_attention(q, *own, bias.key_mask)
        elif prefix_kv is None:
            out = block_attention(q, [(*own, bias)])
        else:
            out = prefix_attention(q, *own, bias, *(part.astype(self.dtype) for part in prefix_kv))
        return self._project_out(out), (k, v)
