"""Next-token selection: pure, static-shape functions on float32 logits.

The pipeline reproduces the reference rollout (Hugging Face `generate` with NVIDIA's
`ExpertLogitsProcessor`):

1. the trajectory-token mask: ids [traj_token_start_idx, traj_token_start_idx + traj_vocab_size)
   set to -inf (the reference does this in place, so the logits it returns carry the -inf);
2. sampling only: temperature (divide), then top-k, then top-p, each filtering to -inf exactly as
   transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper` do;
3. a categorical draw from the PRNG key (sampling), or the first argmax (greedy).

Sampling settings are plain Python numbers held in a frozen, hashable `SamplingParams`, so they are
static under `jax.jit` and thresholds such as `1 - top_p` are formed in double precision on the host
and compared in float32, as PyTorch compares a float32 tensor with a Python float.

Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a token is chosen from the (masked) logits. Hashable: pass it as a static argument.

    do_sample: categorical sampling when true, argmax when false (the warpers below are then not
        applied, as in transformers: they never change the argmax).
    temperature: strictly positive divisor of the logits (1.0 leaves them unchanged).
    top_k: keep the k largest logits (ties with the k-th included); None or 0 disables it.
    top_p: keep the smallest high-probability set whose mass exceeds top_p (nucleus); None or
        >= 1 disables it.
    min_tokens_to_keep: top-k / top-p never keep fewer tokens than this.
    """

    do_sample: bool = True
    temperature: float = 0.6
    top_k: int | None = None
    top_p: float | None = 0.98
    min_tokens_to_keep: int = 1

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; "
                             f"use do_sample=False for greedy decoding")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {self.top_k}")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1] or None, got {self.top_p}")
        if self.min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be >= 1, got {self.min_tokens_to_keep}")

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(do_sample=False, temperature=1.0, top_k=None, top_p=None)


REFERENCE_SAMPLING = SamplingParams()  # the reference rollout: temperature 0.6, top-p 0.98, no top-k
GREEDY = SamplingParams.greedy()


def mask_token_range(logits: jax.Array, start: int, size: int) -> jax.Array:
    """(B, V) -> (B, V) with ids [start, start + size) set to -inf (the reference's
    `ExpertLogitsProcessor` with start = traj_token_start_idx, size = traj_vocab_size)."""
    ids = jnp.arange(logits.shape[-1])
    return jnp.where((ids >= start) & (ids < start + size), NEG_INF, logits)


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """(B, V) logits divided by `temperature` (a no-op for 1.0, as transformers skips it)."""
    if temperature == 1.0:
        return logits
    return logits / temperature


def top_k_filter(logits: jax.Array, top_k: int, min_tokens_to_keep: int = 1) -> jax.Array:
    """(B, V): logits below the k-th largest of their row set to -inf (ties with it kept)."""
    k = min(max(top_k, min_tokens_to_keep), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, top_p: float, min_tokens_to_keep: int = 1) -> jax.Array:
    """(B, V) nucleus filter: sort each row ascending, take the running sum of the softmax of
    the sorted logits, and set to -inf every token whose running sum is <= 1 - top_p, except the
    `min_tokens_to_keep` largest."""
    order = jnp.argsort(logits, axis=-1)  # ascending; stable
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop_sorted = cumulative <= (1 - top_p)  # threshold in double on the host, compared in f32
    keep_last = jnp.arange(logits.shape[-1]) >= logits.shape[-1] - min_tokens_to_keep
    drop_sorted = drop_sorted & ~keep_last
    rows = jnp.arange(logits.shape[0])[:, None]
    drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)
    return jnp.where(drop, NEG_INF, logits)


def warp_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """(B, V) scores the categorical draw uses: temperature, then top-k, then top-p (the
    transformers order). Identity for greedy params."""
    if not params.do_sample:
        return logits
    scores = apply_temperature(logits, params.temperature)
    if params.top_k:
        scores = top_k_filter(scores, params.top_k, params.min_tokens_to_keep)
    if params.top_p is not None and params.top_p < 1.0:
        scores = top_p_filter(scores, params.top_p, params.min_tokens_to_keep)
    return scores


def select_tokens(logits: jax.Array, key: jax.Array | None, params: SamplingParams) -> jax.Array:
    """(B, V) float32 logits (already masked) -> (B,) int32 token ids.

    Greedy: the first maximum of each row. Sampling: one independent categorical draw per row
    from softmax(warp_logits(logits)), using `key`: one key for the batch, or a (B,) array of keys,
    one per row (a row's draw then depends on its own key only).
    """
    if not params.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sampling needs a PRNG key")
    scores = warp_logits(logits, params)
    if key.ndim == 1:
        return jax.vmap(jax.random.categorical)(key, scores).astype(jnp.int32)
    return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)


def fold_in_step(key: jax.Array, step: jax.Array) -> jax.Array:
    """`fold_in(key, step)` for one key or for each key of a (B,) array."""
    if key.ndim == 1:
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, step)
    return jax.random.fold_in(key, step)


def row_keys(clip_keys: jax.Array, num_samples: int) -> jax.Array:
    """(C,) keys, one per clip -> (C * num_samples,) keys, one per row (clip-major): row
    (c, s) draws with fold_in(clip_keys[c], s), whatever else shares the batch."""
    samples = jnp.arange(num_samples)
    return jax.vmap(lambda key: jax.vmap(lambda s: jax.random.fold_in(key, s))(samples))(clip_keys).reshape(-1)


def seed_key(seed: int) -> jax.Array:
    """`jax.random.key(seed)`, the same key, made on the host: no compiled program (the first
    `jax.random.key` compiles two, the seed's conversion and threefry's seeding). Threefry's key
    of an integer seed is its 64 bits, high word first; with 64-bit types off (JAX's default) the
    seed is cut to its low 32 bits and the high word is 0. Another PRNG implementation or a seed
    offset goes through `jax.random.key`. A seed beyond int64 raises OverflowError, as there."""
    if not _host_seeding():
        return jax.random.key(seed)
    return jax.random.wrap_key_data(np.array(_threefry_words(seed), np.uint32), impl="threefry2x32")


def seed_keys(seeds: Sequence[int]) -> jax.Array:
    """(n,) keys, `seed_key` of each seed, made on the host in one array."""
    if not _host_seeding():
        return jnp.stack([jax.random.key(seed) for seed in seeds])
    words = np.array([_threefry_words(seed) for seed in seeds], np.uint32).reshape(len(seeds), 2)
    return jax.random.wrap_key_data(words, impl="threefry2x32")


def _host_seeding() -> bool:
    return jax.config.jax_default_prng_impl == "threefry2x32" and not jax.config.jax_random_seed_offset


def _threefry_words(seed: int) -> tuple[int, int]:
    bits = int(np.int64(seed)) & 0xFFFF_FFFF_FFFF_FFFF
    return (bits >> 32 if jax.config.jax_enable_x64 else 0), bits & 0xFFFF_FFFF
