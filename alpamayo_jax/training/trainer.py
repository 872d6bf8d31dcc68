"""The fine-tuning loop of both stages: one jitted step with donated state, run state saved with orbax.

    TrainState (step, trainable parameters, optimizer state, PRNG key)
        --train_step(state, frozen, inputs, targets)--> TrainState, metrics

`Trainer.create(model, optimizer, key, stage=...)` splits the model once into its graph
definition, the stage's trainable parameters (`trainable_filter`) and everything else (`frozen`),
which never enters the optimizer:

* stage 1 (`TrainingStage.VLM`, `alpamayo_jax.training.stage1`): the whole VLM learns next-token
  prediction of the trajectory tokens (and Chain-of-Causation text); `inputs` are the prompts with
  the future tokens fused, `targets` the (B, L) labels; frozen: the expert, the action
  projections, the buffers. The language model's layers are rematerialised by default.
* stage 2 (`TrainingStage.EXPERT`, `alpamayo_jax.training.stage2`): the action expert learns
  flow matching on the frozen VLM; `inputs` are the prompts with only the history fused,
  `targets` the (B, W, 2) clean actions fitted to the ground truth. Step k draws its flow times
  and noise from `fold_in(key, k)`.

`Trainer.prepare` turns a collated `TrainingBatch` into the stage's (inputs, targets). Step k
trains on batch k of `BatchOrder`, so a run resumed from a checkpoint repeats the uninterrupted
run exactly.

The optimizer works in float32 whatever the parameters' dtype: with bfloat16 parameters (a model
loaded with `dtype=jnp.bfloat16`) the forward and backward run in bfloat16, the gradients are
cast to float32, the AdamW moments are float32, and each step's new parameters are rounded back
to bfloat16. (An update smaller than half a bfloat16 ulp of its parameter is lost in that
rounding: at stage 2's learning rate of 1e-4 that is most updates of weights above ~0.03, and
stage 1's 1e-5 loses more, so prefer float32 parameters where memory allows.) `remat` recomputes
the trained stack's layer activations (stage 1: the language model's, stage 2: the expert's) in
the backward pass instead of storing them.

`train` is the loop: it saves the run state every `save_every` steps (and at the end) through an
`orbax.checkpoint.CheckpointManager` in `run_dir/checkpoints` (keeping `keep` of them; each save
is atomic), appends one JSON line of metrics per step to `run_dir/metrics.jsonl`, and resumes from
the newest checkpoint when asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct

from alpamayo_jax.models.alpamayo import AlpamayoR1
from alpamayo_jax.nn.module_jit import SplitModule
from alpamayo_jax.processing.clip import Clip
from alpamayo_jax.processing.collate import TrainingBatch, collate
from alpamayo_jax.processing.tokenizer import ExtendedTokenizer
from alpamayo_jax.sharding import LOGICAL_RULES, param_shardings, shard_state
from alpamayo_jax.training.data import BatchOrder, check_cot_texts
from alpamayo_jax.training.optimizer import (
    OptimizerConfig,
    TrainingStage,
    learning_rate_schedule,
    make_optimizer,
    trainable_filter,
)
from alpamayo_jax.training.stage1 import stage1_loss, supervised_tail
from alpamayo_jax.training.stage2 import (
    EXPERT_ATTENTION_MODES,
    ExpertAttention,
    draw_flow,
    fit_actions,
    stage2_loss,
)

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


@struct.dataclass
class TrainState:
    """Everything that changes from step to step."""

    step: jax.Array  # () int32: steps taken (micro-batches, with gradient accumulation)
    params: nnx.State  # the trainable parameters
    opt_state: optax.OptState
    key: jax.Array  # () typed PRNG key: step k draws with fold_in(key, k)


@dataclasses.dataclass(frozen=True, eq=False)
class Trainer:
    """The pieces of a run that do not change: the stage, the model's graph definition and frozen
    part, the optimizer, the attention mode (stage 2), remat. `step` is jitted once per batch
    shape; the frozen part is an argument of it (not a constant baked into the program)."""

    graphdef: nnx.GraphDef
    frozen: nnx.State
    optimizer: OptimizerConfig
    stage: TrainingStage
    expert_attention: ExpertAttention = "default"
    mesh: jax.sharding.Mesh | None = None
    remat: bool = False

    @classmethod
    def create(cls, model: AlpamayoR1, optimizer: OptimizerConfig, key: jax.Array, *,
               stage: TrainingStage | int, expert_attention: ExpertAttention = "default",
               mesh: jax.sharding.Mesh | None = None, rules: Mapping[str, str | None] = LOGICAL_RULES,
               remat: bool | None = None) -> tuple[Trainer, TrainState]:
        """The trainer of `stage` (1: the VLM, 2: the action expert) and the initial state of
        `model`. `remat` defaults to True for stage 1 (the language model's activations dominate
        its memory), False for stage 2. `expert_attention` is stage 2's (`stage2` module). With
        `mesh`, every parameter (and so its gradient and optimizer state) is placed by `rules`
        (`LOGICAL_RULES`: tensor parallel over `model`; `FSDP_RULES`: also split along the width
        over `data`) and the batch rows split over `data`; the step then runs under the mesh."""
        stage = TrainingStage(stage)
        if expert_attention not in EXPERT_ATTENTION_MODES:
            raise ValueError(f"expert_attention must be one of {EXPERT_ATTENTION_MODES}, got {expert_attention!r}")
        remat = stage == TrainingStage.VLM if remat is None else bool(remat)
        graphdef, params, frozen = nnx.split(model, trainable_filter(stage), ...)
        # A copy: the step donates the state's buffers, which must not be the model's own (device_put
        # may reuse a buffer for one of the shards).
        params = jax.tree.map(jnp.copy, params)
        if mesh is not None:
            shardings = param_shardings(model, mesh, rules)
            params, frozen = shard_state(params, shardings), shard_state(frozen, shardings)
        trainer = cls(graphdef, frozen, optimizer, stage, expert_attention, mesh, remat)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=make_optimizer(optimizer).init(_float32(params)), key=key)
        return trainer, state

    def model(self, params: nnx.State) -> AlpamayoR1:
        return nnx.merge(self.graphdef, params, self.frozen)

    def prepare(self, batch: TrainingBatch, split: SplitModule[AlpamayoR1]) -> tuple[object, jax.Array]:
        """(inputs, targets) of a collated batch for this stage: stage 1 the prompts with the
        future tokens fused and the labels; stage 2 the prompts with the history fused and the
        clean actions fitted to the ground truth (with `split`, the model as loaded)."""
        if self.stage == TrainingStage.VLM:  # the labels' supervised tail: logits there only
            labels = batch.labels()
            return batch.fused_inputs(), jnp.asarray(labels[:, -supervised_tail(labels):])
        return batch.inputs, fit_actions(split, batch.inputs, batch.ego_future_xyz, batch.ego_future_rot)

    def step(self, state: TrainState, inputs, targets: jax.Array) -> tuple[TrainState, dict]:
        """One optimizer (micro-)step on a batch (`prepare`): `inputs` (`ModelInputs`) and the
        stage's `targets`. Jitted; `state` is donated (do not reuse it)."""
        context = contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)
        with context:
            return self._jitted_step(state, self.frozen, inputs, targets)

    @functools.cached_property
    def _jitted_step(self) -> Callable:
        return jax.jit(functools.partial(_train_step, self), donate_argnums=(0,))

    def loss(self, params: nnx.State, frozen: nnx.State, inputs, targets, key) -> tuple[jax.Array, dict]:
        """The stage's loss and its extra metrics (stage 1: the two terms); `key` draws stage 2's
        flow times and noise."""
        model = nnx.merge(self.graphdef, params, frozen)
        if self.stage == TrainingStage.VLM:
            total, (terms, _) = stage1_loss(model, inputs, targets, remat=self.remat)
            return total, {"loss.future_traj": terms.future_traj, "loss.others": terms.others}
        draw = draw_flow(key, targets.shape[0], targets.shape[1], model.config.flow_matching)
        loss, _ = stage2_loss(model, inputs, targets, draw, expert_attention=self.expert_attention,
                              remat=self.remat)
        return loss, {}


def _float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _train_step(trainer: Trainer, state: TrainState, frozen: nnx.State, inputs, targets
                ) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.key, state.step)
    (loss, extra), grads = jax.value_and_grad(trainer.loss, has_aux=True)(state.params, frozen, inputs, targets,
                                                                           key)
    grads, params = _float32(grads), _float32(state.params)
    optimizer = make_optimizer(trainer.optimizer)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    steps_per_update = trainer.optimizer.gradient_accumulation_steps
    metrics = {"loss": loss.astype(jnp.float32), **{name: value.astype(jnp.float32) for name, value in extra.items()},
               "grad_norm": optax.tree.norm(grads),
               "learning_rate": learning_rate_schedule(trainer.optimizer)(state.step // steps_per_update)}
    new_params = jax.tree.map(lambda new, old: new.astype(old.dtype), optax.apply_updates(params, updates),
                              state.params)
    return state.replace(step=state.step + 1, params=new_params, opt_state=opt_state), metrics


# ---------------------------------------------------------------------------------------------
# Run state on disk
# ---------------------------------------------------------------------------------------------


def _to_disk(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "key": jax.random.key_data(state.key)}


def _from_disk(saved: dict, like: TrainState) -> TrainState:
    return TrainState(step=saved["step"], params=saved["params"], opt_state=saved["opt_state"],
                      key=jax.random.wrap_key_data(saved["key"], impl=jax.random.key_impl(like.key)))


def checkpoint_manager(run_dir: str | os.PathLike, *, save_every: int, keep: int) -> ocp.CheckpointManager:
    """Saves every `save_every` steps, keeps the newest `keep`; asynchronous where orbax can."""
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep, create=True)
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINT_DIR, options=options)


def restore_state(manager: ocp.CheckpointManager, like: TrainState, step: int | None = None) -> TrainState:
    """The saved state of `step` (default: the newest), restored into the structure of `like`."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint to resume from in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_disk(like))
    return _from_disk(manager.restore(step, args=ocp.args.StandardRestore(abstract)), like)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunResult:
    state: TrainState
    losses: list[float]  # of the steps this call ran
    seconds: float


def train(
    trainer: Trainer,
    state: TrainState,
    clips: Sequence[Clip],
    *,
    split: SplitModule[AlpamayoR1],
    tokenizer: ExtendedTokenizer,
    chat_template: str,
    run_dir: str | os.PathLike,
    steps: int,
    batch_size: int,
    seed: int,
    save_every: int = 100,
    keep: int = 3,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
) -> RunResult:
    """Trains until `state.step == steps` on `clips` (with ground truth); see the module docstring.

    `split` is the model as loaded (stage 2 fits the ground-truth actions with it, which do not
    change). Every clip's Chain-of-Causation text is checked against the tokenizer first. With
    `resume`, starts from the newest checkpoint in `run_dir` instead of `state` (which then only
    gives the structure). Returns the final state and the losses of the steps run here."""
    check_cot_texts(clips, tokenizer)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = trainer.model(state.params).config
    order = BatchOrder(len(clips), batch_size, seed)
    started = time.perf_counter()
    losses = []
    with checkpoint_manager(run_dir, save_every=save_every, keep=keep) as manager:
        if resume:
            state = restore_state(manager, state)
        elif manager.latest_step() is not None:
            raise FileExistsError(f"{run_dir} already holds checkpoints; resume the run or choose another directory")
        prepared: dict[tuple[int, ...], tuple[object, jax.Array]] = {}
        # One writer of the metrics across processes (every process computes the same values).
        writes_metrics = jax.process_index() == 0
        with open(run_dir / METRICS_FILE, "a") if writes_metrics else contextlib.nullcontext() as metrics_file:
            while int(state.step) < steps:
                k = int(state.step)
                members = tuple(order(k))
                if members not in prepared:  # collate (and fit, stage 2) once per distinct batch
                    batch: TrainingBatch = collate([clips[i] for i in members], tokenizer=tokenizer,
                                                   chat_template=chat_template, config=config)
                    prepared[members] = trainer.prepare(batch, split)
                state, metrics = trainer.step(state, *prepared[members])
                record = {"step": k + 1, **{name: float(value) for name, value in metrics.items()},
                          "seconds": round(time.perf_counter() - started, 3)}
                losses.append(record["loss"])
                if writes_metrics:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                manager.save(k + 1, args=ocp.args.StandardSave(_to_disk(state)), force=k + 1 == steps)
                if on_step:
                    on_step(k + 1, record)
        manager.wait_until_finished()
    return RunResult(state, losses, time.perf_counter() - started)


def trained_model(trainer: Trainer, state: TrainState) -> AlpamayoR1:
    """The model with the trained parameters in place (for export or inference)."""
    return trainer.model(jax.tree.map(np.asarray, state.params))
