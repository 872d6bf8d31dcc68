"""The whole pipeline: cameras + ego history in, Chain-of-Causation text and trajectories out.

    clips -> ModelInputs (host: prompt, pixels, positions) -> prefill + decode (one jitted
        while_loop) -> flow matching on the cache (one jitted lax.scan) -> unicycle rollout

`Pipeline` bundles what inference needs (the model split once, config, tokenizer, chat template);
`sample_trajectories` runs it on clips, `sample_from_inputs` on prepared `ModelInputs`; an
`InferenceConfig` says how (defaults from the checkpoint).

After the inputs are prepared, a run is four compiled programs (prefill, decode loop, flow
matching, rollout) and nothing outside them: the run key is split, and the noise drawn, inside
the decode and flow programs (docs/compilation.md).

Shapes: C clips, S samples per clip, W waypoints (64), L prompt length, H history poses (16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from alpamayo_jax.action.unicycle import action_to_traj
from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.inference.flow_matching import euler_sample, initial_noise
from alpamayo_jax.inference.generation import GenerationResult, generate
from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.io.bundle import PROCESSOR_DIR, is_bundle
from alpamayo_jax.io.load import load_model
from alpamayo_jax.models.alpamayo import AlpamayoR1
from alpamayo_jax.nn.module_jit import SplitModule, module_jit
from alpamayo_jax.processing.chat_template import load_chat_template
from alpamayo_jax.processing.clip import Clip
from alpamayo_jax.processing.model_inputs import ModelInputs, prepare_inputs
from alpamayo_jax.processing.tokenizer import ExtendedTokenizer, build_tokenizer, extract_cot, load_tokenizer
from alpamayo_jax.sharding import constrain, sharding_for, to_host


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Everything inference needs, loaded from local files only. With a `mesh`, the parameters
    live in their shardings on it and every run is placed by `alpamayo_jax.sharding`'s table:
    batch rows over `data` (data parallel over clips and samples), heads, feed-forward widths and
    the vocabulary over `model` (tensor parallel).

    `split` is the model split once into graph definition and arrays (`SplitModule`): the jitted
    stages take it, so no call walks the module graph again. The pipeline is immutable: a model
    whose parameters change (training) needs a new pipeline (`Pipeline.from_model`)."""

    model: AlpamayoR1
    split: SplitModule[AlpamayoR1]
    config: AlpamayoConfig
    tokenizer: ExtendedTokenizer
    chat_template: str
    mesh: jax.sharding.Mesh | None = None

    @classmethod
    def from_model(cls, model: AlpamayoR1, tokenizer: ExtendedTokenizer, chat_template: str,
                   mesh: jax.sharding.Mesh | None = None) -> Pipeline:
        return cls(model, SplitModule.of(model), model.config, tokenizer, chat_template, mesh)

    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype=None, processor_dir: str | os.PathLike | None = None,
             mesh: jax.sharding.Mesh | None = None) -> Pipeline:
        """From a converted bundle (its `processor/`), or from a Hugging Face checkpoint directory
        plus `processor_dir` (tokenizer, chat template; the tokenizer is extended here). With
        `mesh` (`alpamayo_jax.sharding.make_mesh`), parameters are loaded straight into their
        shardings and runs are placed on it."""
        model, config = load_model(path, dtype=dtype, processor_dir=processor_dir, mesh=mesh)
        if is_bundle(path):
            processor = Path(path) / PROCESSOR_DIR
            tokenizer = load_tokenizer(processor, config)
        elif processor_dir is None:
            raise ValueError(f"{path} is a Hugging Face checkpoint: pass processor_dir (tokenizer, chat template)")
        else:
            processor = Path(processor_dir)
            tokenizer = build_tokenizer(processor, config)
        return cls.from_model(model, tokenizer, load_chat_template(processor), mesh)

    def on_mesh(self) -> contextlib.AbstractContextManager:
        """The context runs happen in: `jax.set_mesh(self.mesh)`, or nothing without a mesh."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def prepare(self, clips: Clip | Sequence[Clip]) -> ModelInputs:
        """The model inputs of one clip or several (equal image sizes)."""
        clips = [clips] if isinstance(clips, Clip) else list(clips)
        return prepare_inputs(clips, tokenizer=self.tokenizer, chat_template=self.chat_template, config=self.config)


@dataclasses.dataclass(frozen=True)
class TrajectorySamples:
    """Per clip and sample: the trajectory in the t0 ego frame, the actions, the generated tokens
    and the Chain-of-Causation text."""

    xyz: np.ndarray  # (C, S, W, 3) metres
    rotation: np.ndarray  # (C, S, W, 3, 3) yaw-only rotations
    actions: np.ndarray  # (C, S, W, 2) normalised (acceleration, curvature)
    generated_token_ids: list[list[list[int]]]  # C x S generated ids, as the loop appended them
    num_generated_tokens: np.ndarray  # (C, S) tokens each sample generated itself (through its
    #                                    EOS; the padding a finished row is fed is not counted)
    cot: list[list[str]]  # C x S Chain-of-Causation texts
    timings: dict[str, float]  # seconds per stage (host wall clock, results ready)


def _split_run_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(generation key, noise key) of a run's key: `jax.random.split` of one key, or of each of
    (C,) per-clip keys. Traced inside the compiled stages (no PRNG op runs on its own)."""
    if key.ndim == 0:
        generation_key, noise_key = jax.random.split(key)
    else:
        generation_key, noise_key = jax.vmap(jax.random.split, out_axes=1)(key)
    return generation_key, noise_key


def _generation_key(key: jax.Array) -> jax.Array:
    return _split_run_key(key)[0]


def _draw_noise(key: jax.Array, rows: int, waypoints: int) -> jax.Array:
    """(rows, W, 2) initial flow noise from the run's key: one draw for the batch, or with (C,)
    per-clip keys one draw of rows / C samples per clip (clip-major)."""
    noise_key = _split_run_key(key)[1]
    if key.ndim == 0:
        return initial_noise(noise_key, rows, waypoints)
    per_clip = jax.vmap(lambda k: initial_noise(k, rows // key.shape[0], waypoints))(noise_key)
    return per_clip.reshape(rows, waypoints, -1)


def _denoise_fn(model: AlpamayoR1, result: GenerationResult, key: jax.Array, noise: jax.Array | None, *,
                num_steps: int) -> jax.Array:
    """Flow matching on the rollout's cache: the expert's view of it, the initial noise (drawn
    here from the run's key when `noise` is None) and the Euler steps, in one program."""
    waypoints = model.config.n_waypoints
    if noise is None:
        noise = _draw_noise(key, result.tokens.shape[0], waypoints)
    noise = constrain(noise, ("batch", None, None), name="flow noise")
    context = result.expert_context(waypoints).per_layer()
    return euler_sample(lambda x, t: model.action_velocity(x, t, context), noise, num_steps).actions


def _rollout_fn(model: AlpamayoR1, actions, hist_xyz, hist_rot) -> tuple[jax.Array, jax.Array]:
    return action_to_traj(actions, hist_xyz, hist_rot, model.config.action_space, model.action_space.stats())


denoise = module_jit(_denoise_fn, static_argnames=("num_steps",))
rollout = module_jit(_rollout_fn)


def _timed(timings: dict, stage: str, start: float) -> float:
    now = time.perf_counter()
    timings[stage] = round(now - start, 4)
    return now


def check_noise(noise, rows: int, waypoints: int) -> np.ndarray:
    """Initial flow noise as float32 (rows, waypoints, 2); raises ValueError naming the problem."""
    array = np.asarray(noise)
    if array.dtype.kind != "f":
        raise ValueError(f"noise must hold floating-point values, got dtype {array.dtype}")
    if array.shape != (rows, waypoints, 2):
        raise ValueError(f"noise must be ({rows}, {waypoints}, 2) = (clips * num_samples, waypoints, 2), "
                         f"got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("noise holds non-finite values")
    return array.astype(np.float32)


def sample_from_inputs(
    pipeline: Pipeline,
    inputs: ModelInputs,
    key: jax.Array,
    settings: InferenceConfig | None = None,
    *,
    noise=None,  # (C * S, W, 2) float initial flow noise; drawn from `key` if None
) -> TrajectorySamples:
    """Reasoning rollout, flow matching and rollout on prepared inputs (`Pipeline.prepare`).

    `settings` default to `InferenceConfig.from_model(pipeline.config)`: the checkpoint's flow
    steps and token budget, the reference's sampling. The same key gives the same result, with or
    without a mesh. `key` is one PRNG key for the batch, or a (C,) array of keys, one per clip,
    so that a clip's tokens and noise depend on its own key only (not on its batch; float rounding
    aside). For a single clip the two are one (`generate`): its one key is its clip's key, so a
    clip run alone with key k gives what it gives in any batch of per-clip keys where its key is k
    (the server batches requests this way). Rows are clip-major (row = clip * S + sample), which is also the order of
    `noise`. On a mesh the C * S rows must divide over its data axis (`ShardingError` otherwise)."""
    config = pipeline.config
    settings = InferenceConfig.from_model(config) if settings is None else settings
    timings: dict[str, float] = {}
    start = time.perf_counter()
    clips, waypoints, num_samples = inputs.num_clips, config.n_waypoints, settings.num_samples
    rows = clips * num_samples
    if key.ndim not in (0, 1) or (key.ndim == 1 and key.shape != (clips,)):
        raise ValueError(f"key must be one PRNG key or ({clips},) keys, one per clip; got shape {key.shape}")
    noise = None if noise is None else check_noise(noise, rows, waypoints)
    if pipeline.mesh is not None:  # before anything compiles
        sharding_for(pipeline.mesh, (rows,), ("batch",), name=f"rows (clips x samples = {clips} x {num_samples})")
    generation_config = settings.generation_config(config, pad_token_id=pipeline.tokenizer.pad_token_id)
    with pipeline.on_mesh():
        result = generate(pipeline.split, inputs, config=generation_config, key=key, num_samples=num_samples,
                          derive_key=_generation_key)
        num_steps = int(result.num_steps)  # the one host sync of the rollout, after the loop
        start = _timed(timings, "generate", start)

        actions = denoise(pipeline.split, result, key, noise, num_steps=settings.num_flow_steps)
        actions.block_until_ready()
        start = _timed(timings, "flow_matching", start)

        xyz, rotation = rollout(pipeline.split, actions, np.repeat(inputs.ego_history_xyz, num_samples, axis=0),
                                np.repeat(inputs.ego_history_rot, num_samples, axis=0))
        xyz, rotation, actions = to_host(xyz), to_host(rotation), to_host(actions)
        start = _timed(timings, "rollout", start)

        raw = to_host(result.raw_tokens)[:, :num_steps]
        cot = extract_cot(pipeline.tokenizer, result.sequences(inputs.input_ids))
    _timed(timings, "decode_text", start)

    def per_clip(array):
        return array.reshape(clips, num_samples, *array.shape[1:])

    return TrajectorySamples(
        xyz=per_clip(xyz),
        rotation=per_clip(rotation),
        actions=per_clip(actions),
        generated_token_ids=[[raw[c * num_samples + s].tolist() for s in range(num_samples)] for c in range(clips)],
        num_generated_tokens=per_clip(own_token_counts(raw, generation_config.eos_token_id)),
        cot=[[cot[c * num_samples + s] for s in range(num_samples)] for c in range(clips)],
        timings=timings,
    )


def own_token_counts(raw_tokens: np.ndarray, eos_token_id: int) -> np.ndarray:
    """(B,) tokens each row generated itself: through its first EOS, else all of them (a row that
    emitted EOS is fed padding while the others run on)."""
    is_eos = raw_tokens == eos_token_id
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, raw_tokens.shape[1]).astype(np.int64)


def sample_trajectories(pipeline: Pipeline, clips: Clip | Sequence[Clip], key: jax.Array,
                        settings: InferenceConfig | None = None, *, noise=None) -> TrajectorySamples:
    """Runs the model on one `Clip` or a sequence of clips (`alpamayo_jax.processing.clip`);
    `settings` and `noise` as in `sample_from_inputs`. The results keep a clip axis even for a
    single clip."""
    start = time.perf_counter()
    inputs = pipeline.prepare(clips)
    prepare_seconds = round(time.perf_counter() - start, 4)
    samples = sample_from_inputs(pipeline, inputs, key, settings, noise=noise)
    return dataclasses.replace(samples, timings={"prepare_inputs": prepare_seconds, **samples.timings})
