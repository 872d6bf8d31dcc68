"""Modules made abstractly (shapes, dtypes and metadata; nothing allocated), fast at any size.

`nnx.eval_shape(lambda: Module(..., rngs=nnx.Rngs(0)))` traces each random stream's counter
update, and flax compares every new counter's sharding with the old one's. On a tracer that
raises an AttributeError whose message JAX builds by walking the whole trace so far, so the
trace takes time quadratic in the number of parameters: 32 s for the 10B model on one core.
An abstract module's initial values are never read, so `abstract_module` gives the constructor
a stand-in whose every stream returns one fixed key: the same module in 2.9 s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def abstract_module(constructor: Callable[..., M], *args, **kwargs) -> M:
    """`constructor(*args, **kwargs, rngs=...)` through `nnx.eval_shape`: the module with
    `jax.ShapeDtypeStruct` values, as `nnx.eval_shape` with an `nnx.Rngs` makes it (same graph,
    shapes, dtypes and metadata). For modules that only draw keys at construction."""
    return nnx.eval_shape(lambda: constructor(*args, rngs=FixedKeyRngs(), **kwargs))


class FixedKeyRngs:
    """Stands in for `nnx.Rngs` where the random values do not matter (an abstract module, or a
    traced constructor whose parameters are dead code): `rngs()`, `rngs.params()` or any other
    stream gives the same key, with no counter to trace."""

    def __call__(self) -> jax.Array:
        return jax.random.key(0)

    def __getattr__(self, stream: str) -> Callable[[], jax.Array]:
        if stream.startswith("__"):  # copy, pickle and friends probe for these
            raise AttributeError(stream)
        return self
