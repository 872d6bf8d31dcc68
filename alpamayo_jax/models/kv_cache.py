"""A static-shape key/value cache for prefill and incremental decoding.

Shapes: L layers, B batch, K key/value heads, S cache capacity (static), H head_dim.

The layout (L, B, K, S, H) is the one attention reads: each layer's (B, K, S, H) block is a
contiguous slice whose last two axes are the operands of the score and value products. A loop that
runs the model many times on one cache (the decode loop) carries it `per_layer`, as L separate
arrays: a step then writes its token into each layer's array in place and the products read the
array as it is, where a slice of the stacked cache would be copied out first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from alpamayo_jax.sharding import KV_CACHE_AXES, constrain

# Logical axes of the cache's slot mask (B, S), and of one layer's keys or values held per layer
# (B * K, S, H).
KV_MASK_AXES = ("batch", "cache_length")
KV_LAYER_AXES = (KV_CACHE_AXES[1:3], *KV_CACHE_AXES[3:])


@struct.dataclass
class KVCache:
    """Keys (after k_norm and rotary) and values of every layer, filled up to `length`.

    All rows share one length: prompts of one batch have one (left-padded) length, and rows that
    finished generating keep being fed padding, as in the reference. `mask` says which filled
    slots hold real tokens: left padding is written but never attended to. Under a mesh
    (`jax.set_mesh`), rows are split over `data` and key/value heads over `model`
    (`alpamayo_jax.sharding.KV_CACHE_AXES`).
    """

    k: jax.Array  # (L, B, K, S, H), or a tuple of L (B * K, S, H) (`per_layer`)
    v: jax.Array  # (L, B, K, S, H), or a tuple of L (B * K, S, H)
    mask: jax.Array  # (B, S) bool: the slot holds a token that may be attended to
    length: jax.Array  # () int32: number of filled slots

    @classmethod
    def empty(cls, *, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> KVCache:
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), mask=jnp.zeros((batch, capacity), bool),
                   length=jnp.zeros((), jnp.int32)).constrained()

    @property
    def is_per_layer(self) -> bool:
        return isinstance(self.k, tuple)

    def per_layer(self) -> KVCache:
        """The same cache with `k` and `v` as tuples of L (B * K, S, H) arrays, rows and key/value
        heads merged into one axis, the batch axis of the attention products (unchanged if it is
        already per layer). For a loop that writes into and reads the cache at every step (see the
        module). Kept as (B, K, S, H), each layer's array would be reshaped on its way into the
        products, and XLA's CPU compiler then made a second copy of each write, for the products."""
        if self.is_per_layer:
            return self
        _, batch, num_heads, capacity, head_dim = self.k.shape

        def split(stacked):
            return tuple(layer.reshape(batch * num_heads, capacity, head_dim) for layer in stacked)

        return self.replace(k=split(self.k), v=split(self.v)).constrained()

    def stacked(self) -> KVCache:
        """The same cache with `k` and `v` as (L, B, K, S, H) arrays (unchanged if it is already),
        pinned to the mesh (`constrained`)."""
        if not self.is_per_layer:
            return self
        batch = self.mask.shape[0]

        def stack(layers):
            return jnp.stack([layer.reshape(batch, -1, *layer.shape[1:]) for layer in layers])

        return self.replace(k=stack(self.k), v=stack(self.v)).constrained()

    def constrained(self) -> KVCache:
        """The cache pinned to its placement on the current mesh (unchanged without one); held per
        layer, its merged (B * K) axis split over both of their mesh axes."""
        if self.is_per_layer:
            def pinned(parts, name):
                return tuple(constrain(part, KV_LAYER_AXES, name=f"KV cache {name}, layer {index}")
                             for index, part in enumerate(parts))

            return self.replace(k=pinned(self.k, "keys"), v=pinned(self.v, "values"),
                                mask=constrain(self.mask, KV_MASK_AXES, name="KV cache mask"))
        return self.replace(k=constrain(self.k, KV_CACHE_AXES, name="KV cache keys"),
                            v=constrain(self.v, KV_CACHE_AXES, name="KV cache values"),
                            mask=constrain(self.mask, KV_MASK_AXES, name="KV cache mask"))

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def check_room(self, num_new: int) -> None:
        """Raises if `num_new` more tokens would not fit. Writing past `capacity` would be clamped
        silently by XLA, so only a concrete length is checked; inside jit the caller sizes the
        cache (generation allocates prompt + max_new_tokens)."""
        if not isinstance(self.length, jax.core.Tracer) and int(self.length) + num_new > self.capacity:
            raise ValueError(
                f"KV cache overflow: {int(self.length)} + {num_new} tokens > capacity {self.capacity}"
            )

    def new_tokens_mask(self, mask_new: jax.Array) -> jax.Array:
        """(B, T, S) bool: the slots each of T new tokens at `length` may attend to once they are
        written (the cache's attendable tokens, then the new ones causally); `mask_new` (B, T)
        bool marks which new tokens may be attended to at all."""
        num_new = mask_new.shape[1]
        slots = self._marked(mask_new)[:, None, :]  # (B, 1, S)
        last_visible = self.length + jnp.arange(num_new)  # (T,)
        return slots & (jnp.arange(self.capacity)[None, :] <= last_visible[:, None])[None]

    def written(self, k, v, mask_new: jax.Array) -> KVCache:
        """The cache after T new tokens were written at `length` into `k`, `v` (either form, as a
        cached `TextDecoder` forward returns them): their slots marked by `mask_new` (B, T) bool,
        `length` advanced by T."""
        length = self.length + mask_new.shape[1]
        return KVCache(k=k, v=v, mask=self._marked(mask_new), length=length).constrained()

    def append(self, k_new: jax.Array, v_new: jax.Array, mask_new: jax.Array | None = None) -> KVCache:
        """Writes (L, B, K, T, H) new keys/values at `length` (into either form) and advances it by
        T; `mask_new` (B, T) bool marks which of them may be attended to (default: all). Raises on
        a concrete overflow (`check_room`)."""
        _, batch, num_heads, num_new, head_dim = k_new.shape
        self.check_room(num_new)
        if mask_new is None:
            mask_new = jnp.ones((batch, num_new), bool)
        if self.is_per_layer:
            def written(parts, new):
                rows = new.reshape(-1, batch * num_heads, num_new, head_dim)  # (L, B * K, T, H)
                return tuple(jax.lax.dynamic_update_slice(part, layer.astype(part.dtype), (0, self.length, 0))
                             for part, layer in zip(parts, rows, strict=True))
        else:
            def written(stacked, new):
                start = (0, 0, 0, self.length, 0)
                return jax.lax.dynamic_update_slice(stacked, new.astype(stacked.dtype), start)
        return self.written(written(self.k, k_new), written(self.v, v_new), mask_new)

    def _marked(self, mask_new: jax.Array) -> jax.Array:
        """(B, S) bool: the slot mask with `mask_new` (B, T) written at `length`."""
        return jax.lax.dynamic_update_slice(self.mask, mask_new.astype(bool), (0, self.length))
