"""Verification of a converted bundle against a PyTorch reference built from the same checkpoint.

Both models run in float32 (JAX with the highest matmul precision) on one synthetic input: two
random camera images in a short prompt. Stages compared, each by max |a - b| / max |b|:
vision tokens, prefill logits, prefill keys/values, and the expert's flow velocity on the prefill
cache at two flow times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from alpamayo_reference.reference import TorchAlpamayo

from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.io.hf import read_hf_config
from alpamayo_jax.io.load import load_model
from alpamayo_jax.models.expert import expert_context
from alpamayo_jax.processing.image import preprocess_images
from alpamayo_jax.processing.rope_index import get_rope_index


@dataclass(frozen=True)
class StageError:
    stage: str
    max_abs: float
    relative: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.relative <= self.tolerance)


def compare(stage: str, ours, theirs, tolerance: float) -> StageError:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        raise ValueError(f"{stage}: shape {ours.shape} != reference {theirs.shape}")
    max_abs = float(np.max(np.abs(ours - theirs)))
    return StageError(stage, max_abs, max_abs / max(float(np.max(np.abs(theirs))), 1e-30), tolerance)


def synthetic_inputs(config: AlpamayoConfig, seed: int, image_size: tuple[int, int]):
    """Two random images between a few random text tokens: input_ids (1, L), pixels (writable,
    for torch to wrap), grid, and the prompt's rotary positions (3, 1, L) and deltas (1, 1)."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (3, *image_size), dtype=np.uint8) for _ in range(2)]
    pixels, grid = preprocess_images(images, vision=config.vision, min_pixels=config.min_pixels,
                                     max_pixels=config.max_pixels)
    merge = config.vision.spatial_merge_size ** 2
    def text(n):
        return list(rng.integers(0, min(config.traj_token_start_idx, config.vision_start_token_id), n))

    ids = text(5)
    for t, h, w in grid:
        ids += [config.vision_start_token_id] + [config.image_token_id] * int(t * h * w // merge) + \
               [config.vision_end_token_id] + text(3)
    ids = np.asarray([ids], np.int64)
    positions, deltas = get_rope_index(ids, grid, spatial_merge_size=config.vision.spatial_merge_size,
                                       image_token_id=config.image_token_id,
                                       vision_start_token_id=config.vision_start_token_id)
    return ids, np.array(pixels), grid, positions, deltas


def verify(model_path: str | Path, hf_dir: str | Path, *, processor_dir: str | Path | None = None, seed: int = 0,
           image_size: tuple[int, int] = (64, 96), tolerance: float = 1e-4) -> list[StageError]:
    """Runs the converted model and the PyTorch reference side by side; returns per-stage errors."""
    jax.config.update("jax_default_matmul_precision", "highest")
    model, config = load_model(model_path, dtype=jnp.float32)
    hf_dir = Path(hf_dir)
    _, config_dict, backbone = read_hf_config(hf_dir, processor_dir)
    reference = TorchAlpamayo.from_checkpoint(hf_dir, config_dict, backbone)

    ids, pixels, grid, positions, deltas = synthetic_inputs(config, seed, image_size)
    length = ids.shape[1]
    errors = []
    with torch.no_grad():
        theirs_vision = reference.vlm.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid))
        theirs = reference.vlm(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                               image_grid_thw=torch.from_numpy(grid), position_ids=torch.from_numpy(positions),
                               attention_mask=torch.ones_like(torch.from_numpy(ids)), use_cache=True)
    ours_vision = model.vlm.visual(jnp.asarray(pixels), grid)
    errors.append(compare("vision tokens", ours_vision.image_embeds, theirs_vision[0].numpy(), tolerance))
    cache = model.vlm.init_cache(1, length)
    ours = model.vlm(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), image_grid_thw=grid,
                     position_ids=jnp.asarray(positions), cache=cache)
    errors.append(compare("prefill logits", ours.logits, theirs.logits.numpy(), tolerance))
    layers = theirs.past_key_values.layers
    # transformers keeps (B, K, S, H) per layer, the layout of each layer of the cache here.
    their_k = np.stack([layer.keys.numpy() for layer in layers])
    their_v = np.stack([layer.values.numpy() for layer in layers])
    errors.append(compare("prefill keys", ours.k, their_k, tolerance))
    errors.append(compare("prefill values", ours.v, their_v, tolerance))

    waypoints = config.n_waypoints
    offsets = np.array([length])  # the action tokens follow the whole prompt
    context = expert_context(ours.cache, jnp.asarray(offsets), jnp.asarray(deltas[:, 0]), waypoints)
    torch_positions = torch.from_numpy(np.array(context.position_ids)).long()
    torch_mask = torch.zeros((1, 1, waypoints, length + waypoints))
    x = np.random.default_rng(seed + 1).normal(size=(1, waypoints, 2)).astype(np.float32)
    for t in (0.0, 0.7):
        with torch.no_grad():
            theirs_v = reference.velocity(torch.from_numpy(x), torch.tensor([t]), theirs.past_key_values,
                                          torch_positions, torch_mask)
        ours_v = model.action_velocity(jnp.asarray(x), jnp.asarray([t], jnp.float32), context)
        errors.append(compare(f"expert velocity (t={t})", ours_v, theirs_v.numpy(), tolerance))
    return errors


def format_report(errors: list[StageError]) -> str:
    rows = [f"{'stage':28s} {'max abs':>11s} {'relative':>11s} {'tolerance':>10s}  result"]
    rows += [f"{e.stage:28s} {e.max_abs:11.3e} {e.relative:11.3e} {e.tolerance:10.0e}  {'ok' if e.ok else 'FAIL'}"
             for e in errors]
    return "\n".join(rows)


def report_json(errors: list[StageError]) -> str:
    return json.dumps([e.__dict__ | {"ok": e.ok} for e in errors], indent=2)
