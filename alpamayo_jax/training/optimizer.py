"""The fine-tuning optimizer: AdamW under a warmup + cosine schedule, per-module learning-rate
multipliers, global-norm clipping and gradient accumulation, over the trainable parameters only.

It reproduces what NVIDIA's SFT recipe gets from the Hugging Face `Trainer` (transformers 4.57.1,
`finetune/sft/configs/sft_*.yaml`, the custom parameter groups of `finetune/sft/trainer.py`):

* gradients are clipped to a global norm over **all** trainable parameters, then
* AdamW (decoupled weight decay, bias-corrected moments) runs with the scheduled learning rate, and
* each module's update is scaled by its multiplier. torch's AdamW multiplies both the Adam step
  and the weight decay by the group's learning rate, so scaling the whole update is the same as a
  parameter group with `lr x multiplier`; the schedule's floor is scaled with it, as in the
  reference, where `LambdaLR` multiplies every group's own initial learning rate.

Parameters the stage does not train are never handed to the optimizer, so the optimizer state
holds nothing for them. A training step, with `stage` and `config` static::

    filt = trainable_filter(stage)
    tx = make_optimizer(config)
    opt_state = tx.init(trainable_state(model, stage))

    @nnx.jit
    def train_step(model, opt_state, batch):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, filt))(model, batch)
        params = nnx.state(model, filt)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return opt_state

`nnx.Optimizer(model, tx, wrt=filt)` works as well (its pure-array state has the same paths).

Gradient accumulation (`gradient_accumulation_steps` k > 1) wraps the chain in `optax.MultiSteps`:
call `tx.update` once per micro-batch with the gradient of that micro-batch's mean loss. MultiSteps
keeps the running mean of the k gradients and applies clipping + AdamW to it on every k-th call
(the other calls return zero updates). The Trainer divides each micro-batch loss by k and sums the
gradients, so both apply the mean of the micro-batch gradients. The schedule advances once per
optimizer step, as the Trainer's scheduler does, so `total_steps` counts optimizer steps.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Multipliers = tuple[tuple[str, float], ...]

# The Hugging Face scheduler types (`lr_scheduler_type`) this module reproduces.
SCHEDULES = ("cosine_warmup_with_min_lr", "cosine_with_min_lr")


class TrainingStage(enum.IntEnum):
    """The reference's two SFT stages."""

    VLM = 1  # stage 1: the whole VLM learns to emit trajectory tokens
    EXPERT = 2  # stage 2: the VLM is frozen, the action expert and its projections learn flow matching


# Top-level modules whose `nnx.Param`s each stage trains. Stage 1's reference model
# (`TrainableReasoningVLA`) is only the VLM; stage 2's (`TrainableAlpamayoR1`) sets
# `requires_grad = False` on every VLM parameter and trains the rest.
TRAINABLE_MODULES: Mapping[TrainingStage, tuple[str, ...]] = {
    TrainingStage.VLM: ("vlm",),
    TrainingStage.EXPERT: ("expert", "action_in_proj", "action_out_proj"),
}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Hyper-parameters of `make_optimizer` (frozen, hashable: usable as a static jit argument).

    Attributes:
      learning_rate: peak learning rate, reached at the end of the warmup.
      warmup_steps: optimizer steps of linear warmup.
      total_steps: optimizer steps of the whole run (the Trainer's `max_steps`, see
        `total_optimizer_steps`); the cosine reaches the floor on the last one.
      min_learning_rate: the cosine's floor, an absolute learning rate (the Trainer's
        `lr_scheduler_kwargs.min_lr`, which it turns into the rate `min_lr / learning_rate`).
        Modules with a multiplier get `multiplier x min_learning_rate`.
      b1, b2, eps: AdamW's moment decays and denominator epsilon (added after bias correction).
      weight_decay: decoupled weight decay, applied where `decay_mask` says so (not to biases and
        norm weights, as the Trainer's parameter groups).
      max_grad_norm: clip the global gradient norm to this; None disables clipping.
      lr_multipliers: (parameter-path prefix, multiplier) pairs, e.g. `(("vlm.visual", 0.1),)`.
        A parameter takes the multiplier of its longest matching prefix, 1 if none matches. A
        mapping is accepted and stored as sorted pairs.
      gradient_accumulation_steps: micro-batches per optimizer step (`optax.MultiSteps` when > 1).
      schedule: the Hugging Face scheduler type to reproduce, one of `SCHEDULES`.
    """

    learning_rate: float
    warmup_steps: int
    total_steps: int
    min_learning_rate: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_multipliers: Multipliers = ()
    gradient_accumulation_steps: int = 1
    schedule: str = "cosine_warmup_with_min_lr"

    def __post_init__(self) -> None:
        if isinstance(self.lr_multipliers, Mapping):
            object.__setattr__(self, "lr_multipliers", tuple(sorted(self.lr_multipliers.items())))
        else:
            object.__setattr__(self, "lr_multipliers", tuple(tuple(pair) for pair in self.lr_multipliers))
        _validate(self)

    @classmethod
    def stage1(cls, total_steps: int, **overrides: Any) -> OptimizerConfig:
        """Stage 1 (whole VLM), as `sft_stage1.yaml` on top of `sft_base.yaml` configures it.

        learning_rate 1e-5, warmup_steps 500, gradient_accumulation_steps 4 and the multiplier
        0.1 on the vision tower come from `sft_stage1.yaml` (`lr_multiplier: vlm.model.visual`:
        Qwen3-VL's `vlm.model.visual` is this tree's `vlm.visual`). The floor min_lr 1e-6 and the
        scheduler type `cosine_warmup_with_min_lr` come from `sft_base.yaml`. AdamW's betas
        (0.9, 0.999), eps 1e-8, weight_decay 0 and max_grad_norm 1.0 are `TrainingArguments`
        defaults that no yaml overrides (DeepSpeed's `gradient_clipping: auto` takes the latter).
        """
        preset = {
            "learning_rate": 1e-5, "warmup_steps": 500, "total_steps": total_steps, "min_learning_rate": 1e-6,
            "lr_multipliers": (("vlm.visual", 0.1),), "gradient_accumulation_steps": 4,
        }
        return cls(**{**preset, **overrides})

    @classmethod
    def stage2(cls, total_steps: int, **overrides: Any) -> OptimizerConfig:
        """Stage 2 (action expert), as `sft_base.yaml` configures it (`sft_stage2.yaml` overrides
        none of these): learning_rate 1e-4, warmup_steps 100, min_lr 1e-6,
        `cosine_warmup_with_min_lr`, gradient_accumulation_steps 1, no multipliers; AdamW and
        clipping at the `TrainingArguments` defaults as in `stage1`.
        """
        preset = {
            "learning_rate": 1e-4, "warmup_steps": 100, "total_steps": total_steps, "min_learning_rate": 1e-6,
        }
        return cls(**{**preset, **overrides})

    @classmethod
    def for_stage(cls, stage: TrainingStage | int, total_steps: int, **overrides: Any) -> OptimizerConfig:
        """`stage1` or `stage2` by stage."""
        stage = TrainingStage(stage)
        return (cls.stage1 if stage == TrainingStage.VLM else cls.stage2)(total_steps, **overrides)


def _validate(config: OptimizerConfig) -> None:
    def require(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(f"OptimizerConfig: {message}")

    def finite(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def count(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    require(finite(config.learning_rate) and config.learning_rate > 0,
            f"learning_rate must be a positive number, got {config.learning_rate!r}")
    require(count(config.total_steps) and config.total_steps >= 1,
            f"total_steps must be an integer >= 1, got {config.total_steps!r}")
    require(count(config.warmup_steps) and 0 <= config.warmup_steps <= config.total_steps,
            f"warmup_steps must be an integer in [0, total_steps={config.total_steps}], "
            f"got {config.warmup_steps!r}")
    require(finite(config.min_learning_rate) and 0 <= config.min_learning_rate <= config.learning_rate,
            f"min_learning_rate must lie in [0, learning_rate={config.learning_rate}], "
            f"got {config.min_learning_rate!r}")
    for name in ("b1", "b2"):
        value = getattr(config, name)
        require(finite(value) and 0 <= value < 1, f"{name} must lie in [0, 1), got {value!r}")
    require(finite(config.eps) and config.eps >= 0, f"eps must be >= 0, got {config.eps!r}")
    require(finite(config.weight_decay) and config.weight_decay >= 0,
            f"weight_decay must be >= 0, got {config.weight_decay!r}")
    require(config.max_grad_norm is None or (finite(config.max_grad_norm) and config.max_grad_norm > 0),
            f"max_grad_norm must be positive or None, got {config.max_grad_norm!r}")
    require(count(config.gradient_accumulation_steps) and config.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps must be an integer >= 1, "
            f"got {config.gradient_accumulation_steps!r}")
    require(config.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")
    for pair in config.lr_multipliers:
        require(len(pair) == 2, f"lr_multipliers must hold (prefix, multiplier) pairs, got {pair!r}")
        prefix, multiplier = pair
        dotted = isinstance(prefix, str) and bool(prefix) and prefix.strip(".") == prefix
        require(dotted, f"an lr_multipliers prefix must be a non-empty dotted path, got {prefix!r}")
        require(finite(multiplier) and multiplier >= 0,
                f"the multiplier of {prefix!r} must be a number >= 0, got {multiplier!r}")
    prefixes = [prefix for prefix, _ in config.lr_multipliers]
    require(len(set(prefixes)) == len(prefixes), f"lr_multipliers repeats a prefix: {prefixes}")


def total_optimizer_steps(
    batches_per_epoch: int, num_epochs: float = 3.0, gradient_accumulation_steps: int = 1
) -> int:
    """The Trainer's `max_steps` for an epoch-based run: optimizer steps per epoch
    `ceil(batches_per_epoch / k)` (a partial accumulation at the end of an epoch is a step of its
    own), times `num_epochs` (3 in `sft_base.yaml`), rounded up. `batches_per_epoch` is one
    process's dataloader length."""
    if batches_per_epoch < 1 or gradient_accumulation_steps < 1 or num_epochs <= 0:
        raise ValueError(
            f"need batches_per_epoch >= 1, gradient_accumulation_steps >= 1 and num_epochs > 0, got "
            f"{batches_per_epoch}, {gradient_accumulation_steps}, {num_epochs}")
    steps_per_epoch = -(-batches_per_epoch // gradient_accumulation_steps)
    return math.ceil(num_epochs * steps_per_epoch)


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------


def _schedule_table(config: OptimizerConfig) -> np.ndarray:
    """The learning rate of optimizer steps 0 .. total_steps - 1 in float64, by the Trainer's formulas
    (num_cycles 0.5, min_lr_rate = min_lr / lr), followed by the floor."""
    step = np.arange(config.total_steps, dtype=np.float64)
    warmup, total = float(config.warmup_steps), float(config.total_steps)
    min_rate = config.min_learning_rate / config.learning_rate
    if config.schedule == "cosine_warmup_with_min_lr":
        # transformers' `get_cosine_with_min_lr_schedule_with_warmup_lr_rate`: step 0 already runs at
        # lr / warmup, the peak is step warmup - 1, and the decay reaches the floor on the last step.
        ramp = (step + 1.0) / max(1.0, warmup)
        progress = (step - warmup + 1.0) / max(1.0, total - warmup)
    else:
        # transformers' `get_cosine_with_min_lr_schedule_with_warmup`: step 0 runs at lr 0.
        ramp = step / max(1.0, warmup)
        progress = (step - warmup) / max(1.0, total - warmup)
    decay = 0.5 * (1.0 + np.cos(np.pi * progress)) * (1.0 - min_rate) + min_rate
    factor = np.where(step < warmup, ramp, np.maximum(decay, 0.0))
    return np.append(config.learning_rate * factor, config.min_learning_rate)


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Optimizer step (int scalar) -> learning rate (float32 scalar), the Trainer's
    `config.schedule` step for step: linear warmup, then a half cosine down to `min_learning_rate`.

    The Trainer evaluates it in Python floats; the float32 cosine would be off by a few ulps
    (3e-7 relative), so the run's `total_steps` values are tabulated in float64 here and rounded
    once (4 bytes a step). From `total_steps` on it holds the floor, where the Trainer's formula
    would turn back up.
    """
    table = _schedule_table(config).astype(np.float32)

    def schedule(count: jax.Array) -> jax.Array:
        return jnp.asarray(table)[jnp.clip(count, 0, table.shape[0] - 1)]

    return schedule


# ---------------------------------------------------------------------------------------------
# Which parameters train
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PathPrefix:
    """nnx filter: the variable's path starts with `prefix` (a tuple of keys, e.g. ("expert",))."""

    prefix: tuple[str | int, ...]

    def __call__(self, path: tuple, value: Any) -> bool:
        return tuple(path[: len(self.prefix)]) == self.prefix


def trainable_filter(stage: TrainingStage | int) -> nnx.filterlib.Filter:
    """The `nnx.Param`s a stage trains, as an nnx filter (for `nnx.state`, `nnx.split`,
    `nnx.DiffState`, `nnx.Optimizer(wrt=...)`). Stage 1: everything under `vlm`; stage 2:
    everything under `expert`, `action_in_proj` and `action_out_proj`. `Buffer`s (Fourier
    frequencies, action statistics) are not `nnx.Param`s and never train."""
    modules = TRAINABLE_MODULES[TrainingStage(stage)]
    return nnx.All(nnx.Param, nnx.Any(*(PathPrefix((module,)) for module in modules)))


def trainable_state(model: nnx.Module, stage: TrainingStage | int) -> nnx.State:
    """The stage's trainable parameters of `model` (what `make_optimizer`'s `init` takes)."""
    return nnx.state(model, trainable_filter(stage))


def parameter_name(path: Sequence[Any]) -> str:
    """A JAX key path -> the dotted parameter name, e.g. 'vlm.visual.blocks.0.attn.qkv.kernel'.

    Works for nested dicts, `nnx.State` (dropping the trailing `.value` through which an
    `nnx.Variable` holds its array) and `nnx.as_pure` states alike."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    parts = []
    for key in keys:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return ".".join(parts)


def lr_multiplier(multipliers: Multipliers, name: str) -> float:
    """The multiplier of the longest prefix of `name` in `multipliers`, 1.0 if none.

    Prefixes match whole path components ('vlm.visual' covers 'vlm.visual.merger.norm.scale',
    not 'vlm.visual_extra'); the reference compares raw strings, which is the same on this tree."""
    best, best_len = 1.0, -1
    for prefix, multiplier in multipliers:
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = float(multiplier), len(prefix)
    return best


# The Trainer's `get_decay_parameter_names`: no weight decay for names matching these (searched in
# the lowercase dotted name) nor for parameters of `nn.LayerNorm` modules. Those LayerNorms are
# caught by name here too, except the vision blocks' `norm1`/`norm2`: hence the last pattern.
# The action encoder's RMSNorm weights (`action_in_proj.encoder.trunk.{i}`) match nothing and decay,
# as in the reference.
_NO_DECAY = re.compile(
    r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)|(?:^|\.)norm\d+(?:$|\.)"
)


def decays(name: str) -> bool:
    """Whether the Trainer would apply weight decay to the parameter of this dotted name."""
    return _NO_DECAY.search(name.lower()) is None


def decay_mask(params: Any) -> Any:
    """The tree of `params` with True where weight decay applies (`decays` of each leaf's name)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(parameter_name(path)), params)


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------


def scale_by_lr_multiplier(multipliers: Multipliers) -> optax.GradientTransformation:
    """Scales each update by its parameter's `lr_multiplier` (static per leaf, no state).

    Placed after AdamW's learning-rate scaling, it makes the module's effective learning rate,
    weight decay included, `multiplier x schedule(step)`, as a torch parameter group would."""
    multipliers = tuple(tuple(pair) for pair in multipliers)

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params

        def scale(path: Sequence[Any], update: jax.Array) -> jax.Array:
            multiplier = lr_multiplier(multipliers, parameter_name(path))
            return update if multiplier == 1.0 else update * jnp.asarray(multiplier, update.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, masked weight decay) -> per-module multipliers, in
    `optax.MultiSteps` when `gradient_accumulation_steps` > 1.

    Initialise it on the trainable state only (`trainable_state`); `update` needs `params` (for the
    weight decay). Clipping sees every trainable gradient before any multiplier, as the Trainer
    clips before `optimizer.step()`. It scales by `max_norm / norm`; torch's `clip_grad_norm_` by
    `max_norm / (norm + 1e-6)`, a relative difference of 1e-6 / norm that Adam's normalisation
    all but cancels.
    """
    chain = []
    if config.max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(config.max_grad_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
            weight_decay=config.weight_decay, mask=decay_mask,
        )
    )
    if config.lr_multipliers:
        chain.append(scale_by_lr_multiplier(config.lr_multipliers))
    tx = optax.chain(*chain)
    if config.gradient_accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.gradient_accumulation_steps)
        tx = tx.gradient_transformation()
    return tx
