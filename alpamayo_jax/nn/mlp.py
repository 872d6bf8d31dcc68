"""SwiGLU feed-forward block of the Qwen3 decoders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alpamayo_jax.nn.axes import axes
from alpamayo_jax.nn.linear import Linear
from alpamayo_jax.nn.precision import silu


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), no biases; the projections compute in the parameter dtype
    (`alpamayo_jax.nn.precision`)."""

    def __init__(self, dim: int, hidden: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        def linear(n_in, n_out, names):
            return Linear(n_in, n_out, use_bias=False, param_dtype=param_dtype, kernel_metadata=axes(*names),
                          rngs=rngs)

        self.gate_proj = linear(dim, hidden, ("embed", "mlp"))
        self.up_proj = linear(dim, hidden, ("embed", "mlp"))
        self.down_proj = linear(hidden, dim, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))
