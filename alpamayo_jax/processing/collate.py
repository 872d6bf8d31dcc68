"""A batch of training clips -> one `TrainingBatch`, on the host (numpy).

Does what the reference's training processor and collate (`collate_fn_from_model_config`,
`padding_side='left'`) and the fusion step of its training models do:

1. per clip, the training prompt (`training_prompt.encode_training_prompt`): ids with history and
   future placeholders (and the clip's Chain-of-Causation text, if it has one), pixels from the
   float path, image grid;
2. the prompts are left-padded to the longest with the tokenizer's pad token (`<|endoftext|>`
   for Qwen), `attention_mask` false on the padding; pixel rows and image grids are concatenated
   in clip order;
3. `model_inputs.assemble_inputs` fuses the history tokens and computes the multimodal rotary
   positions from the mask (left pads get position 1);
4. the future tokens of the ground truth (`training_prompt.future_tokens` + the id of bin 0);
5. `labels_mask` (`training_prompt.labels_mask`).

The batch keeps the future placeholders in its prompt (`inputs`): that is what stage 2 (the
expert, VLM frozen) feeds the VLM, whose cache it crops at `last_future_start` before them.
Stage 1 (the VLM) trains on `TrainingBatch.fused_inputs()` (the same inputs with the future
tokens fused: `fused_input_ids()`) with `TrainingBatch.labels()`.

Shapes: B clips, L padded prompt length, P pixel rows of all images, F = 2 W future tokens (128),
W future waypoints (64).
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import numpy as np
from flax import struct

from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.processing.chat_template import PromptError
from alpamayo_jax.processing.clip import Clip, ClipError
from alpamayo_jax.processing.model_inputs import ModelInputs, assemble_inputs, left_pad
from alpamayo_jax.processing.prompt import fuse_history_tokens
from alpamayo_jax.processing.tokenizer import ExtendedTokenizer
from alpamayo_jax.processing.training_prompt import (
    IGNORE_INDEX,
    check_future_token_count,
    encode_training_prompt,
    future_tokens,
    labels_mask,
)


@struct.dataclass
class TrainingBatch:
    """B training clips, collated (host numpy arrays; a pytree with the token ids static).

    `inputs` is the VLM input with the history fused and the F `<|traj_future|>` placeholders
    still in place (stage 2's input); rows are left-padded to L (`inputs.attention_mask`).
    """

    inputs: ModelInputs  # history fused, future placeholders in place; positions from the mask
    future_token_ids: np.ndarray  # (B, F) int32: ground-truth future tokens, id offset included
    labels_mask: np.ndarray  # (B, L) bool: supervised tokens (future span + assistant <|im_end|>)
    ego_future_xyz: np.ndarray  # (B, W, 3) float32: ground-truth future positions, t0 ego frame
    ego_future_rot: np.ndarray  # (B, W, 3, 3) float32
    future_placeholder_id: int = struct.field(pytree_node=False)  # `<|traj_future|>`
    future_start_id: int = struct.field(pytree_node=False)  # `<|traj_future_start|>`

    @property
    def batch_size(self) -> int:
        return self.inputs.num_clips

    def fused_input_ids(self) -> np.ndarray:  # (B, L) int32
        """Stage 1's input ids: `inputs.input_ids` with each row's future placeholders replaced,
        in order, by its `future_token_ids` (row-major, as the reference's masked scatter)."""
        # The placeholder fusion of the prompt module, here for the future placeholders (their
        # count per row was checked by `collate`).
        return fuse_history_tokens(
            self.inputs.input_ids, self.future_token_ids, placeholder_id=self.future_placeholder_id
        )

    def fused_inputs(self) -> ModelInputs:
        """Stage 1's VLM input: `inputs` with `fused_input_ids()`. The positions stay: the
        multimodal rotary positions depend on the image tokens and the padding only."""
        return self.inputs.replace(input_ids=self.fused_input_ids().astype(self.inputs.input_ids.dtype))

    def labels(self) -> np.ndarray:  # (B, L) int32
        """Stage 1's labels: the fused ids where `labels_mask`, `IGNORE_INDEX` (-100) elsewhere.
        Unshifted: the logits at position i predict labels[:, i + 1]."""
        return np.where(self.labels_mask, self.fused_input_ids(), np.int32(IGNORE_INDEX)).astype(np.int32)


def last_future_start(batch: TrainingBatch) -> int:
    """The cache length stage 2 crops the VLM's cache to: 1 + the position of the last
    `<|traj_future_start|>` of the flattened batch, i.e. of the last row, for all rows, as the
    reference does. With left padding every training prompt ends in the same suffix after
    `<|traj_future_start|>`, so all rows give the same value."""
    rows, cols = np.nonzero(np.asarray(batch.inputs.input_ids) == batch.future_start_id)
    if rows.size == 0:
        raise PromptError("the batch has no <|traj_future_start|> token")
    return int(cols[-1]) + 1


def _ground_truth(clip: Clip, index: int, waypoints: int) -> tuple[np.ndarray, np.ndarray]:
    """The (W, 3), (W, 3, 3) float32 ground truth of clip `index`, or a `ClipError` naming it."""
    xyz, rot = clip.ego_future_xyz, clip.ego_future_rot
    missing = [name for name, value in (("ego_future_xyz", xyz), ("ego_future_rot", rot)) if value is None]
    if missing:
        verb = "are" if len(missing) > 1 else "is"
        raise ClipError(
            f"clip {index}: no ground-truth future ({' and '.join(missing)} {verb} None); training clips "
            "need both (Clip.create(..., ego_future_xyz=..., ego_future_rot=...))"
        )
    xyz, rot = np.asarray(xyz, np.float32), np.asarray(rot, np.float32)
    if xyz.shape != (waypoints, 3) or rot.shape != (waypoints, 3, 3):
        raise ClipError(
            f"clip {index}: the ground-truth future must be ({waypoints}, 3) positions and "
            f"({waypoints}, 3, 3) rotations for this model, got ego_future_xyz {xyz.shape} and "
            f"ego_future_rot {rot.shape}"
        )
    return xyz, rot


def collate(
    clips: Sequence[Clip], *, tokenizer: ExtendedTokenizer, chat_template: str, config: AlpamayoConfig
) -> TrainingBatch:
    """The training batch of B clips with ground truth (see the module docstring). Clips may have
    different image sizes (their prompts then differ in length and are left-padded). Raises
    `ClipError` naming the clip for one without ground truth, `PromptError` for prompts the
    tokenizer, template or config cannot make."""
    if not clips:
        raise PromptError("no clips to collate")
    num_future = check_future_token_count(config)
    waypoints = config.future_tokenizer.action_space.n_waypoints
    truths = [_ground_truth(clip, i, waypoints) for i, clip in enumerate(clips)]

    encoded = []
    for i, clip in enumerate(clips):
        try:
            encoded.append(
                encode_training_prompt(
                    clip.camera_frames, tokenizer=tokenizer, chat_template=chat_template, config=config,
                    cot=clip.cot,
                )
            )
        except ValueError as error:  # PromptError and the image checks
            raise PromptError(f"clip {i}: {error}") from error
    prompt_ids, attention_mask = left_pad([ids for ids, _, _ in encoded], tokenizer.pad_token_id)

    hist_xyz = np.stack([np.asarray(clip.ego_history_xyz, np.float32) for clip in clips])
    hist_rot = np.stack([np.asarray(clip.ego_history_rot, np.float32) for clip in clips])
    inputs = assemble_inputs(
        prompt_ids,
        np.concatenate([pixels for _, pixels, _ in encoded]),
        np.concatenate([grid for _, _, grid in encoded]),
        hist_xyz,
        hist_rot,
        config=config,
        attention_mask=attention_mask,
    )

    placeholder = config.traj_token_ids.future
    counts = (inputs.input_ids == placeholder).sum(axis=1)
    if np.any(counts != num_future):
        raise PromptError(
            f"expected {num_future} future placeholders (id {placeholder}) per prompt, "
            f"found {counts.tolist()}"
        )
    future_xyz = np.stack([xyz for xyz, _ in truths])
    future_rot = np.stack([rot for _, rot in truths])
    bins = future_tokens(hist_xyz, hist_rot, future_xyz, future_rot, config)
    batch = TrainingBatch(
        inputs=inputs,
        future_token_ids=(bins + config.traj_token_start_idx).astype(np.int32),
        labels_mask=labels_mask(prompt_ids, tokenizer=tokenizer, config=config),
        ego_future_xyz=future_xyz,
        ego_future_rot=future_rot,
        future_placeholder_id=placeholder,
        future_start_id=config.traj_token_ids.future_start,
    )
    check_batch(batch)
    return batch


def check_batch(batch: TrainingBatch) -> None:
    """Asserts the shapes and dtypes a `TrainingBatch` promises (an `AssertionError` is a bug in
    whatever built it)."""
    clips, length = batch.inputs.input_ids.shape
    chex.assert_shape(batch.future_token_ids, (clips, None))
    chex.assert_type(batch.future_token_ids, np.int32)
    chex.assert_shape(batch.labels_mask, (clips, length))
    chex.assert_type(batch.labels_mask, bool)
    chex.assert_shape(batch.ego_future_xyz, (clips, None, 3))
    chex.assert_shape(batch.ego_future_rot, (clips, batch.ego_future_xyz.shape[1], 3, 3))
    chex.assert_type([batch.ego_future_xyz, batch.ego_future_rot], np.float32)
