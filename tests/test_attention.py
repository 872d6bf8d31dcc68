"""The attention cores of `alpamayo_jax.nn.attention` against one another: `causal_attention`
(blocks of queries over the keys up to each block's end) equals `block_attention` over the whole
causal mask, left padding included. float32, highest matmul precision (conftest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alpamayo_jax.config import tiny
from alpamayo_jax.nn.attention import (
    MAX_QUERY_BLOCKS,
    QUERY_BLOCK,
    Attention,
    CausalMask,
    bias_from_mask,
    block_attention,
    causal_attention,
    causal_mask,
)
from tests.parity import assert_close


# 5: one block; 130: blocks of 64 and a short last one; 1100: more than MAX_QUERY_BLOCKS * 64
# tokens, so 16 longer blocks.
@pytest.mark.parametrize("num_tokens", [5, 130, 1100])
def test_causal_attention_equals_one_masked_block(num_tokens):
    assert 1100 > MAX_QUERY_BLOCKS * QUERY_BLOCK
    keys = jax.random.split(jax.random.key(num_tokens), 3)
    q = jax.random.normal(keys[0], (2, num_tokens, 4, 16))  # B, T, N, H: 2 queries per kv head
    k = jax.random.normal(keys[1], (2, 2, num_tokens, 16))  # B, K, T, H
    v = jax.random.normal(keys[2], (2, 2, num_tokens, 16))
    padding = min(3, num_tokens - 1)
    key_mask = jnp.ones((2, num_tokens), bool).at[1, :padding].set(False)  # row 1 left-padded
    mask = causal_mask(num_tokens)[None] & key_mask[:, None, :]
    expected = block_attention(q, [(k, v, bias_from_mask(mask)[:, None])])
    out = causal_attention(q, k, v, key_mask)
    assert out.shape == expected.shape == (2, num_tokens, 4, 16)
    assert_close(out, expected, rel=1e-6, name=f"causal attention over {num_tokens} tokens")
    np.testing.assert_array_equal(np.asarray(out[1, :padding]), 0)  # padded queries see nothing


def test_causal_mask_takes_no_prefix_or_cache():
    attention = Attention(tiny().text, rngs=nnx.Rngs(0))
    head_dim = tiny().text.head_dim
    x = jnp.ones((1, 3, tiny().text.hidden_size))
    cos, sin = jnp.ones((1, 3, head_dim)), jnp.zeros((1, 3, head_dim))
    prefix = jnp.zeros((1, tiny().text.num_key_value_heads, 4, head_dim))
    with pytest.raises(ValueError, match="CausalMask"):
        attention(x, cos, sin, CausalMask(jnp.ones((1, 3), bool)), (prefix, prefix))
