"""Autoregressive reasoning rollout of the Qwen3-VL backbone, as the reference runs it.

`generate` = one multimodal prefill, then one jitted `jax.lax.while_loop` over fixed-size buffers.
It reproduces NVIDIA's rollout (Hugging Face `generate` with the `ExpertLogitsProcessor` and the
`StopAfterEOS` criterion) step for step:

* logits of the last position in float32 -> trajectory tokens set to -inf -> (sampling only)
  temperature, top-k, top-p -> categorical draw, or argmax (`alpamayo_jax.inference.sampling`);
* a row that has produced EOS (`<|im_end|>`) is given the pad token from then on;
* generation ends after `max_new_tokens` tokens, or when every row has produced EOS, or one step
  after every row has produced the stop token (`<|traj_future_start|>`): the reference's
  `StopAfterEOS` only reports "stop" on the call after the one where its last row saw the token;
* the last generated token is never fed back, so the cache holds prompt + generated - 1 tokens,
  `<|traj_future_start|>` included when the extra step happened.

Decode positions: the token at absolute sequence index j gets j + rope_delta on all three MRoPE
axes (j is the cache length when it is fed).

`num_samples` rows per clip are laid out clip-major (row = clip * num_samples + sample), like the
reference's `repeat_interleave`. The prompt is prefilled once per clip and its keys and values are
repeated; the reference repeats prompt and images before the prefill instead (so its vision tower
and prefill run once per row). Both give the same cache, logits and tokens (tested); only the work
differs.

Shapes: B rows (clips x samples), C clips, L prompt length, N max_new_tokens, V vocabulary,
S cache capacity (L + N - 1), P image patches, F flattened patch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from alpamayo_jax.inference.sampling import (
    REFERENCE_SAMPLING,
    SamplingParams,
    fold_in_step,
    mask_token_range,
    row_keys,
    seed_key,
    select_tokens,
)
from alpamayo_jax.models.alpamayo import AlpamayoR1
from alpamayo_jax.models.expert import ExpertContext, expert_context
from alpamayo_jax.models.kv_cache import KVCache
from alpamayo_jax.nn.module_jit import SplitModule, module_jit
from alpamayo_jax.processing.model_inputs import ModelInputs
from alpamayo_jax.sharding import constrain, to_host

# (tokens (B, 1) int32, position_ids (3, B, 1) int32, cache) -> (logits (B, V) float32, cache)
StepFn = Callable[[jax.Array, jax.Array, KVCache], tuple[jax.Array, KVCache]]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Everything that shapes the rollout; hashable (a static argument under `jax.jit`).

    max_new_tokens: N, the size of the token buffers and the hard stop.
    eos_token_id: a row that emits it is fed `pad_token_id` afterwards (`<|im_end|>`).
    pad_token_id: `<|endoftext|>` (the configs carry no pad id, so it is explicit here).
    stop_after_token_id: `<|traj_future_start|>`: stop one step after every row has emitted it;
        also defines `offsets` and the padding of `GenerationResult.tokens`. None disables both.
    mask_start, mask_size: the id range set to -inf before selection (the trajectory tokens).
    sampling: temperature / top-k / top-p / greedy.
    return_logits: keep the masked float32 logits of every step (B, N, V).
    """

    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    stop_after_token_id: int | None
    mask_start: int
    mask_size: int
    sampling: SamplingParams = REFERENCE_SAMPLING
    return_logits: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.mask_size < 0:
            raise ValueError(f"mask_size must be >= 0, got {self.mask_size}")

    @classmethod
    def for_alpamayo(
        cls,
        config,  # AlpamayoConfig
        *,
        pad_token_id: int,
        max_new_tokens: int | None = None,
        sampling: SamplingParams = REFERENCE_SAMPLING,
        return_logits: bool = False,
    ) -> GenerationConfig:
        """The reference rollout's settings for an `AlpamayoConfig`: EOS from the text config,
        stop after `<|traj_future_start|>`, mask the trajectory tokens; `max_new_tokens`
        defaults to `tokens_per_future_traj` (the reference's `max_generation_length` default).
        The default sampling is the reference's (temperature 0.6, top-p 0.98, no top-k).

        `pad_token_id` is `<|endoftext|>`: 151643 for the 10B model, 480 for the tiny fixture."""
        if config.text.eos_token_id is None:
            raise ValueError("the text config has no eos_token_id")
        return cls(
            max_new_tokens=config.tokens_per_future_traj if max_new_tokens is None else max_new_tokens,
            eos_token_id=config.text.eos_token_id,
            pad_token_id=pad_token_id,
            stop_after_token_id=config.traj_token_ids.future_start,
            mask_start=config.traj_token_start_idx,
            mask_size=config.traj_vocab_size,
            sampling=sampling,
            return_logits=return_logits,
        )


@struct.dataclass
class DecodeState:
    """The while-loop carry. `step` tokens have been generated; the last of them is not yet in
    the cache (it is fed at the start of the next iteration, if there is one)."""

    step: jax.Array  # () int32
    tokens: jax.Array  # (B, N) int32, as appended by the reference (pad after EOS, and beyond step)
    logits: jax.Array | None  # (B, N, V) float32 masked logits per step, or None
    cache: KVCache  # per layer (`KVCache.per_layer`); length = prompt + step - 1 (once step >= 1)
    unfinished: jax.Array  # (B,) bool: not yet stopped (EOS, max length, stop-after rule)
    saw_stop_token: jax.Array  # (B,) bool: `StopAfterEOS`'s per-row flags
    rope_deltas: jax.Array  # (B,) int32
    key: jax.Array  # PRNG key, or (B,) keys one per row; step s draws with fold_in(key, s)


@struct.dataclass
class GenerationResult:
    """What a rollout leaves for the expert and for inspection.

    Only the first `num_steps` columns of `tokens`, `raw_tokens` and `logits` were generated; the
    rest hold the pad token (tokens) or zeros (logits).
    """

    tokens: jax.Array  # (B, N) int32: after the reference's `replace_padding_after_eos`: pad
    #                     after the first stop token (`gen.sequences[:, L:]`)
    raw_tokens: jax.Array  # (B, N) int32: as generate appended them (`gen.sequences_raw[:, L:]`)
    num_steps: jax.Array  # () int32: generated tokens per row (equal for all rows)
    cache: KVCache  # (L, B, K, S, H); length = prompt_length + num_steps - 1
    offsets: jax.Array  # (B,) int32: index of the first stop token in the full sequence + 1,
    #                      or prompt_length + num_steps (the full length) without one
    has_stop_token: jax.Array  # (B,) bool: the row contains the stop token
    rope_deltas: jax.Array  # (B,) int32
    prompt_length: jax.Array  # () int32
    logits: jax.Array | None  # (B, N, V) float32 with the masked ids at -inf, or None

    def expert_context(self, num_tokens: int) -> ExpertContext:
        """The action expert's view of this rollout's cache for `num_tokens` action tokens."""
        return expert_context(self.cache, self.offsets, self.rope_deltas, num_tokens)

    def sequences(self, prompt_ids, raw: bool = False) -> np.ndarray:
        """Host-side full sequences (B, L + num_steps) like the reference's `sequences` (or
        `sequences_raw` with raw=True); `prompt_ids` (C, L) are repeated to the B rows."""
        prompt_ids = np.asarray(prompt_ids)
        rows = self.tokens.shape[0]
        if rows % prompt_ids.shape[0]:
            raise ValueError(f"{prompt_ids.shape[0]} prompts do not divide {rows} rows")
        prompts = np.repeat(prompt_ids, rows // prompt_ids.shape[0], axis=0)
        generated = to_host(self.raw_tokens if raw else self.tokens)[:, : int(self.num_steps)]
        return np.concatenate([prompts, generated.astype(prompts.dtype)], axis=1)


# ---------------------------------------------------------------------------------------------
# The loop (model-agnostic: any step function over a KVCache)
# ---------------------------------------------------------------------------------------------


def _append_token(state: DecodeState, logits: jax.Array, config: GenerationConfig) -> DecodeState:
    """One reference step after the forward: select, pad finished rows, append, stopping criteria."""
    logits = mask_token_range(logits.astype(jnp.float32), config.mask_start, config.mask_size)
    step = state.step
    stored = state.logits
    if stored is not None:
        stored = jax.lax.dynamic_update_slice(stored, logits[:, None], (0, step, 0))
    chosen = select_tokens(logits, fold_in_step(state.key, step), config.sampling)
    token = jnp.where(state.unfinished, chosen, config.pad_token_id).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, step))
    step = step + 1
    # transformers evaluates every criterion on the appended token and ANDs "not done" in.
    done = (token == config.eos_token_id) | (step >= config.max_new_tokens)
    saw = state.saw_stop_token
    if config.stop_after_token_id is not None:
        done = done | jnp.all(saw)  # StopAfterEOS: all rows had it before this token
        saw = saw | (token == config.stop_after_token_id)
    return state.replace(step=step, tokens=tokens, logits=stored, unfinished=state.unfinished & ~done,
                         saw_stop_token=saw)


def _finish(state: DecodeState, config: GenerationConfig, prompt_stop_index: jax.Array | None
            ) -> GenerationResult:
    num_new = config.max_new_tokens
    prompt_length = state.cache.length - (state.step - 1)
    columns = jnp.arange(num_new)
    raw = state.tokens
    past_the_end = prompt_length + num_new  # "no stop token": nothing gets padded
    if config.stop_after_token_id is None:
        has_stop = jnp.zeros(raw.shape[0], bool)
        first_stop = jnp.broadcast_to(past_the_end, raw.shape[:1])
    else:
        is_stop = (raw == config.stop_after_token_id) & (columns < state.step)
        has_stop = is_stop.any(axis=1)
        first_stop = jnp.where(has_stop, prompt_length + jnp.argmax(is_stop, axis=1), past_the_end)
        if prompt_stop_index is not None:  # the reference searches the whole sequence
            in_prompt = prompt_stop_index >= 0
            first_stop = jnp.where(in_prompt, prompt_stop_index, first_stop)
            has_stop = has_stop | in_prompt
    offsets = jnp.where(has_stop, first_stop + 1, prompt_length + state.step).astype(jnp.int32)
    after_stop = prompt_length + columns[None, :] > first_stop[:, None]
    tokens = jnp.where(after_stop, config.pad_token_id, raw).astype(jnp.int32)
    return GenerationResult(tokens=tokens, raw_tokens=raw, num_steps=state.step, cache=state.cache.stacked(),
                            offsets=offsets, has_stop_token=has_stop, rope_deltas=state.rope_deltas,
                            prompt_length=prompt_length, logits=state.logits)


def decode(
    step_fn: StepFn,
    cache: KVCache,  # prompt already in it; capacity >= prompt + max_new_tokens - 1
    first_logits: jax.Array,  # (B, V) logits of the last prompt position
    rope_deltas: jax.Array,  # (B,) int
    key: jax.Array,  # PRNG key (ignored by greedy decoding)
    *,
    config: GenerationConfig,
    prompt_stop_index: jax.Array | None = None,  # (B,) int: first stop token in the prompt, or -1
) -> GenerationResult:
    """The decode loop after a prefill, as one `lax.while_loop`; pure and jittable.

    The cache must have room for max_new_tokens - 1 more tokens (inside jit an overflowing write
    would be clamped silently); `generate` allocates exactly prompt + max_new_tokens - 1.

    `step_fn(tokens (B, 1), position_ids (3, B, 1), cache) -> (logits (B, V), cache)` runs the
    language model on one token per row. It is traced once, whatever the number of steps.
    """
    batch = first_logits.shape[0]
    if rope_deltas.shape != (batch,):
        raise ValueError(f"rope_deltas must be ({batch},), got {rope_deltas.shape}")
    vocab = first_logits.shape[-1]
    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((batch, config.max_new_tokens), config.pad_token_id, jnp.int32),
        logits=(jnp.zeros((batch, config.max_new_tokens, vocab), jnp.float32)
                if config.return_logits else None),
        cache=cache.per_layer(),  # the loop writes and reads each layer's arrays in place
        unfinished=jnp.ones((batch,), bool),
        saw_stop_token=jnp.zeros((batch,), bool),
        rope_deltas=rope_deltas.astype(jnp.int32),
        key=key,
    )
    state = _append_token(state, first_logits, config)

    def feed_and_append(state: DecodeState) -> DecodeState:
        last = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)  # (B, 1)
        positions = state.cache.length + state.rope_deltas  # absolute index + rope delta
        position_ids = jnp.broadcast_to(positions[None, :, None], (3, batch, 1)).astype(jnp.int32)
        logits, cache = step_fn(last, position_ids, state.cache)
        return _append_token(state.replace(cache=cache), logits, config)

    state = jax.lax.while_loop(lambda s: jnp.any(s.unfinished), feed_and_append, state)
    return _finish(state, config, prompt_stop_index)


# ---------------------------------------------------------------------------------------------
# Qwen3-VL prefill + decode
# ---------------------------------------------------------------------------------------------


def _language_model_step(vlm) -> StepFn:
    def step(tokens, position_ids, cache):
        out = vlm(tokens, position_ids=position_ids, cache=cache, num_logits=1)
        return out.logits[:, -1].astype(jnp.float32), out.cache

    return step


def _prefill_fn(model: AlpamayoR1, inputs: ModelInputs, *, capacity: int, num_samples: int,
                stop_token_id: int | None) -> tuple[KVCache, jax.Array, jax.Array, jax.Array]:
    """Multimodal prefill of C prompts into a fresh cache of C * num_samples rows. Returns (cache,
    last-position logits (B, V) float32, rope_deltas (B,), first stop token in each prompt or -1
    (B,))."""
    vlm = model.vlm
    # Under a mesh, clips split over `data` when they divide it (else the prefill is replicated and
    # the rows it expands into are split: the cache's placement is strict).
    input_ids = constrain(inputs.input_ids, ("batch", "sequence"), replicate_uneven=True)
    position_ids = constrain(inputs.position_ids, (None, "batch", "sequence"), replicate_uneven=True)
    pixel_values = constrain(inputs.pixel_values, ("image_patches", None), replicate_uneven=True)
    attention_mask = constrain(inputs.attention_mask, ("batch", "sequence"), replicate_uneven=True)
    out = vlm(input_ids, pixel_values=pixel_values, image_grid_thw=inputs.image_grid,
              position_ids=position_ids, attention_mask=attention_mask, num_logits=1)
    if stop_token_id is None:
        prompt_stop_index = jnp.full(input_ids.shape[:1], -1, jnp.int32)
    else:  # the reference searches the whole sequence, prompt included
        is_stop = input_ids == stop_token_id
        prompt_stop_index = jnp.where(is_stop.any(axis=1), jnp.argmax(is_stop, axis=1), -1).astype(jnp.int32)
    k, v, logits = out.k, out.v, out.logits[:, -1].astype(jnp.float32)
    rope_deltas = inputs.rope_deltas
    if num_samples > 1:  # rows clip-major, like repeat_interleave
        k, v = jnp.repeat(k, num_samples, axis=1), jnp.repeat(v, num_samples, axis=1)
        logits, rope_deltas = jnp.repeat(logits, num_samples, axis=0), jnp.repeat(rope_deltas, num_samples)
        prompt_stop_index = jnp.repeat(prompt_stop_index, num_samples)
        attention_mask = jnp.repeat(attention_mask, num_samples, axis=0)
    cache = vlm.init_cache(logits.shape[0], capacity).append(k, v, attention_mask)
    return cache, logits, rope_deltas.astype(jnp.int32), prompt_stop_index


def _decode_fn(model: AlpamayoR1, cache, first_logits, rope_deltas, key, prompt_stop_index, *,
               config: GenerationConfig, derive_key: Callable[[jax.Array], jax.Array] | None = None,
               samples_per_key: int | None = None) -> GenerationResult:
    """The decode loop; the rollout's keys are made inside the program: `derive_key(key)`, expanded
    to one key per row with `samples_per_key`."""
    key = key if derive_key is None else derive_key(key)
    key = key if samples_per_key is None else row_keys(key.reshape(-1), samples_per_key)  # () -> (1,)
    return decode(_language_model_step(model.vlm), cache, first_logits, rope_deltas, key, config=config,
                  prompt_stop_index=prompt_stop_index)


prefill = module_jit(_prefill_fn, static_argnames=("capacity", "num_samples", "stop_token_id"))
decode_rollout = module_jit(_decode_fn, static_argnames=("config", "derive_key", "samples_per_key"),
                            donate_argnames=("cache",))


def cache_capacity(prompt_length: int, max_new_tokens: int) -> int:
    """The KV cache slots of a rollout (`prefill`'s capacity): the prompt and every generated token
    but the last, which is never fed back."""
    return prompt_length + max_new_tokens - 1


def generate(
    model: SplitModule[AlpamayoR1],
    inputs: ModelInputs,
    *,
    config: GenerationConfig,
    key: jax.Array | None = None,  # PRNG key, or (C,) keys one per clip; required when sampling
    num_samples: int = 1,
    derive_key: Callable[[jax.Array], jax.Array] | None = None,
) -> GenerationResult:
    """Prefill then decode `num_samples` rollouts per clip; returns B = C * num_samples rows
    (clip-major: row = clip * num_samples + sample).

    One key draws for the whole batch. A (C,) array of keys gives each clip its own: row
    (c, s) then draws from fold_in(key[c], s) (`row_keys`), so a clip's result does not depend on
    the clips it is batched with. For one clip the two agree: its one key is its clip's key. `derive_key`, a module-level function that keeps the key's
    shape (static: part of the compiled program), is applied to `key` first, inside the decode
    program (the pipeline splits its run key there, so that no PRNG op runs on its own).

    Two compiled programs: the prefill (per input shapes and image grid, capacity, num_samples)
    and the decode loop (per row count, capacity, config, key layout); both are reused across
    calls, and with a key nothing runs outside them. The same key gives the same result; greedy
    decoding ignores it (without one it gets `jax.random.key(0)`).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if config.sampling.do_sample and key is None:
        raise ValueError("sampling needs a PRNG key")
    if key is None:  # greedy without a key: any key serves, and the program is the one a key gets
        key, derive_key = seed_key(0), None
    if key.ndim == 1 and key.shape != (inputs.num_clips,):
        raise ValueError(f"one key per clip: expected ({inputs.num_clips},) keys, got {key.shape}")
    if key.ndim > 1:
        raise ValueError(f"key must be one PRNG key or (clips,) keys, got shape {key.shape}")
    # Per-clip keys, or one clip (its key is its clip's key): one key per row.
    samples_per_key = num_samples if key.ndim == 1 or inputs.num_clips == 1 else None
    capacity = cache_capacity(inputs.prompt_length, config.max_new_tokens)
    cache, first_logits, rope_deltas, prompt_stop_index = prefill(
        model, inputs, capacity=capacity, num_samples=num_samples, stop_token_id=config.stop_after_token_id)
    return decode_rollout(model, cache, first_logits, rope_deltas, key, prompt_stop_index, config=config,
                          derive_key=derive_key, samples_per_key=samples_per_key)
