"""The whole pipeline: cameras + ego history in, Chain-of-Causation text and trajectories out.

    prompt and pixels (host) -> prefill + decode (one jitted while_loop)
        -> flow matching on the cache (one jitted lax.scan) -> unicycle rollout (lax.scan)

`Pipeline` bundles what inference needs (model, config, tokenizer, chat template);
`sample_trajectories` runs it on clips, `sample_from_inputs` on precomputed model inputs.

Shapes: C clips, S samples per clip, W waypoints (64), L prompt length, H history poses (16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpamayo_jax.action.unicycle import action_to_traj
from alpamayo_jax.config import ActionSpaceConfig, AlpamayoConfig
from alpamayo_jax.inference.flow_matching import DEFAULT_NUM_STEPS, euler_sample, initial_noise
from alpamayo_jax.inference.generation import GenerationConfig, generate
from alpamayo_jax.inference.sampling import SamplingParams
from alpamayo_jax.io.bundle import PROCESSOR_DIR, is_bundle
from alpamayo_jax.io.load import load_model
from alpamayo_jax.models.alpamayo import AlpamayoR1
from alpamayo_jax.models.expert import ExpertContext
from alpamayo_jax.processing.prompt import (
    build_model_inputs,
    fuse_history_tokens,
    history_tokens,
    load_chat_template,
)
from alpamayo_jax.processing.tokenizer import ExtendedTokenizer, build_tokenizer, extract_cot, load_tokenizer
from alpamayo_jax.sharding import constrain, to_host


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Everything inference needs, loaded from local files only. With a `mesh`, the parameters
    live in their shardings on it and every run is placed by `alpamayo_jax.sharding`'s table:
    batch rows over `data` (data parallel over clips and samples), heads, feed-forward widths and
    the vocabulary over `model` (tensor parallel)."""

    model: AlpamayoR1
    config: AlpamayoConfig
    tokenizer: ExtendedTokenizer
    chat_template: str
    mesh: jax.sharding.Mesh | None = None

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
        return cls(model, config, tokenizer, load_chat_template(processor), mesh)

    def on_mesh(self) -> contextlib.AbstractContextManager:
        """The context runs happen in: `jax.set_mesh(self.mesh)`, or nothing without a mesh."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)


@dataclasses.dataclass(frozen=True)
class TrajectorySamples:
    """Per clip and sample: the trajectory in the t0 ego frame, the actions, the generated tokens
    and the Chain-of-Causation text."""

    xyz: np.ndarray  # (C, S, W, 3) metres
    rotation: np.ndarray  # (C, S, W, 3, 3) yaw-only rotations
    actions: np.ndarray  # (C, S, W, 2) normalised (acceleration, curvature)
    generated_token_ids: list[list[list[int]]]  # C x S raw generated ids
    cot: list[list[str]]  # C x S Chain-of-Causation texts
    timings: dict[str, float]  # seconds per stage (host wall clock, results ready)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps"))
def _denoise(graphdef: nnx.GraphDef, state: nnx.State, noise: jax.Array, context: ExpertContext,
             num_steps: int) -> jax.Array:
    model = nnx.merge(graphdef, state)
    noise = constrain(noise, ("batch", None, None), name="flow noise")
    return euler_sample(lambda x, t: model.action_velocity(x, t, context), noise, num_steps).actions


@functools.partial(jax.jit, static_argnames=("action_space",))
def _rollout(actions, hist_xyz, hist_rot, stats, action_space: ActionSpaceConfig):
    return action_to_traj(actions, hist_xyz, hist_rot, action_space, stats)


def _timed(timings: dict, stage: str, start: float) -> float:
    now = time.perf_counter()
    timings[stage] = round(now - start, 4)
    return now


def sample_from_inputs(
    pipeline: Pipeline,
    fused_input_ids,  # (C, L) int: prompts with the history tokens fused in
    pixel_values,  # (P, F) float32: every image of every clip, in order
    image_grid_thw,  # (I, 3) int
    ego_history_xyz,  # (C, H, 3) float
    ego_history_rot,  # (C, H, 3, 3) float
    key: jax.Array,
    *,
    num_samples: int = 1,
    temperature: float = 0.6,
    top_p: float | None = 0.98,
    top_k: int | None = None,
    greedy: bool = False,
    max_new_tokens: int = 256,
    num_flow_steps: int = DEFAULT_NUM_STEPS,
    noise=None,  # (C * S, W, 2) float32 initial flow noise; drawn from `key` if None
) -> TrajectorySamples:
    """Reasoning rollout, flow matching and rollout on already-processed inputs.

    The same key gives the same result, with or without a mesh. Rows are clip-major
    (row = clip * S + sample), which is also the order of `noise`. On a mesh the C * S rows must
    divide over its data axis (`ShardingError` otherwise)."""
    config, model = pipeline.config, pipeline.model
    timings: dict[str, float] = {}
    start = time.perf_counter()
    fused_input_ids = np.asarray(fused_input_ids)
    clips, waypoints = fused_input_ids.shape[0], config.n_waypoints
    rows = clips * num_samples
    hist_xyz = np.asarray(ego_history_xyz, np.float32).reshape(clips, -1, 3)
    hist_rot = np.asarray(ego_history_rot, np.float32).reshape(clips, -1, 3, 3)
    generation_key, noise_key = jax.random.split(key)
    if noise is None:
        noise = initial_noise(noise_key, rows, waypoints)
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != (rows, waypoints, 2):
        raise ValueError(f"noise must be ({rows}, {waypoints}, 2) = (clips * num_samples, waypoints, 2), "
                         f"got {noise.shape}")
    if not bool(jnp.isfinite(noise).all()):
        raise ValueError("noise holds non-finite values")

    sampling = SamplingParams.greedy() if greedy else SamplingParams(temperature=temperature, top_p=top_p,
                                                                      top_k=top_k)
    generation_config = GenerationConfig.for_alpamayo(config, pad_token_id=pipeline.tokenizer.pad_token_id,
                                                      max_new_tokens=max_new_tokens, sampling=sampling)
    with pipeline.on_mesh():
        result = generate(model, fused_input_ids, pixel_values, image_grid_thw, config=generation_config,
                          key=generation_key, num_samples=num_samples)
        num_steps = int(result.num_steps)  # the one host sync of the rollout, after the loop
        start = _timed(timings, "generate", start)

        graphdef, state = nnx.split(model)
        actions = _denoise(graphdef, state, noise, result.expert_context(waypoints), num_flow_steps)
        actions.block_until_ready()
        start = _timed(timings, "flow_matching", start)

        xyz, rotation = _rollout(actions, np.repeat(hist_xyz, num_samples, axis=0),
                                 np.repeat(hist_rot, num_samples, axis=0), model.action_space.stats(),
                                 action_space=config.action_space)
        xyz, rotation, actions = to_host(xyz), to_host(rotation), to_host(actions)
        start = _timed(timings, "rollout", start)

        raw = to_host(result.raw_tokens)[:, :num_steps]
        cot = extract_cot(pipeline.tokenizer, result.sequences(fused_input_ids))
    _timed(timings, "decode_text", start)

    def per_clip(array):
        return array.reshape(clips, num_samples, *array.shape[1:])

    return TrajectorySamples(
        xyz=per_clip(xyz),
        rotation=per_clip(rotation),
        actions=per_clip(actions),
        generated_token_ids=[[raw[c * num_samples + s].tolist() for s in range(num_samples)] for c in range(clips)],
        cot=[[cot[c * num_samples + s] for s in range(num_samples)] for c in range(clips)],
        timings=timings,
    )


def prepare_clips(pipeline: Pipeline, camera_frames: Sequence, ego_history_xyz: Sequence,
                  ego_history_rot: Sequence) -> dict[str, np.ndarray]:
    """Prompt ids (fused), pixels and grids for C clips given as per-clip camera frames
    (n_cameras, n_frames, 3, h, w) and histories (H, 3), (H, 3, 3). Prompts must come out the
    same length (same image sizes)."""
    prepared = [build_model_inputs(frames, xyz, rot, tokenizer=pipeline.tokenizer,
                                   chat_template=pipeline.chat_template, config=pipeline.config)
                for frames, xyz, rot in zip(camera_frames, ego_history_xyz, ego_history_rot, strict=True)]
    lengths = {p["fused_input_ids"].shape[1] for p in prepared}
    if len(lengths) != 1:
        raise ValueError(f"clips give prompts of different lengths {sorted(lengths)}; batch clips whose "
                         "cameras have the same image sizes")
    return {
        "fused_input_ids": np.concatenate([p["fused_input_ids"] for p in prepared]),
        "pixel_values": np.concatenate([p["pixel_values"] for p in prepared]),
        "image_grid_thw": np.concatenate([p["image_grid_thw"] for p in prepared]),
    }


def fuse_precomputed(pipeline: Pipeline, input_ids, ego_history_xyz, ego_history_rot) -> np.ndarray:
    """The processor's ids (1, L), with history placeholders, fused with the ego history's tokens."""
    config = pipeline.config
    bins = history_tokens(ego_history_xyz, ego_history_rot, config)
    return fuse_history_tokens(np.asarray(input_ids), bins + config.history_token_start_idx,
                               placeholder_id=config.traj_token_ids.history)


def sample_trajectories(pipeline: Pipeline, clips, key: jax.Array, **options) -> TrajectorySamples:
    """Runs the model on one `Clip` or a sequence of clips (`alpamayo_jax.processing.clip`).

    Options are those of `sample_from_inputs`: num_samples=1, temperature=0.6, top_p=0.98,
    top_k=None, greedy=False, max_new_tokens=256, num_flow_steps=10, noise=None. The results keep
    a clip axis even for a single clip."""
    clips = [clips] if hasattr(clips, "camera_frames") else list(clips)
    start = time.perf_counter()
    inputs = prepare_clips(pipeline, [c.camera_frames for c in clips], [c.ego_history_xyz for c in clips],
                           [c.ego_history_rot for c in clips])
    prepare_seconds = round(time.perf_counter() - start, 4)
    samples = sample_from_inputs(pipeline, inputs["fused_input_ids"], inputs["pixel_values"],
                                 inputs["image_grid_thw"], np.stack([c.ego_history_xyz for c in clips]),
                                 np.stack([c.ego_history_rot for c in clips]), key, **options)
    return dataclasses.replace(samples, timings={"prepare_inputs": prepare_seconds, **samples.timings})
