"""Full-size parameter shapes through `nnx.eval_shape`: exact counts, no memory allocated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alpamayo_jax.config import alpamayo_r1_10b
from alpamayo_jax.models.text import CausalLM


def count(tree) -> int:
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(tree, nnx.Param)))


@pytest.fixture(scope="module")
def abstract_lm():
    return nnx.eval_shape(lambda: CausalLM(alpamayo_r1_10b().text, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))


def test_10b_language_model_parameter_count(abstract_lm):
    assert count(abstract_lm.language_model) == 7_583_810_560
    assert count(abstract_lm.lm_head) == 637_734_912
    kernel = abstract_lm.lm_head.kernel.get_value()
    assert isinstance(kernel, jax.ShapeDtypeStruct) and kernel.dtype == jnp.bfloat16
