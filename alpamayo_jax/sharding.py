"""Placement on a device mesh: mesh presets and the one table from logical axes to mesh axes.

Every parameter carries `logical_axes` metadata (`alpamayo_jax.nn.axes`). `LOGICAL_RULES` maps
each logical name to a mesh axis (or None: replicated along that dimension); nothing else decides
placement. The mesh has two axes: `data` (batch rows: clips x samples) and `model` (tensor
parallelism over attention heads, feed-forward width and vocabulary).

The same model code runs with no mesh, on one device, or sharded: load the parameters with
`param_shardings` (the loaders' `place`/`sharding` hooks, or `shard_model` afterwards) and run
under `jax.set_mesh(mesh)`. Inside jit, `constrain` pins the activations that decide the layout
(the KV cache: rows over `data`, key/value heads over `model`; the batch rows of the inputs and
the flow noise) with the same table, and XLA propagates placement to everything else. Outside a
mesh `constrain` does nothing, so single-device code is unchanged.

Several hosts: call `start_distributed` (`jax.distributed.initialize`) first in every process;
meshes then span all hosts' devices, every process runs the same program on the same host inputs,
and `to_host` gathers results.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alpamayo_jax.nn.variables import module_variables

MESH_AXES = ("data", "model")

# logical axis -> mesh axis. Only dimensions that are large and split evenly are sharded:
# heads (query, key/value), feed-forward widths and the vocabulary. Widths that every token's
# residual stream carries (embed, head_dim) stay whole, so tensor parallelism needs one all-reduce
# per attention and feed-forward block.
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "embed": None,
    "head_dim": None,
    "vision_embed": None,
    "vision_qkv": "model",
    "vision_heads_dim": "model",
    "vision_mlp": "model",
    "vision_patch": None,
    "vision_positions": None,
    "merger": None,
    "merger_hidden": "model",
    "action_features": None,
    "action_hidden": None,
    "action_dim": None,
    "fourier": None,
    # activations (not parameters)
    "image_patches": "data",  # patch rows of all clips' images, clip-major
    "layers": None,
    "sequence": None,
    "cache_length": None,
}

# Fully sharded data parallelism for training: parameters (and so their gradients and optimizer
# state) are also split along their model width over `data`, and gathered layer by layer as the
# step needs them; the batch rows stay split over `data` as before.
FSDP_RULES: dict[str, str | None] = {**LOGICAL_RULES, "embed": "data", "vision_embed": "data"}

# The one fallback: when the vocabulary does not divide over the model axis (the 10B model's
# 155,697 entries divide by no even number), the embedding table and lm_head are split along
# their width instead. Same memory per device; the logits then need an all-reduce and the looked-up
# embeddings an all-gather. Any other indivisible dimension is an error.
VOCAB_WIDTH_FALLBACK: dict[str, str | None] = {"vocab": None, "embed": "model"}

# Logical axes of the key/value cache (L, B, K, S, H).
KV_CACHE_AXES = ("layers", "batch", "kv_heads", "cache_length", "head_dim")

MESH_PRESETS: dict[str, tuple[int, int]] = {  # name -> (data, model)
    "single": (1, 1),
    "model2": (1, 2),
    "model4": (1, 4),
    "model8": (1, 8),
    "data2": (2, 1),
    "data4": (4, 1),
    "data8": (8, 1),
    "data2_model2": (2, 2),
    "data2_model4": (2, 4),
    "data4_model2": (4, 2),
}


class ShardingError(ValueError):
    """A mesh, rule or parameter that cannot be placed as asked."""


def mesh_shape(preset: str | tuple[int, int]) -> tuple[int, int]:
    """(data, model) for a preset name, a "DxM" string or a tuple."""
    if isinstance(preset, tuple):
        shape = preset
    elif preset in MESH_PRESETS:
        shape = MESH_PRESETS[preset]
    elif re.fullmatch(r"\d+x\d+", str(preset)):
        shape = tuple(int(n) for n in str(preset).split("x"))
    else:
        raise ShardingError(f"unknown mesh {preset!r}: use one of {sorted(MESH_PRESETS)} or 'DATAxMODEL'")
    if len(shape) != 2 or min(shape) < 1:
        raise ShardingError(f"mesh shape must be two positive sizes (data, model), got {shape}")
    return shape


def make_mesh(preset: str | tuple[int, int], devices=None) -> Mesh:
    """A ("data", "model") mesh over the first data x model devices (all hosts' devices under
    `jax.distributed`)."""
    data, model = mesh_shape(preset)
    devices = list(jax.devices() if devices is None else devices)
    if data * model > len(devices):
        raise ShardingError(f"mesh {data}x{model} needs {data * model} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), MESH_AXES)


def _parts(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The names (or mesh axes) of one dimension's entry: none, one, or several merged."""
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def partition_spec(logical_axes: tuple[str | tuple[str, ...] | None, ...],
                   rules: Mapping[str, str | None] = LOGICAL_RULES) -> PartitionSpec:
    """The mesh placement of an array whose dimensions have these logical names; a tuple of names
    is one dimension that merges several, major first (a reshape of (B, K) into B * K). Raises on
    an unknown name or when two dimensions would use the same mesh axis."""
    unknown = [n for entry in logical_axes for n in _parts(entry) if n not in rules]
    if unknown:
        raise ShardingError(f"logical axes {unknown} have no rule (known: {sorted(rules)})")

    def mesh_axis(entry):
        merged = tuple(rules[n] for n in _parts(entry) if rules[n] is not None)
        return merged[0] if len(merged) == 1 else (merged or None)

    mesh_axes = [mesh_axis(entry) for entry in logical_axes]
    used = [a for entry in mesh_axes for a in _parts(entry)]
    if len(used) != len(set(used)):
        raise ShardingError(f"logical axes {logical_axes} map two dimensions to the same mesh axis: {mesh_axes}")
    return PartitionSpec(*mesh_axes)


def _indivisible(shape: tuple[int, ...], spec: PartitionSpec, axis_sizes: Mapping[str, int]) -> list[int]:
    """Dimensions that their mesh axes would split unevenly."""
    missing = [a for entry in spec for a in _parts(entry) if a not in axis_sizes]
    if missing:
        raise ShardingError(f"the mesh has no axis {missing[0]!r} (axes {tuple(axis_sizes)}); use make_mesh")
    return [dim for dim, (size, entry) in enumerate(zip(shape, spec, strict=True))
            if size % math.prod(axis_sizes[a] for a in _parts(entry))]


def _indivisible_error(name: str, dim: int, shape, logical_axes, spec, axis_sizes) -> ShardingError:
    axis = spec[dim]
    return ShardingError(
        f"{name}: dimension {dim} ({logical_axes[dim]}, size {shape[dim]}) does not divide over mesh axis "
        f"{axis!r} of size {math.prod(axis_sizes[a] for a in _parts(axis))}; choose a mesh whose {axis} axis "
        "divides it")


def sharding_for(mesh: Mesh, shape: tuple[int, ...], logical_axes: tuple[str | None, ...], *, name: str,
                 rules: Mapping[str, str | None] = LOGICAL_RULES) -> NamedSharding:
    """`NamedSharding` of one array; raises when a sharded dimension does not divide evenly (for
    example 3 key/value heads over a model axis of 2)."""
    spec = partition_spec(logical_axes, rules)
    uneven = _indivisible(tuple(shape), spec, mesh.shape)
    if uneven:
        raise _indivisible_error(name, uneven[0], shape, logical_axes, spec, mesh.shape)
    return NamedSharding(mesh, spec)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...], *, name: str = "activation",
              replicate_uneven: bool = False) -> jax.Array:
    """Pins an activation inside jit to the table's placement on the mesh set with
    `jax.set_mesh`; returns `x` unchanged when no mesh is set.

    A dimension that does not divide over its mesh axis raises `ShardingError`, or, with
    `replicate_uneven`, stays whole on every device (used for prompts when there are fewer clips
    than data shards: the rows they expand into are split instead).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = partition_spec(logical_axes)
    uneven = _indivisible(tuple(x.shape), spec, mesh.shape)
    if uneven and not replicate_uneven:
        raise _indivisible_error(name, uneven[0], x.shape, logical_axes, spec, mesh.shape)
    spec = PartitionSpec(*(None if dim in uneven else axis for dim, axis in enumerate(spec)))
    return jax.lax.with_sharding_constraint(x, spec)


def start_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None) -> None:
    """Joins this process to a multi-host run; call it in every process before anything else
    touches JAX. Without arguments, JAX reads the cluster environment (SLURM, Open MPI, Kubernetes
    or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables). CPU processes
    exchange data through gloo (no effect on GPUs, which use NCCL)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly sharded, possibly multi-host) array as numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _param_sharding(mesh: Mesh, shape: tuple[int, ...], names: tuple[str | None, ...], path: str,
                    rules: Mapping[str, str | None]) -> NamedSharding:
    try:
        return sharding_for(mesh, shape, names, name=path, rules=rules)
    except ShardingError as error:
        if "vocab" not in names:
            raise
        try:
            return sharding_for(mesh, shape, names, name=path, rules={**rules, **VOCAB_WIDTH_FALLBACK})
        except ShardingError:
            raise error from None  # the table's own placement is what the user needs to hear about


def param_shardings(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES
                    ) -> dict[str, NamedSharding]:
    """parameter path -> sharding, for a concrete or abstract (`nnx.eval_shape`) model. Every
    problem (missing metadata, indivisible dimension) is reported at once. A vocabulary that does
    not divide over the model axis takes `VOCAB_WIDTH_FALLBACK`."""
    result, problems = {}, []
    for path, variable in module_variables(model).items():
        names = variable.get_metadata().get("logical_axes")
        if names is None or len(names) != len(variable.shape):
            problems.append(f"{path}: logical_axes {names} do not describe shape {tuple(variable.shape)}")
            continue
        try:
            result[path] = _param_sharding(mesh, tuple(variable.shape), names, path, rules)
        except ShardingError as error:
            problems.append(str(error))
    if problems:
        raise ShardingError("cannot place the model on this mesh:\n  " + "\n  ".join(problems))
    return result


def shard_model(model: nnx.Module, mesh: Mesh) -> dict[str, NamedSharding]:
    """Moves every parameter of a concrete model to its sharding; returns the shardings."""
    shardings = param_shardings(model, mesh)
    for path, variable in module_variables(model).items():
        variable.set_value(jax.device_put(variable.get_value(), shardings[path]))
    return shardings


def shard_state(state: nnx.State, shardings: Mapping[str, NamedSharding]) -> nnx.State:
    """A copy of `state` (a part of a model, e.g. its trainable parameters) with every array put
    into its sharding, looked up by parameter path ('a.b.kernel')."""
    placed = [(path, variable.replace(jax.device_put(variable.get_value(), shardings[".".join(map(str, path))])))
              for path, variable in nnx.to_flat_state(state)]
    return nnx.from_flat_state(placed)


def bytes_per_device(model: nnx.Module) -> dict[jax.Device, int]:
    """Parameter bytes held by each device (replicated arrays count on every device)."""
    totals: dict[jax.Device, int] = {}
    for variable in module_variables(model).values():
        for shard in variable.get_value().addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
