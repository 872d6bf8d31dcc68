"""Full-size parameter shapes through `nnx.eval_shape`: exact counts (SPEC §11), no memory allocated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpamayo_jax.nn.variables import module_variables
from alpamayo_jax.nn.axes import LOGICAL_AXES


def count(module: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for v in module_variables(module).values())


def test_10b_parameter_counts(abstract_10b):
    m = abstract_10b
    assert count(m.vlm.language_model) == 7_583_810_560
    assert count(m.vlm.lm_head) == 637_734_912
    assert count(m.vlm.visual) == 576_388_336
    assert count(m.expert) == 2_279_238_656
    assert count(m.action_in_proj) == 1_349_632 + 30  # + the three stored Fourier frequency buffers
    assert count(m.action_out_proj) == 4_098
    assert count(m.action_space) == 4  # the normalisation buffers
    assert count(m) == 11_078_526_194 + 30 + 4


def test_nothing_is_allocated(abstract_10b):
    values = [v.get_value() for v in module_variables(abstract_10b).values()]
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in values)
    assert all(v.dtype == jnp.bfloat16 for v in values)


def test_every_parameter_has_logical_axes(abstract_10b):
    for path, variable in module_variables(abstract_10b).items():
        names = variable.get_metadata().get("logical_axes")
        assert names is not None and len(names) == len(variable.shape), f"{path}: {names} for {variable.shape}"
        assert all(n is None or n in LOGICAL_AXES for n in names), f"{path}: {names}"


def test_abstract_module_is_what_eval_shape_with_rngs_makes():
    """`abstract_module` (a fixed key for every stream, so no traced counter) gives the module
    that `nnx.eval_shape` with an `nnx.Rngs` gives: the same graph, and every variable with the
    same shape, dtype and metadata."""
    from alpamayo_jax.config import tiny
    from alpamayo_jax.models.alpamayo import AlpamayoR1
    from alpamayo_jax.nn.abstract import abstract_module

    ours = abstract_module(AlpamayoR1, tiny(), param_dtype=jnp.bfloat16)
    theirs = nnx.eval_shape(lambda: AlpamayoR1(tiny(), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert nnx.graphdef(ours) == nnx.graphdef(theirs)
    ours_vars, theirs_vars = module_variables(ours), module_variables(theirs)
    assert ours_vars.keys() == theirs_vars.keys() and len(ours_vars) > 100
    for path, variable in ours_vars.items():
        assert type(variable) is type(theirs_vars[path]), path
        assert variable.get_value() == theirs_vars[path].get_value(), path  # ShapeDtypeStructs
        assert variable.get_metadata() == theirs_vars[path].get_metadata(), path
