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
