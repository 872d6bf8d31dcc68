"""How the modules compute with bfloat16 parameters: the reference's `torch.autocast(bfloat16)`.

NVIDIA runs Alpamayo-R1 with bfloat16 weights under CUDA autocast, and a model loaded with
`dtype=jnp.bfloat16` follows the same dtype flow (SPEC §10); with float32 parameters every rule
below is the identity and the model computes in float32 throughout.

| operation | computes in | returns |
|---|---|---|
| linear, einsum projection, patch embedding, lm_head | bfloat16 inputs (cast), float32 accumulation | bfloat16 |
| attention (queries, keys, values cast to bfloat16) | float32 scores and softmax | bfloat16 |
| LayerNorm (vision, action input projection) | float32 (input cast up) | **float32** |
| RMSNorm | float32, rounded to the input dtype, then times the weight | promotion of both |
| SiLU, GELU | float32, rounded once | input dtype |
| rotary | cos/sin in the hidden dtype (vision: float32, rounded after) | promotion |
| Fourier features, flow-matching update, action space | float32 | float32 |

Consequences: the language model's residual stream is bfloat16; the action expert's is float32,
because its inputs come from a LayerNorm (its projections are still bfloat16, its rotary
float32); the Euler update adds a bfloat16 velocity to float32 actions.

The reference's CPU autocast differs from its CUDA autocast in one rule that matters here
(LayerNorm stays in the input dtype and refuses float32 inputs with bfloat16 weights), so the
CPU comparison (`tests/test_bfloat16.py`) runs PyTorch's LayerNorms by the CUDA rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# LayerNorm runs and returns float32 under autocast, whatever its parameters' dtype.
LAYER_NORM_DTYPE = jnp.float32


def silu(x: jax.Array) -> jax.Array:
    """x * sigmoid(x) evaluated in float32 and rounded once to x's dtype, as torch's kernels do."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def gelu(x: jax.Array, *, approximate: bool) -> jax.Array:
    """GELU (tanh approximation or exact erf) evaluated in float32 and rounded once to x's dtype."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=approximate).astype(x.dtype)
