"""Rotary position embeddings: 1-D, interleaved multimodal (MRoPE) and their application.

Angles are computed in float32 as an elementwise product (never a matmul, whose precision would
depend on the platform), then cos/sin are cast to the activation dtype.

Shapes: B batch, T tokens, H head_dim, F = H // 2 rotary frequencies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
    """(dim // 2,) float32 `1 / theta ** (2i / dim)`, evaluated step by step in float32 as the
    reference does (integer range -> float32 -> divide -> power -> reciprocal)."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent, dtype=np.float32)).astype(np.float32)


def mrope_axis_of_frequency(num_frequencies: int, mrope_section: tuple[int, int, int]) -> np.ndarray:
    """(F,) int: which position axis (0 = T, 1 = H, 2 = W) drives each frequency.

    Interleaved layout: frequency i uses H if i % 3 == 1 and i < 3 * section_H, W if i % 3 == 2
    and i < 3 * section_W, and T otherwise.
    """
    index = np.arange(num_frequencies)
    axis = np.zeros(num_frequencies, dtype=np.int32)
    for position_axis in (1, 2):
        axis[(index % 3 == position_axis) & (index < 3 * mrope_section[position_axis])] = position_axis
    return axis


def mrope_cos_sin(
    position_ids: jax.Array,  # (3, B, T) int: (t, h, w) positions
    *,
    head_dim: int,
    theta: float,
    mrope_section: tuple[int, int, int],
    dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array]:
    """Interleaved MRoPE tables: cos, sin of shape (B, T, head_dim) in `dtype`.

    For text tokens (t == h == w) this is ordinary 1-D RoPE.
    """
    if position_ids.ndim != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must be (3, B, T), got {position_ids.shape}")
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))  # (F,)
    axis = mrope_axis_of_frequency(head_dim // 2, mrope_section)  # (F,)
    # (B, T, F): each frequency reads the position of its own axis.
    positions = jnp.moveaxis(position_ids, 0, -1)[..., axis].astype(jnp.float32)
    angles = positions * inv_freq
    return _cos_sin(angles, dtype)


def _cos_sin(angles: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] on the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x` (B, T, N, H) by per-token tables cos/sin (B, T, H), shared over heads N."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
