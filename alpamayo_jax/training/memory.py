"""How many bytes each device holds for a training step, from shapes alone: no array is allocated,
so it answers for the 10B model on a machine that could not hold it.

    model (abstract: `nnx.eval_shape`) + stage + optimizer + mesh + sharding rules
        -> per device: parameters, gradients, optimizer state

The placement of every parameter comes from the one sharding table (`alpamayo_jax.sharding`,
`param_shardings`), the optimizer state's shapes from `jax.eval_shape` of the optimizer's `init`;
each optimizer-state array that mirrors a parameter is placed like it (as in the trainer, where
the state is initialised from the placed parameters). The mesh may be an `AbstractMesh` (or a
preset name), so any mesh size can be sized on one CPU.

Counted: every model variable at its dtype (trainable and frozen: the step holds the whole
model), the trainable parameters' gradients in float32 (the step casts them to float32 before
clipping and AdamW; with bfloat16 parameters the backward pass first produces them in bfloat16,
a transient half as large again), and the optimizer state (AdamW's two float32 moments, plus the
float32 gradient accumulator of `optax.MultiSteps` when accumulating). Not counted: activations,
which depend on the batch, the prompt length and remat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from alpamayo_jax.nn.variables import module_variables
from alpamayo_jax.sharding import LOGICAL_RULES, MESH_AXES, mesh_shape, param_shardings
from alpamayo_jax.training.optimizer import (
    OptimizerConfig,
    TrainingStage,
    make_optimizer,
    parameter_name,
    trainable_filter,
)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes held by one device (the most loaded one) during a training step."""

    parameters: int  # every model variable, at its dtype
    gradients: int  # the trainable parameters' gradients, float32
    optimizer_state: int  # AdamW moments (+ the accumulator), float32
    trainable_parameters: int  # how many trainable parameters there are (a count, not bytes)
    replicated_parameters: int  # bytes of the model variables every device holds whole

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state


def abstract_mesh(mesh: str | tuple[int, int] | jax.sharding.Mesh | AbstractMesh) -> AbstractMesh:
    """A ("data", "model") `AbstractMesh` for a preset name, a (data, model) shape or a mesh."""
    if isinstance(mesh, AbstractMesh):
        return mesh
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh.abstract_mesh
    return AbstractMesh(mesh_shape(mesh), MESH_AXES)


def _shard_bytes(sharding: NamedSharding, shape: tuple[int, ...], dtype) -> int:
    return int(np.prod(sharding.shard_shape(tuple(shape)), dtype=np.int64)) * jnp.dtype(dtype).itemsize


def step_memory(model: nnx.Module, stage: TrainingStage | int, optimizer: OptimizerConfig, mesh, *,
                rules: Mapping[str, str | None] = LOGICAL_RULES) -> StepMemory:
    """The per-device bytes of a `stage` training step of `model` (concrete or `nnx.eval_shape`)
    with `optimizer`, its parameters placed on `mesh` by `rules` (see the module docstring)."""
    mesh = abstract_mesh(mesh)
    shardings = param_shardings(model, mesh, rules)
    variables = module_variables(model)
    parameters = sum(_shard_bytes(shardings[path], v.shape, v.dtype) for path, v in variables.items())
    replicated = sum(int(np.prod(v.shape, dtype=np.int64)) * jnp.dtype(v.dtype).itemsize
                     for path, v in variables.items() if shardings[path].is_fully_replicated)

    trainable = nnx.state(model, trainable_filter(stage))
    names = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(trainable)]
    float32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable)
    gradients = sum(_shard_bytes(shardings[name], variables[name].shape, jnp.float32) for name in names)

    state = jax.eval_shape(make_optimizer(optimizer).init, float32)
    optimizer_bytes = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = parameter_name(path)
        owner = next((n for n in names if name == n or name.endswith("." + n)), None)
        if owner is not None and tuple(variables[owner].shape) == tuple(leaf.shape):
            optimizer_bytes += _shard_bytes(shardings[owner], leaf.shape, leaf.dtype)
        else:  # counters and other scalars: on every device
            optimizer_bytes += int(np.prod(leaf.shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    count = sum(int(np.prod(variables[name].shape, dtype=np.int64)) for name in names)
    return StepMemory(parameters, gradients, optimizer_bytes, count, replicated)
