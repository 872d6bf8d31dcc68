"""One pre-norm Qwen3 decoder layer, shared by the language model and the action expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alpamayo_jax.config import DecoderConfig
from alpamayo_jax.nn.attention import KV, Attention, CacheWrite, CausalMask
from alpamayo_jax.nn.mlp import SwiGLU
from alpamayo_jax.nn.norms import RMSNorm


class DecoderLayer(nnx.Module):
    """x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: DecoderConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, axis_name="embed", param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,  # (B, T, D)
        cos: jax.Array,  # (B, T, H)
        sin: jax.Array,  # (B, T, H)
        bias: jax.Array | CausalMask | None,  # as `Attention`
        prefix_kv: KV | None = None,  # (B, K, S, H) each, read only
        cache: CacheWrite | None = None,
    ) -> tuple[jax.Array, KV]:
        """Returns the output (B, T, D) and the keys/values `Attention` returns."""
        attn_out, kv = self.self_attn(self.input_layernorm(x), cos, sin, bias, prefix_kv, cache)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv
