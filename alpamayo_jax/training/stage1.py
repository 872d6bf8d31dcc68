"""Stage 1 of fine-tuning: the whole VLM learns to write the trajectory tokens (and, for clips that
carry it, the Chain-of-Causation text) by next-token prediction.

    batch (prompt with history and future tokens fused, labels)     `TrainingBatch.fused_inputs`,
        -> VLM forward (teacher forcing), logits (B, L, V)           `TrainingBatch.labels`
        -> cross-entropy of logits[:, i] against labels[:, i + 1], float32
        -> loss = mean over the trajectory targets + mean over the other supervised targets

The two terms are the reference's (`TrainableReasoningVLA`, SPEC §16):

* `future_traj`: targets that are trajectory ids (`traj_token_start_idx` ...
  `+ traj_vocab_size`) or `<|traj_future_start|>` / `<|traj_future_end|>`;
* `others`: every other supervised target (the assistant's `<|im_end|>`; with Chain-of-Causation
  text also `<|cot_start|>`, the text and `<|cot_end|>`).

Each term is the mean over its own targets, so the total is a **sum of two means**, not a mean
over all targets: the two `<|im_end|>` targets of a batch of two weigh as much as its 260
trajectory targets. A term without targets is 0, and a NaN term is 0, as in the reference.
Labels are `IGNORE_INDEX` (-100) where nothing is supervised; the label of position 0 is never
predicted.

Every function is pure and jittable: the selection of targets is a pair of (B, N - 1) masks, not
a data-dependent gather, so one program serves every batch of one shape.

Logits only where they are needed. Training prompts end with their assistant turn and are padded
on the left, so every supervised label sits in a short tail of the prompt (the trajectory span,
the end of turn, the CoC text). `stage1_loss` takes the labels of the last N positions and
computes the language model's logits there only; `supervised_tail` gives the shortest such N
(rounded up, so that batches of similar text lengths share one compiled step). The loss and the
gradients are those of the full labels; the (B, L, V) logits are never made: on the 10B model
(V = 155,697) a 3000-token prompt's are 1.9 GB in float32, its 131 trajectory-only targets' tail
of 192 positions 0.12 GB.

Shapes: B batch, L prompt length, N label tail (N <= L), V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.io.assign import export_plan, export_tensors
from alpamayo_jax.io.weight_map import alpamayo_rules
from alpamayo_jax.models.alpamayo import AlpamayoR1
from alpamayo_jax.processing.model_inputs import ModelInputs
from alpamayo_jax.processing.training_prompt import IGNORE_INDEX
from alpamayo_jax.sharding import constrain
from alpamayo_jax.training.optimizer import TrainingStage, trainable_filter


class Stage1Loss(NamedTuple):
    """The stage-1 loss and its two terms (float32 scalars): total = future_traj + others."""

    total: jax.Array
    future_traj: jax.Array
    others: jax.Array


class Stage1Aux(NamedTuple):
    """What the loss saw, position by position (prediction i is for the label at i + 1)."""

    logits: jax.Array  # (B, N - 1, V) float32: the logits that predict labels[:, 1:]
    targets: jax.Array  # (B, N - 1) int32: labels[:, 1:]
    future_traj_mask: jax.Array  # (B, N - 1) bool: targets of the future_traj term
    others_mask: jax.Array  # (B, N - 1) bool: targets of the others term
    token_loss: jax.Array  # (B, N - 1) float32: cross-entropy at every position (0 where unsupervised)


def target_masks(targets: jax.Array, config: AlpamayoConfig) -> tuple[jax.Array, jax.Array]:
    """(future_traj, others) masks of (B, N) target ids: trajectory ids and the trajectory span's
    start/end tokens, then every other id that is not `IGNORE_INDEX`."""
    ids = config.traj_token_ids
    start = config.traj_token_start_idx
    traj = ((targets >= start) & (targets < start + config.traj_vocab_size)) | (targets == ids.future_start) | (
        targets == ids.future_end)
    return traj, (targets != IGNORE_INDEX) & ~traj


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` where `mask`, 0 when nothing is selected, NaN -> 0 (float32 scalar)."""
    count = jnp.sum(mask)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return jnp.nan_to_num(jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0), nan=0.0)


def next_token_loss(logits: jax.Array, labels: jax.Array, config: AlpamayoConfig) -> tuple[Stage1Loss, Stage1Aux]:
    """The two-term loss of (B, N, V) logits (any float dtype; computed in float32) against
    (B, N) unshifted labels of the same positions (`IGNORE_INDEX` where unsupervised)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = jnp.asarray(labels)[:, 1:].astype(jnp.int32)
    future_traj, others = target_masks(targets, config)
    supervised = future_traj | others
    safe = jnp.where(supervised, targets, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    token_loss = jnp.where(supervised, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    terms = masked_mean(token_loss, future_traj), masked_mean(token_loss, others)
    loss = Stage1Loss(terms[0] + terms[1], *terms)
    return loss, Stage1Aux(logits, targets, future_traj, others, token_loss)


def teacher_forced_vlm(model: AlpamayoR1, inputs: ModelInputs, *, remat: bool = False,
                       num_logits: int | None = None):
    """The VLM's teacher-forced forward over the whole (left-padded) prompt: its `LMOutput`
    (logits (B, L, V), or of the last `num_logits` positions; the keys and values of every
    layer). Stage 1 reads the logits, stage 2 the keys and values."""
    rows = ("batch", "sequence")
    # Under a mesh the batch rows split over `data` (`alpamayo_jax.sharding`); without one these do nothing.
    return model.vlm(constrain(jnp.asarray(inputs.input_ids), rows, replicate_uneven=True),
                     pixel_values=constrain(jnp.asarray(inputs.pixel_values), ("image_patches", None),
                                            replicate_uneven=True),
                     image_grid_thw=inputs.image_grid,
                     position_ids=constrain(jnp.asarray(inputs.position_ids), (None, *rows), replicate_uneven=True),
                     attention_mask=constrain(jnp.asarray(inputs.attention_mask), rows, replicate_uneven=True),
                     num_logits=num_logits, remat=remat)


def stage1_loss(model: AlpamayoR1, inputs: ModelInputs, labels: jax.Array, *, remat: bool = False
                ) -> tuple[jax.Array, tuple[Stage1Loss, Stage1Aux]]:
    """The stage-1 loss of a batch: `inputs` with the future tokens fused
    (`TrainingBatch.fused_inputs()`), (B, N) `labels` of the prompts' last N positions
    (`TrainingBatch.labels()`, N = L, or its tail `labels[:, -supervised_tail(labels):]`: the same
    loss, with logits at those positions only). Returns the total (what to differentiate) and
    (its terms, aux). `remat` recomputes the language model's layers in the backward pass instead
    of storing their activations (same values, less memory)."""
    logits = teacher_forced_vlm(model, inputs, remat=remat, num_logits=labels.shape[1]).logits
    loss, aux = next_token_loss(logits, labels, model.config)
    return loss.total, (loss, aux)


# Label tails are rounded up to a multiple of this (`supervised_tail`).
LABEL_TAIL_MULTIPLE = 64


def supervised_tail(labels, multiple: int = LABEL_TAIL_MULTIPLE) -> int:
    """The length N of the shortest tail `labels[:, -N:]` of (B, L) labels that holds every
    supervised label and the position before the first of them (whose logits predict it),
    rounded up to a multiple of `multiple`, at most L (module docstring)."""
    labels = np.asarray(labels)
    length = labels.shape[1]
    supervised = (labels != IGNORE_INDEX).any(axis=0)
    if not supervised.any():  # nothing to predict: every tail gives 0
        return min(length, multiple)
    needed = length - int(np.argmax(supervised)) + 1
    return min(length, -(-needed // multiple) * multiple)


def supervised_logits(aux: Stage1Aux) -> list[np.ndarray]:
    """Per row, the (n_b, V) logits at the supervised positions, in order (host numpy): what the
    reference's loss selects. A row's i-th entry predicts its i-th supervised label."""
    logits, mask = np.asarray(aux.logits), np.asarray(aux.future_traj_mask) | np.asarray(aux.others_mask)
    return [row[selected] for row, selected in zip(logits, mask, strict=True)]


def stage1_gradients(model: AlpamayoR1, inputs: ModelInputs, labels, *, remat: bool = False
                     ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The loss terms ({"loss", "loss.future_traj", "loss.others"}) and d loss / d parameter of
    every VLM parameter, keyed and laid out like the Hugging Face checkpoint (so that a PyTorch
    gradient can be compared key by key), float32."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(TrainingStage.VLM), ...)
    labels = jnp.asarray(labels)

    def loss(trainable):
        total, (terms, _) = stage1_loss(nnx.merge(graphdef, trainable, frozen), inputs, labels, remat=remat)
        return total, terms

    (_, terms), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    with_grads = nnx.merge(graphdef, jax.tree.map(lambda g: g.astype(jnp.float32), grads), frozen)
    trained = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(grads)}
    tensors = export_tensors(with_grads, alpamayo_rules())
    paths = {key: path for key, (path, _, _) in export_plan(with_grads, alpamayo_rules()).items()}
    values = {"loss": float(terms.total), "loss.future_traj": float(terms.future_traj),
              "loss.others": float(terms.others)}
    return values, {key: np.asarray(tensors[key], np.float32) for key in tensors if paths[key] in trained}
