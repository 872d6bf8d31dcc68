"""The model's inputs for a batch of clips: one validated pytree, built once on the host.

    clips (cameras + ego history)  --prepare_inputs-->  ModelInputs  --> generate / pipeline
    recorded processor outputs     --inputs_from_recorded-->  ModelInputs

`assemble_inputs` is the one place where prompts, pixels, image grids and histories are checked
against each other and against the model config, the history tokens are fused into the prompts,
the image grid is normalised to its static tuple form and the multimodal rotary positions are
computed. Everything downstream takes a `ModelInputs` as it is: no conversions, no re-checks.

Shapes: C clips, L prompt length, P patch rows of all images (clip-major), F flattened patch,
T history poses, N images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import chex
import numpy as np
from flax import struct

from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.models.vision import ImageGrid, as_image_grid, num_patches
from alpamayo_jax.processing.chat_template import PromptError
from alpamayo_jax.processing.prompt import check_history, encode_clip, fuse_history_tokens, history_tokens
from alpamayo_jax.processing.rope_index import get_rope_index
from alpamayo_jax.processing.tokenizer import ExtendedTokenizer

if TYPE_CHECKING:
    from alpamayo_jax.processing.clip import Clip
    from alpamayo_jax.processing.recorded_inputs import RecordedInputs


@struct.dataclass
class ModelInputs:
    """Processed inputs of C clips (host numpy arrays; a pytree, with the image grid static).

    Rows are clips, all of length L: shorter prompts are padded on the left (`attention_mask`
    false there), as the reference's collate pads. The pixel rows of all images of all clips are
    concatenated in clip order.
    """

    input_ids: np.ndarray  # (C, L) int32: prompts with the history tokens fused in
    attention_mask: np.ndarray  # (C, L) bool: false on left padding
    pixel_values: np.ndarray  # (P, F) float32
    position_ids: np.ndarray  # (3, C, L) int32: multimodal rotary positions (t, h, w)
    rope_deltas: np.ndarray  # (C,) int32: max position + 1 - L
    ego_history_xyz: np.ndarray  # (C, T, 3) float32, t0 ego frame
    ego_history_rot: np.ndarray  # (C, T, 3, 3) float32
    image_grid: ImageGrid = struct.field(pytree_node=False)  # N x (t, h, w) patches, static

    @property
    def num_clips(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1]


def assemble_inputs(
    prompt_ids,  # (C, L) int: tokenised prompts with history placeholders
    pixel_values,  # (P, F) float32
    image_grid_thw,  # (N, 3) int
    ego_history_xyz,  # (C, T, 3) float
    ego_history_rot,  # (C, T, 3, 3) float
    *,
    config: AlpamayoConfig,
    attention_mask=None,  # (C, L) bool or 0/1: false on left padding; default all true
    history_bins=None,  # (C, K) int: the histories' `history_tokens`, if already made
) -> ModelInputs:
    """Checks, fuses and positions the inputs of C clips (see the module docstring). Raises
    `PromptError` naming what does not fit."""
    ids = np.asarray(prompt_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
        raise PromptError(f"prompt ids must be a (clips, length) integer array, got {ids.dtype} {ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape or mask.dtype.kind not in "biu" or not np.isin(mask, (0, 1)).all():
        raise PromptError(f"attention_mask must be a {ids.shape} array of 0/1 or booleans, got {mask.dtype} "
                          f"{mask.shape}")
    mask = mask.astype(bool)
    left_padded = np.maximum.accumulate(mask, axis=1) == mask  # once a row starts, it never pauses
    if not left_padded.all() or not mask[:, -1].all():
        raise PromptError("attention_mask must be left padding: false only on a prefix of each row")
    pixels = np.asarray(pixel_values)
    if pixels.dtype != np.float32:
        raise PromptError(f"pixel_values must be float32, got {pixels.dtype}")
    grid = as_image_grid(image_grid_thw)
    if pixels.shape != (num_patches(grid), config.vision.patch_dim):
        raise PromptError(
            f"pixel_values must be (sum of t*h*w over the images, C*T*P*P) = "
            f"{(num_patches(grid), config.vision.patch_dim)}, got {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise PromptError("pixel_values hold NaN or infinite values")
    clips = ids.shape[0]
    xyz, rot = np.asarray(ego_history_xyz), np.asarray(ego_history_rot)
    if xyz.ndim != 3 or xyz.shape[0] != clips:
        raise PromptError(f"ego_history_xyz must be ({clips}, T, 3) for {clips} prompts, got {xyz.shape}")
    if rot.shape[:1] != (clips,):
        raise PromptError(f"ego_history_rot must be ({clips}, T, 3, 3) for {clips} prompts, got {rot.shape}")
    if history_bins is None:
        bins = np.stack([history_tokens(xyz[c], rot[c], config) for c in range(clips)])
    else:
        for c in range(clips):
            check_history(xyz[c], rot[c], config)
        bins = np.asarray(history_bins)
        if bins.shape != (clips, config.tokens_per_history_traj) or bins.dtype.kind not in "iu":
            raise PromptError(f"history_bins must be ({clips}, {config.tokens_per_history_traj}) integers, got "
                              f"{bins.dtype} {bins.shape}")
    fused = fuse_history_tokens(ids, bins + config.history_token_start_idx,
                                placeholder_id=config.traj_token_ids.history)
    # Also checks that the placeholders of every image match its grid.
    position_ids, rope_deltas = get_rope_index(
        fused, np.asarray(grid), spatial_merge_size=config.vision.spatial_merge_size,
        image_token_id=config.image_token_id, vision_start_token_id=config.vision_start_token_id,
        attention_mask=mask)
    inputs = ModelInputs(
        input_ids=fused.astype(np.int32),
        attention_mask=mask,
        pixel_values=pixels,
        position_ids=position_ids.astype(np.int32),
        rope_deltas=rope_deltas.reshape(-1).astype(np.int32),
        ego_history_xyz=xyz.astype(np.float32),
        ego_history_rot=rot.astype(np.float32),
        image_grid=grid,
    )
    check_inputs(inputs)
    return inputs


def check_inputs(inputs: ModelInputs) -> None:
    """Asserts the shapes and dtypes a `ModelInputs` promises (an `AssertionError` is a bug in
    whatever built it; user input is checked by `assemble_inputs`)."""
    clips, length = inputs.input_ids.shape
    history = inputs.ego_history_xyz.shape[1]
    chex.assert_shape(inputs.attention_mask, (clips, length))
    chex.assert_type(inputs.attention_mask, bool)
    chex.assert_shape(inputs.position_ids, (3, clips, length))
    chex.assert_shape(inputs.rope_deltas, (clips,))
    chex.assert_shape(inputs.ego_history_xyz, (clips, history, 3))
    chex.assert_shape(inputs.ego_history_rot, (clips, history, 3, 3))
    chex.assert_shape(inputs.pixel_values, (num_patches(inputs.image_grid), None))
    chex.assert_type([inputs.input_ids, inputs.position_ids, inputs.rope_deltas], np.int32)
    chex.assert_type([inputs.pixel_values, inputs.ego_history_xyz, inputs.ego_history_rot], np.float32)


def concat_inputs(parts: Sequence[ModelInputs]) -> ModelInputs:
    """The prepared inputs of several batches of clips as one batch, in order. Their prompts must
    have one length (as the clips of one image size do): a prepared row is not padded again."""
    if not parts:
        raise PromptError("no inputs to concatenate")
    lengths = sorted({part.prompt_length for part in parts})
    if len(lengths) > 1:
        raise PromptError(f"prepared inputs of prompt lengths {lengths} cannot share a batch; prepare their clips "
                          "together instead (Pipeline.prepare pads them)")
    if len(parts) == 1:
        return parts[0]

    def joined(name: str, axis: int = 0) -> np.ndarray:
        return np.concatenate([getattr(part, name) for part in parts], axis=axis)

    inputs = ModelInputs(
        input_ids=joined("input_ids"), attention_mask=joined("attention_mask"), pixel_values=joined("pixel_values"),
        position_ids=joined("position_ids", axis=1), rope_deltas=joined("rope_deltas"),
        ego_history_xyz=joined("ego_history_xyz"), ego_history_rot=joined("ego_history_rot"),
        image_grid=tuple(entry for part in parts for entry in part.image_grid))
    check_inputs(inputs)
    return inputs


def left_pad(prompts: Sequence[np.ndarray], pad_token_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Token id rows of different lengths -> (C, L) ids padded on the left with `pad_token_id`
    and the (C, L) bool mask of the real tokens, as the reference's collate pads a batch."""
    if pad_token_id is None:
        raise PromptError("the tokenizer has no pad token, so prompts of different lengths cannot be batched")
    length = max(ids.size for ids in prompts)
    padded = np.full((len(prompts), length), pad_token_id, np.int64)
    mask = np.zeros((len(prompts), length), bool)
    for row, ids in enumerate(prompts):
        padded[row, length - ids.size:] = ids
        mask[row, length - ids.size:] = True
    return padded, mask


def prepare_inputs(clips: Sequence[Clip], *, tokenizer: ExtendedTokenizer, chat_template: str,
                   config: AlpamayoConfig) -> ModelInputs:
    """The model inputs of C clips (`alpamayo_jax.processing.clip.Clip`), processed as the
    reference's processor does; prompts of different lengths (other image sizes) are padded on
    the left."""
    if not clips:
        raise PromptError("no clips to prepare")
    encoded = [encode_clip(clip.camera_frames, clip.ego_history_xyz, clip.ego_history_rot, tokenizer=tokenizer,
                           chat_template=chat_template, config=config) for clip in clips]
    ids, mask = left_pad([ids for ids, _, _, _ in encoded], tokenizer.pad_token_id)
    return assemble_inputs(
        ids,
        np.concatenate([pixels for _, pixels, _, _ in encoded]),
        np.concatenate([grid for _, _, grid, _ in encoded]),
        np.stack([clip.ego_history_xyz for clip in clips]),
        np.stack([clip.ego_history_rot for clip in clips]),
        config=config,
        attention_mask=mask,
        history_bins=np.stack([bins for _, _, _, bins in encoded]),
    )


def inputs_from_recorded(recorded: RecordedInputs, config: AlpamayoConfig) -> ModelInputs:
    """The model inputs of one recorded sample (the reference processor's outputs, e.g. for exact
    parity runs; `alpamayo_jax.processing.recorded_inputs`)."""
    return assemble_inputs(recorded.input_ids, recorded.pixel_values, recorded.image_grid_thw,
                           recorded.ego_history_xyz[None], recorded.ego_history_rot[None], config=config)
