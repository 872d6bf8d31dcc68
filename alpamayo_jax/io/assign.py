"""Strict assignment of checkpoint tensors to a module's parameters, and the inverse export.

Every checkpoint key must be claimed by exactly one rule and land on an existing parameter of the
right shape; every parameter must be set exactly once. All problems are collected and reported
together in one `WeightMapError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpamayo_jax.io.weight_map import Rule, to_checkpoint_layout, to_param_layout
from alpamayo_jax.nn.variables import Buffer


class WeightMapError(ValueError):
    """Checkpoint tensors that do not map one-to-one onto the model's parameters."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} weight-map problem(s):\n  {shown}{more}")


def module_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    """'a.b.kernel' -> the `nnx.Param` or `Buffer` at that path."""
    state = nnx.state(module, nnx.Any(nnx.Param, Buffer))
    return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def candidates(key: str, rules: Iterable[Rule]) -> list[tuple[Rule, str]]:
    """Every (rule, parameter path) that checkpoint `key` may map to."""
    found = []
    for rule in rules:
        match = rule.hf_regex.match(key)
        if match:
            index = match.groupdict().get("i")
            found.append((rule, rule.param if index is None else rule.param.replace("{i}", index)))
    return found


def load_tensors_into(module: nnx.Module, tensors: Mapping[str, np.ndarray], rules: list[Rule]) -> None:
    """Sets every parameter of `module` from `tensors` (checkpoint key -> array) through `rules`.

    Arrays are cast to each parameter's dtype. Raises `WeightMapError` listing every unclaimed or
    duplicated key, unknown or missing parameter and shape mismatch; nothing is assigned then.
    """
    targets = module_variables(module)
    problems: list[str] = []
    values: dict[str, np.ndarray] = {}
    source_of: dict[str, str] = {}
    for key in sorted(tensors):
        found = candidates(key, rules)
        if not found:
            problems.append(f"unexpected checkpoint key {key!r}: no rule claims it")
            continue
        existing = [(rule, path) for rule, path in found if path in targets]
        if len(existing) != 1:
            paths = [path for _, path in (existing or found)]
            what = "which the model does not have" if not existing else "ambiguously"
            problems.append(f"checkpoint key {key!r} maps to {' or '.join(map(repr, paths))}, {what}")
            continue
        rule, path = existing[0]
        if path in source_of:
            problems.append(f"parameter {path!r} set twice, by {source_of[path]!r} and {key!r}")
            continue
        source_of[path] = key
        try:
            values[path] = to_param_layout(rule, np.asarray(tensors[key]), tuple(targets[path].shape))
        except ValueError as error:
            problems.append(f"checkpoint key {key!r} -> {path!r}: {error}")
    problems += [f"missing parameter {path!r}: no checkpoint key maps to it"
                 for path in sorted(set(targets) - set(source_of))]
    if problems:
        raise WeightMapError(problems)
    for path, value in values.items():
        targets[path].set_value(jnp.asarray(value, dtype=targets[path].dtype))


def export_tensors(module: nnx.Module, rules: list[Rule],
                   source_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """The inverse of `load_tensors_into`: checkpoint key -> array in checkpoint layout.

    `source_shapes` gives the checkpoint shapes that a layout cannot infer (the Conv3d kernel).
    """
    result = {}
    for path, variable in module_variables(module).items():
        matches = [rule for rule in rules if rule.param_regex.match(path)]
        if len(matches) != 1:
            raise WeightMapError([f"parameter {path!r} is claimed by {len(matches)} rules"])
        rule = matches[0]
        index = rule.param_regex.match(path).groupdict().get("i")
        key = rule.hf if index is None else rule.hf.replace("{i}", index)
        shape = None if source_shapes is None else source_shapes.get(key)
        result[key] = to_checkpoint_layout(rule, np.asarray(variable.value), shape)
    return result
