"""The linear layer of every module: nnx.Linear's parameters, autocast's arithmetic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Linear):
    """`nnx.Linear` (same parameters, names and metadata) computing as a linear layer does under
    `torch.autocast`: inputs and kernel in the layer's dtype (its parameter dtype when `dtype`
    is not given), products accumulated in float32, the bias added in float32, one rounding to
    the layer's dtype at the end. Rounding before the bias, as nnx.Linear does in bfloat16, gives
    a different bfloat16 value for about a third of the outputs. In float32 it is nnx.Linear."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        dtype = self.dtype or self.param_dtype
        y = jax.lax.dot_general(inputs.astype(dtype), self.kernel[...].astype(dtype),
                                (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision,
                                preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)
