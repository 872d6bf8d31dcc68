"""Strict assignment of checkpoint tensors to a module's parameters, and the inverse export.

Assignment is planned from shapes and dtypes alone (a safetensors header is enough), so every
problem is found before any tensor data is read: each checkpoint key must be claimed by a rule and
land on an existing parameter with a fitting shape and a floating dtype, and each parameter must be
set exactly once. All problems are reported together in one `WeightMapError`. Then tensors are
read, transformed, cast and placed one at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpamayo_jax.io.safetensors import CheckpointReader
from alpamayo_jax.io.weight_map import (
    Rule,
    checkpoint_shape,
    layout_problem,
    to_checkpoint_layout,
    to_param_layout,
)
from alpamayo_jax.nn.variables import module_variables

# (parameter path, value in parameter layout and dtype) -> the array to store (e.g. device_put with
# the parameter's sharding). The default puts it on the default device.
Placement = Callable[[str, np.ndarray], jax.Array]


class WeightMapError(ValueError):
    """Checkpoint tensors that do not map one-to-one onto the model's parameters."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} weight-map problem(s):\n  {shown}{more}")


@dataclasses.dataclass(frozen=True)
class Assignment:
    key: str  # checkpoint key
    path: str  # parameter path
    rule: Rule


def candidates(key: str, rules: Iterable[Rule]) -> list[tuple[Rule, str]]:
    """Every (rule, parameter path) that checkpoint `key` may map to."""
    found = []
    for rule in rules:
        match = rule.hf_regex.match(key)
        if match:
            index = match.groupdict().get("i")
            found.append((rule, rule.param if index is None else rule.param.replace("{i}", index)))
    return found


def describe(tensors: Mapping) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) without reading data where the mapping can tell (`CheckpointReader`)."""
    if hasattr(tensors, "describe"):
        return tensors.describe()
    return {key: (tuple(np.shape(value)), np.asarray(value).dtype) for key, value in tensors.items()}


def plan_assignment(targets: Mapping[str, nnx.Variable], sources: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                    rules: list[Rule]) -> list[Assignment]:
    """Matches checkpoint keys (with their shapes and dtypes) to parameters. Raises
    `WeightMapError` listing every unclaimed, ambiguous or duplicated key, every missing parameter
    and every shape or dtype that does not fit."""
    problems: list[str] = []
    plan: list[Assignment] = []
    source_of: dict[str, str] = {}
    for key in sorted(sources):
        shape, dtype = sources[key]
        found = candidates(key, rules)
        if not found:
            problems.append(f"unexpected checkpoint key {key!r}: no rule claims it")
            continue
        existing = [(rule, path) for rule, path in found if path in targets]
        if len(existing) != 1:
            paths = " or ".join(repr(path) for _, path in (existing or found))
            what = "which the model does not have" if not existing else "ambiguously"
            problems.append(f"checkpoint key {key!r} maps to {paths}, {what}")
            continue
        rule, path = existing[0]
        if path in source_of:
            problems.append(f"parameter {path!r} set twice, by {source_of[path]!r} and {key!r}")
            continue
        source_of[path] = key
        shape_problem = layout_problem(rule, shape, tuple(targets[path].shape))
        if shape_problem:
            problems.append(f"checkpoint key {key!r} -> {path!r}: {shape_problem}")
        elif not jnp.issubdtype(dtype, jnp.floating):
            problems.append(f"checkpoint key {key!r} -> {path!r}: dtype {dtype} is not a floating type")
        else:
            plan.append(Assignment(key, path, rule))
    problems += [f"missing parameter {path!r}: no checkpoint key maps to it"
                 for path in sorted(set(targets) - set(source_of))]
    if problems:
        raise WeightMapError(problems)
    return plan


def load_tensors_into(
    module: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    rules: list[Rule],
    *,
    place: Placement | None = None,
    on_tensor: Callable[[Assignment, np.ndarray], None] | None = None,
) -> list[Assignment]:
    """Sets every parameter of `module` (concrete, or abstract from `nnx.eval_shape`) from
    `tensors` (checkpoint key -> array; a `CheckpointReader` reads them lazily) through `rules`.

    Each tensor is read, laid out, cast to its parameter's dtype and placed (`place`), one at a
    time. `on_tensor` is called after each (progress reporting, checksums). Nothing is assigned
    when the plan has problems (see `plan_assignment`). Returns the plan that was carried out.
    """
    targets = module_variables(module)
    plan = plan_assignment(targets, describe(tensors), rules)
    place = place or (lambda _path, value: jax.device_put(value))  # jnp.asarray compiles a copy per shape
    for item in plan:
        targets[item.path].set_value(place(item.path, read_assignment(item, tensors, targets[item.path], on_tensor)))
    return plan


def read_assignment(item: Assignment, tensors: Mapping[str, np.ndarray], target: nnx.Variable,
                    on_tensor: Callable[[Assignment, np.ndarray], None] | None = None, *,
                    on_bytes: Callable[[memoryview], None] | None = None) -> np.ndarray:
    """Reads one planned tensor and returns it in the parameter's layout and dtype.

    `on_tensor` gets the tensor's values in checkpoint layout (from a `CheckpointReader`: cast to
    the parameter's dtype); `on_bytes` (a `CheckpointReader` only) its stored bytes, in several
    pieces (checksums)."""
    if isinstance(tensors, CheckpointReader):
        # Read straight into the parameter's array through a view of it in checkpoint layout: the
        # tensor is in memory once (plus one read block), not once as read and once laid out.
        value = np.empty(target.shape, target.dtype)
        source = to_checkpoint_layout(item.rule, value, tensors.tensors[item.key].shape)
        if not np.may_share_memory(source, value):
            raise AssertionError(f"{item.rule.layout} layout of {item.path!r} is not a view of the parameter")
        tensors.read_into(item.key, source, on_bytes=on_bytes)
    elif on_bytes is not None:
        raise ValueError("on_bytes needs a CheckpointReader (stored bytes); got an in-memory mapping")
    else:
        source = np.asarray(tensors[item.key])
        # A contiguous result no longer refers to the source, which the caller may then free.
        value = to_param_layout(item.rule, source, tuple(target.shape)).astype(target.dtype, copy=False)
        value = np.asarray(value, order="C")  # (np.ascontiguousarray would turn 0-d buffers into 1-d)
    if on_tensor is not None:
        on_tensor(item, source)
    return value


def export_plan(module: nnx.Module, rules: list[Rule]) -> dict[str, tuple[str, Rule, tuple[int, ...]]]:
    """checkpoint key -> (parameter path, rule, checkpoint shape), from parameter shapes alone
    (works on an abstract module)."""
    result = {}
    for path, variable in module_variables(module).items():
        matches = [rule for rule in rules if rule.param_regex.match(path)]
        if len(matches) != 1:
            raise WeightMapError([f"parameter {path!r} is claimed by {len(matches)} rules"])
        rule = matches[0]
        index = rule.param_regex.match(path).groupdict().get("i")
        key = rule.hf if index is None else rule.hf.replace("{i}", index)
        conv_shape = variable.get_metadata().get("conv_shape")
        result[key] = (path, rule, checkpoint_shape(rule, tuple(variable.shape), conv_shape))
    return result


def export_tensors(module: nnx.Module, rules: list[Rule]) -> dict[str, np.ndarray]:
    """The inverse of `load_tensors_into`: checkpoint key -> array in checkpoint layout, in each
    parameter's dtype."""
    variables = module_variables(module)
    result = {}
    for key, (path, rule, _) in export_plan(module, rules).items():
        variable = variables[path]
        result[key] = to_checkpoint_layout(rule, np.asarray(variable.get_value()),
                                           variable.get_metadata().get("conv_shape"))
    return result
