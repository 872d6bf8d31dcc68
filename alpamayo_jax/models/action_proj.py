"""Action projections around the expert: noisy actions + flow time in, velocity out.

`PerWaypointActionInProj` (the reference's `PerWaypointActionInProjV2`) encodes each waypoint's
(acceleration, curvature) and the flow time with Fourier features, runs an MLP with RMSNorms and a
final LayerNorm, and gives one expert input embedding per waypoint. Its features are float32 (it
upcasts its inputs, as the reference does), its linears compute in the parameter dtype and its
LayerNorm returns float32 (`alpamayo_jax.nn.precision`).

Shapes: B batch, W waypoints, C action channels (2), F Fourier features per encoder,
E expert width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpamayo_jax.config import ActionInProjConfig
from alpamayo_jax.nn.axes import axes
from alpamayo_jax.nn.linear import Linear
from alpamayo_jax.nn.norms import RMSNorm, layer_norm
from alpamayo_jax.nn.precision import silu
from alpamayo_jax.nn.variables import Buffer


class FourierEncoder(nnx.Module):
    """sqrt(2) * [sin(2 pi f s), cos(2 pi f s)] over log-spaced frequencies f in [1, max_freq].

    The frequencies are a stored buffer: a checkpoint saved in bf16 carries bf16-rounded values,
    which loading reproduces (they are never recomputed from the config then).
    """

    def __init__(self, num_features: int, max_freq: float, *, param_dtype=jnp.float32):
        freqs = np.logspace(0.0, math.log10(max_freq), num_features // 2)[None, :]
        self.freqs = Buffer(jnp.asarray(freqs, param_dtype), **axes(None, "fourier"))

    def __call__(self, s: jax.Array) -> jax.Array:
        """(...,) -> (..., F); evaluated in the promotion of `s` and the frequency dtype."""
        arg = s[..., None] * self.freqs[...] * 2 * jnp.pi
        return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1) * math.sqrt(2)


class MLPEncoder(nnx.Module):
    """Linear, SiLU, then (n - 1) x [RMSNorm, Linear, SiLU], then [RMSNorm, Linear].

    `trunk` keeps the reference's `Sequential` indices (activations hold no weights), so checkpoint
    keys `encoder.trunk.{i}` map to parameters `encoder.trunk.{i}` one to one.
    """

    def __init__(self, num_inputs: int, num_layers: int, hidden: int, num_outputs: int, *,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        def linear(n_in, n_out, names):
            return Linear(n_in, n_out, param_dtype=param_dtype, kernel_metadata=axes(*names),
                          bias_metadata=axes(names[1]), rngs=rngs)

        def norm():
            return RMSNorm(hidden, eps=1e-5, axis_name="action_hidden", param_dtype=param_dtype, rngs=rngs)

        trunk = [linear(num_inputs, hidden, ("action_features", "action_hidden")), silu]
        for _ in range(num_layers - 1):
            trunk += [norm(), linear(hidden, hidden, (None, "action_hidden")), silu]
        trunk += [norm(), linear(hidden, num_outputs, ("action_hidden", "embed"))]
        self.trunk = nnx.List(trunk)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.trunk:
            x = layer(x)
        return x


class PerWaypointActionInProj(nnx.Module):
    """(noisy actions (B, W, C), flow time (B,)) -> expert input embeddings (B, W, E)."""

    def __init__(self, config: ActionInProjConfig, *, action_dim: int, out_dim: int,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        def encoder():
            return FourierEncoder(config.num_fourier_feats, config.max_freq, param_dtype=param_dtype)

        self.sinus = nnx.List([encoder() for _ in range(action_dim)])
        self.timestep_fourier_encoder = encoder()
        self.encoder = MLPEncoder(
            (action_dim + 1) * config.num_fourier_feats, config.num_enc_layers, config.hidden_size, out_dim,
            param_dtype=param_dtype, rngs=rngs,
        )
        self.norm = layer_norm(out_dim, eps=1e-5, axis_name="embed", param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        """x (B, W, C) normalised noisy actions; t (B,) flow time (0 = noise, 1 = data)."""
        x = x.astype(jnp.float32)
        t = t.astype(jnp.float32)
        action_features = jnp.concatenate([encode(x[..., i]) for i, encode in enumerate(self.sinus)], axis=-1)
        time_features = self.timestep_fourier_encoder(t)[:, None, :]  # (B, 1, F), shared by all waypoints
        time_features = jnp.broadcast_to(time_features, (*x.shape[:2], time_features.shape[-1]))
        return self.norm(self.encoder(jnp.concatenate([action_features, time_features], axis=-1)))
