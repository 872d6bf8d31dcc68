"""The attention cores of `alpamayo_jax.nn.attention`: `block_attention` against the textbook
softmax (one query and several, grouped heads, a per-head bias); `causal_attention`
(blocks of queries over the keys up to each block's end) equals `block_attention` over the whole
causal mask, left padding included; the cuDNN form (`fused_attention`: boolean key mask, causal
flag) computes the same through XLA; which kernel runs where. float32, highest matmul precision
(conftest). cuDNN's kernel itself needs a GPU: bench/gpu.py compares it with XLA there."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alpamayo_jax.config import tiny
from alpamayo_jax.nn.attention import (
    ATTENTION_ENV_VAR,
    MAX_QUERY_BLOCKS,
    ONE_BLOCK_TOKENS,
    QUERY_BLOCK,
    Attention,
    CausalMask,
    bias_from_mask,
    block_attention,
    causal_attention,
    causal_mask,
    fused_attention,
    fused_attention_takes,
    use_fused_attention,
)
from tests.parity import assert_close


# 5: one block; 600: 10 blocks of 60; 1100: more than MAX_QUERY_BLOCKS * 64 tokens, so 16 longer
# blocks.
@pytest.mark.parametrize("num_tokens", [5, 600, 1100])
def test_causal_attention_equals_one_masked_block(num_tokens):
    assert 5 <= ONE_BLOCK_TOKENS < 600 and 1100 > MAX_QUERY_BLOCKS * QUERY_BLOCK
    keys = jax.random.split(jax.random.key(num_tokens), 3)
    q = jax.random.normal(keys[0], (2, num_tokens, 4, 16))  # B, T, N, H: 2 queries per kv head
    k = jax.random.normal(keys[1], (2, 2, num_tokens, 16))  # B, K, T, H
    v = jax.random.normal(keys[2], (2, 2, num_tokens, 16))
    padding = min(3, num_tokens - 1)
    key_mask = jnp.ones((2, num_tokens), bool).at[1, :padding].set(False)  # row 1 left-padded
    mask = causal_mask(num_tokens)[None] & key_mask[:, None, :]
    one_block = jax.jit(lambda q, k, v, bias: block_attention(q, [(k, v, bias)]))
    expected = one_block(q, k, v, bias_from_mask(mask)[:, None])
    out = jax.jit(causal_attention)(q, k, v, key_mask)  # one program, not one per eager op
    assert out.shape == expected.shape == (2, num_tokens, 4, 16)
    assert_close(out, expected, rel=1e-6, name=f"causal attention over {num_tokens} tokens")
    np.testing.assert_array_equal(np.asarray(out[1, :padding]), 0)  # padded queries see nothing


@pytest.mark.parametrize("num_new", [1, 5])  # one query (decoding) and several: the two product layouts
def test_block_attention_equals_one_softmax(num_new):
    """`block_attention` over two blocks of keys with a per-head bias equals the textbook softmax
    over the joined keys, for 3 queries per key/value head."""
    keys = jax.random.split(jax.random.key(num_new), 6)
    batch, heads, kv_heads, head_dim, prefix = 2, 6, 2, 8, 7
    q = jax.random.normal(keys[0], (batch, num_new, heads, head_dim))
    k1, v1 = (jax.random.normal(key, (batch, kv_heads, prefix, head_dim)) for key in keys[1:3])
    k2, v2 = (jax.random.normal(key, (batch, kv_heads, num_new, head_dim)) for key in keys[3:5])
    bias = jax.random.normal(keys[5], (batch, heads, num_new, prefix + num_new))
    out = jax.jit(block_attention)(q, [(k1, v1, bias[..., :prefix]), (k2, v2, bias[..., prefix:])])
    group = heads // kv_heads
    k = jnp.repeat(jnp.concatenate([k1, k2], axis=2), group, axis=1)  # (B, N, S + T, H)
    v = jnp.repeat(jnp.concatenate([v1, v2], axis=2), group, axis=1)
    weights = jax.nn.softmax(jnp.einsum("btnh,bnsh->bnts", q, k) / head_dim ** 0.5 + bias, axis=-1)
    expected = jnp.einsum("bnts,bnsh->btnh", weights, v)
    assert_close(out, expected, rel=1e-6, name=f"block attention of {num_new} queries")


def test_causal_mask_takes_no_prefix_or_cache():
    attention = Attention(tiny().text, rngs=nnx.Rngs(0))
    head_dim = tiny().text.head_dim
    x = jnp.ones((1, 3, tiny().text.hidden_size))
    cos, sin = jnp.ones((1, 3, head_dim)), jnp.zeros((1, 3, head_dim))
    prefix = jnp.zeros((1, tiny().text.num_key_value_heads, 4, head_dim))
    with pytest.raises(ValueError, match="CausalMask"):
        attention(x, cos, sin, CausalMask(jnp.ones((1, 3), bool)), (prefix, prefix))


def random_qkv(seed: int, num_tokens: int):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (2, num_tokens, 4, 16)),  # B, T, N, H
            jax.random.normal(keys[1], (2, num_tokens, 2, 16)),  # B, S, K, H: jax.nn's layout
            jax.random.normal(keys[2], (2, num_tokens, 2, 16)))


def test_fused_form_equals_the_xla_cores():
    """What cuDNN would get (boolean key mask, causal flag, keys in (B, S, K, H)) computes, through
    XLA, what `causal_attention` and `block_attention` compute, zeros for unattending queries."""
    q, k, v = random_qkv(3, 70)
    key_mask = jnp.ones((2, 70), bool).at[1, :5].set(False)
    causal = fused_attention(q, k, v, key_mask, causal=True, implementation="xla")
    expected = causal_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), key_mask)
    assert_close(causal, expected, rel=1e-6, name="fused form, causal with left padding")
    np.testing.assert_array_equal(np.asarray(causal[1, :5]), 0)
    plain = fused_attention(q, k, v, implementation="xla")
    expected = block_attention(q, [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), None)])
    assert_close(plain, expected, rel=1e-6, name="fused form, no mask")
    nothing = fused_attention(q, k, v, jnp.zeros((2, 70), bool), implementation="xla")
    np.testing.assert_array_equal(np.asarray(nothing), 0)


def test_which_kernel_runs_where(monkeypatch):
    assert fused_attention_takes("gpu", jnp.bfloat16, 128) and fused_attention_takes("gpu", jnp.float16, 72)
    assert not fused_attention_takes("gpu", jnp.float32, 128)  # float32 stays with XLA
    assert not fused_attention_takes("gpu", jnp.bfloat16, 100)  # not a multiple of 8
    assert not fused_attention_takes("gpu", jnp.bfloat16, 256)
    assert not fused_attention_takes("cpu", jnp.bfloat16, 128)
    q = jnp.zeros((1, 4, 2, 16), jnp.bfloat16)
    monkeypatch.delenv(ATTENTION_ENV_VAR, raising=False)
    assert not use_fused_attention(q)  # CPU: XLA
    monkeypatch.setenv(ATTENTION_ENV_VAR, "xla")
    assert not use_fused_attention(q)
    monkeypatch.setenv(ATTENTION_ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="needs a GPU"):
        use_fused_attention(q)
    monkeypatch.setenv(ATTENTION_ENV_VAR, "flash")
    with pytest.raises(ValueError, match="expected one of"):
        use_fused_attention(q)
