"""The bfloat16 arithmetic rules of `alpamayo_jax.nn.precision`, one by one, against their
definitions (tests/test_bfloat16.py compares the whole model with PyTorch's autocast run)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpamayo_jax.nn.attention import bias_from_mask, block_attention
from alpamayo_jax.nn.linear import Linear
from alpamayo_jax.nn.norms import layer_norm
from alpamayo_jax.nn.precision import gelu, silu

BF16 = jnp.bfloat16


def bits(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, BF16)).view(np.uint16)


def test_linear_adds_its_bias_before_the_one_rounding():
    layer = Linear(96, 64, param_dtype=BF16, rngs=nnx.Rngs(0))
    layer.bias[...] = jax.random.normal(jax.random.key(1), (64,), BF16)
    x = jax.random.normal(jax.random.key(2), (16, 96), jnp.float32)  # cast to bf16 by the layer
    expected = (jnp.dot(x.astype(BF16), layer.kernel[...], preferred_element_type=jnp.float32)
                + layer.bias[...].astype(jnp.float32)).astype(BF16)
    out = layer(x)
    assert out.dtype == BF16
    np.testing.assert_array_equal(bits(out), bits(expected))
    rounded_first = nnx.Linear(96, 64, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(0))
    rounded_first.bias[...] = layer.bias[...]
    differs = np.mean(bits(rounded_first(x)) != bits(out))
    print(f"outputs that rounding before the bias changes: {differs:.1%}")
    assert differs > 0.05  # the rule is observable on these sizes


def test_linear_in_float32_is_nnx_linear():
    with jax.default_matmul_precision("highest"):
        ours = Linear(24, 8, rngs=nnx.Rngs(3))
        theirs = nnx.Linear(24, 8, rngs=nnx.Rngs(3))
        x = jax.random.normal(jax.random.key(4), (5, 24))
        np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(theirs(x)))
        assert ours(x).dtype == jnp.float32


def test_layer_norm_returns_float32_from_bfloat16():
    norm = layer_norm(32, eps=1e-5, axis_name="embed", param_dtype=BF16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (4, 32), BF16) * 3 + 1
    out = norm(x)
    assert out.dtype == jnp.float32
    x32 = x.astype(jnp.float32)
    expected = (x32 - x32.mean(-1, keepdims=True)) / jnp.sqrt(x32.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=2e-6, atol=2e-6)


def test_activations_round_once():
    x = jax.random.normal(jax.random.key(6), (4096,), BF16) * 4
    np.testing.assert_array_equal(bits(silu(x)), bits(jax.nn.silu(x.astype(jnp.float32))))
    for approximate in (True, False):
        np.testing.assert_array_equal(bits(gelu(x, approximate=approximate)),
                                      bits(jax.nn.gelu(x.astype(jnp.float32), approximate=approximate)))


def test_block_attention_rounds_the_unnormalised_weights():
    """bfloat16: float32 scores, exp(s - max) rounded to bfloat16 for the weighted sum, the
    division last; the blocks share one softmax; a query with no visible key gets zeros."""
    keys = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(keys[0], (1, 3, 4, 16), BF16)  # B, T, N, H (2 queries per kv head)
    k = jax.random.normal(keys[1], (1, 2, 40, 16), BF16)  # B, K, S, H
    v = jax.random.normal(keys[2], (1, 2, 40, 16), BF16)
    mask = jnp.ones((1, 1, 3, 40), bool).at[:, :, 2].set(False)  # query 2 sees nothing
    bias = bias_from_mask(mask)
    blocks = [(k[:, :, :25], v[:, :, :25], bias[..., :25]), (k[:, :, 25:], v[:, :, 25:], bias[..., 25:])]
    out = block_attention(q, blocks)
    assert out.dtype == BF16

    qf, kf, vf = (np.asarray(a, np.float32) for a in (q, k, v))
    scores = np.einsum("btkgh,bksh->bkgts", qf.reshape(1, 3, 2, 2, 16), kf) / 4.0
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    rounded = np.asarray(jnp.asarray(weights, BF16), np.float32)
    expected = np.einsum("bkgts,bksh->bkgth", rounded, vf) / weights.sum(-1, keepdims=True)
    expected = expected.transpose(0, 3, 1, 2, 4).reshape(1, 3, 4, 16)
    np.testing.assert_allclose(np.asarray(out[:, :2], np.float32), expected[:, :2], rtol=8e-3, atol=0)
    np.testing.assert_array_equal(np.asarray(out[:, 2], np.float32), 0)

    normalised_first = np.einsum("bkgts,bksh->bkgth", np.asarray(
        jnp.asarray(weights / weights.sum(-1, keepdims=True), BF16), np.float32), vf)
    normalised_first = normalised_first.transpose(0, 3, 1, 2, 4).reshape(1, 3, 4, 16)
    ours_vs_normalised = np.mean(bits(out[:, :2]) != bits(normalised_first[:, :2]))
    ours_vs_expected = np.mean(bits(out[:, :2]) != bits(expected[:, :2]))
    print(f"bf16 outputs differing: from the definition {ours_vs_expected:.1%}, "
          f"from normalise-then-round {ours_vs_normalised:.1%}")
    assert ours_vs_expected < ours_vs_normalised
