"""Normalisation layers with the reference's dtype order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alpamayo_jax.nn.axes import axes
from alpamayo_jax.nn.precision import LAYER_NORM_DTYPE


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x), computed in float32 and cast back to the input dtype (before any scaling)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Qwen3 RMSNorm: `scale * cast(x_f32 / rms(x_f32), x.dtype)`.

    The multiply by `scale` happens after the cast, so the output dtype is the promotion of the
    input and parameter dtypes, as in the reference.
    """

    def __init__(self, dim: int, *, eps: float, axis_name: str, param_dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs  # initialised to ones, like the reference
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **axes(axis_name))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.scale[...] * rms_normalize(x, self.eps)


def layer_norm(dim: int, *, eps: float, axis_name: str, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """torch's LayerNorm as the reference runs it: the two-pass variance (the fast
    E[x^2] - E[x]^2 form loses precision), computed and returned in float32 whatever the
    parameters' dtype, as under autocast (`alpamayo_jax.nn.precision`)."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=LAYER_NORM_DTYPE, param_dtype=param_dtype,
                         scale_metadata=axes(axis_name), bias_metadata=axes(axis_name), rngs=rngs)
