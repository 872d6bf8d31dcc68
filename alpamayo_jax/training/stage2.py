"""Stage 2 of fine-tuning: the action expert learns flow matching on the frozen VLM's cache.

    batch (prompt with the history fused, ground-truth future)
        -> teacher-forced VLM forward, no gradient           (`teacher_forced_context`)
        -> x = traj_to_action(history, future)                (normalised (accel, curvature); `fit_actions`)
        -> x_t = t x + (1 - t) eps, target x - eps            (flow times t and noise eps: `FlowDraw`)
        -> prediction = expert velocity at (x_t, t) on the cache; loss = mean squared error

Every function is pure: `jax.grad`, `jax.vmap` and `jax.jit` apply, and the randomness is an
argument (a `FlowDraw`, drawn from a key by `draw_flow` or injected).

The expert attends to the cache up to and including the last `<|traj_future_start|>` of its row
(the reference crops its cache there) and takes the positions the tokens after it would have had.
Two attention modes:

* ``"default"``: as at inference, the 64 action tokens see each other bidirectionally and left
  padding is masked, so a sample's prediction does not depend on its batch;
* ``"reference"``: exactly NVIDIA's training code, which passes the expert no mask, so that
  transformers builds a causal one over the action tokens and the left padding stays visible;
  its cache length is taken from the batch's last row, as the reference's is.

On the tiny fixture the two agree on an unpadded sample and differ on a padded one (see the README
for the numbers); prefer the default: it trains the attention pattern inference uses.

Shapes: B batch, L prompt length, W waypoints (64), C action channels (2), T history poses.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from alpamayo_jax.action.unicycle import traj_to_action
from alpamayo_jax.config import FlowMatchingConfig
from alpamayo_jax.inference.flow_matching import interpolate, sample_timesteps
from alpamayo_jax.io.assign import export_plan, export_tensors
from alpamayo_jax.io.weight_map import alpamayo_rules
from alpamayo_jax.models.alpamayo import ACTION_DIM, AlpamayoR1
from alpamayo_jax.models.expert import ExpertContext, expert_attention_bias, expert_position_ids
from alpamayo_jax.nn.module_jit import module_jit
from alpamayo_jax.processing.model_inputs import ModelInputs
from alpamayo_jax.sharding import constrain
from alpamayo_jax.training.optimizer import TrainingStage, trainable_filter
from alpamayo_jax.training.stage1 import teacher_forced_vlm

ExpertAttention = Literal["default", "reference"]
EXPERT_ATTENTION_MODES = ("default", "reference")


@struct.dataclass
class FlowDraw:
    """The randomness of one flow-matching loss: a flow time and a noise sample per example."""

    timesteps: jax.Array  # (B,) float32 in (0, 0.999] (beta) or [0, 1) (uniform); 0 = noise
    noise: jax.Array  # (B, W, C) float32 standard normal


def draw_flow(key: jax.Array, batch: int, num_waypoints: int, config: FlowMatchingConfig) -> FlowDraw:
    """Flow times from the checkpoint's `train_timestep_sampler` and standard normal noise."""
    time_key, noise_key = jax.random.split(key)
    return FlowDraw(sample_timesteps(time_key, (batch,), config.train_timestep_sampler),
                    jax.random.normal(noise_key, (batch, num_waypoints, ACTION_DIM), jnp.float32))


class Stage2Aux(NamedTuple):
    """What the loss saw, for inspection and parity checks."""

    x: jax.Array  # (B, W, C) clean normalised actions (the flow's data end)
    x_t: jax.Array  # (B, W, C) noisy actions t x + (1 - t) eps
    target: jax.Array  # (B, W, C) target velocity x - eps
    prediction: jax.Array  # (B, W, C) the expert's velocity
    timesteps: jax.Array  # (B,)
    cache_lengths: jax.Array  # (B,) cache columns the expert read


def future_start_lengths(inputs: ModelInputs, future_start_id: int, *, reference: bool) -> jax.Array:
    """(B,) int32: index of the last `future_start_id` token of each row + 1 (the reference's
    cropped cache length), or with `reference` the last row's value for every row."""
    is_start = jnp.asarray(inputs.input_ids) == future_start_id
    length = is_start.shape[1]
    lengths = (length - jnp.argmax(is_start[:, ::-1], axis=1)).astype(jnp.int32)
    if reference:
        lengths = jnp.broadcast_to(lengths[-1], lengths.shape)
    return lengths


def teacher_forced_context(model: AlpamayoR1, inputs: ModelInputs, num_waypoints: int, *,
                           expert_attention: ExpertAttention = "default") -> tuple[ExpertContext, jax.Array]:
    """The frozen VLM's view for the expert: one forward over the whole (left-padded) prompt,
    its keys and values without gradient, visible up to each row's last `<|traj_future_start|>`.

    Running the whole sequence and hiding the columns past the crop equals the reference's
    cropped cache under causal attention, without a data-dependent shape. Returns the context and
    the (B,) cache lengths."""
    if expert_attention not in EXPERT_ATTENTION_MODES:
        raise ValueError(f"expert_attention must be one of {EXPERT_ATTENTION_MODES}, got {expert_attention!r}")
    reference = expert_attention == "reference"
    out = teacher_forced_vlm(model, inputs, num_logits=1)  # the keys and values; no logits needed
    lengths = future_start_lengths(inputs, model.config.traj_token_ids.future_start, reference=reference)
    visible = jnp.arange(inputs.input_ids.shape[1])[None, :] < lengths[:, None]
    if not reference:  # the reference leaves left padding visible to the expert
        visible = visible & jnp.asarray(inputs.attention_mask)
    context = ExpertContext(
        k=jax.lax.stop_gradient(out.k),
        v=jax.lax.stop_gradient(out.v),
        position_ids=expert_position_ids(lengths, jnp.asarray(inputs.rope_deltas), num_waypoints),
        bias=expert_attention_bias(visible, num_waypoints, causal=reference),
    )
    return context, lengths


def ground_truth_actions(model: AlpamayoR1, inputs: ModelInputs, ego_future_xyz: jax.Array,
                         ego_future_rot: jax.Array) -> jax.Array:
    """(B, W, C) normalised actions fitted to the ground-truth future (`traj_to_action`, with the
    model's stored normalisation statistics, as the reference's training uses its action space).

    They are data, not a function of anything trained: compute them in a program of their own
    (`fit_actions`), outside the differentiated loss. (Inside one jitted value-and-grad with the
    model, the XLA:CPU runtime of jax 0.10.2 hangs on the fit's Cholesky factorisations.)"""
    return traj_to_action(inputs.ego_history_xyz, inputs.ego_history_rot, ego_future_xyz, ego_future_rot,
                          model.config.action_space, model.action_space.stats())


fit_actions = module_jit(ground_truth_actions)


def stage2_loss(
    model: AlpamayoR1,
    inputs: ModelInputs,
    actions: jax.Array,  # (B, W, C) clean normalised actions (`fit_actions`, or injected)
    draw: FlowDraw,
    *,
    expert_attention: ExpertAttention = "default",
    remat: bool = False,
) -> tuple[jax.Array, Stage2Aux]:
    """The flow-matching loss of a batch: mean over B x W x C of (prediction - (x - eps))^2.

    Gradients reach the expert and the action projections only: the VLM's keys and values are
    constants here. `remat` recomputes the expert's layers in the backward pass instead of storing
    their activations (same values, less memory)."""
    context, lengths = teacher_forced_context(model, inputs, actions.shape[1], expert_attention=expert_attention)
    actions = constrain(actions, ("batch", None, None), replicate_uneven=True)
    t = draw.timesteps.astype(jnp.float32)
    x_t = interpolate(actions, draw.noise, t)
    prediction = model.action_velocity(x_t, t, context, remat=remat)
    target = (actions - draw.noise).astype(prediction.dtype)
    loss = jnp.mean((prediction - target) ** 2)
    return loss, Stage2Aux(actions, x_t, target, prediction, t, lengths)


def stage2_gradients(model: AlpamayoR1, inputs: ModelInputs, actions: jax.Array, draw: FlowDraw, *,
                     expert_attention: ExpertAttention = "default") -> tuple[float, dict[str, np.ndarray]]:
    """The loss and d loss / d parameter of every stage-2 trainable parameter, keyed and laid out
    like the Hugging Face checkpoint (so that a PyTorch gradient can be compared key by key),
    float32."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(TrainingStage.EXPERT), ...)

    def loss(trainable):
        return stage2_loss(nnx.merge(graphdef, trainable, frozen), inputs, actions, draw,
                           expert_attention=expert_attention)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    with_grads = nnx.merge(graphdef, jax.tree.map(lambda g: g.astype(jnp.float32), grads), frozen)
    trained = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(grads)}
    tensors = export_tensors(with_grads, alpamayo_rules())
    paths = {key: path for key, (path, _, _) in export_plan(with_grads, alpamayo_rules()).items()}
    return float(value), {key: np.asarray(tensors[key], np.float32) for key in tensors if paths[key] in trained}
