"""Per-device bytes of a stage-1 training step of the full-size (10B) model, from `nnx.eval_shape`
and the sharding table only (`alpamayo_jax.training.memory`): one device, tensor parallel over 8
(`model8`, `LOGICAL_RULES`) and fully sharded over 8 (`data8` with `FSDP_RULES`). The numbers are
printed; the assertions check that they add up."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from alpamayo_jax.nn.variables import module_variables
from alpamayo_jax.sharding import FSDP_RULES, LOGICAL_RULES
from alpamayo_jax.training.memory import step_memory
from alpamayo_jax.training.optimizer import OptimizerConfig, TrainingStage

GIB = 2**30
VLM_PARAMETERS = 7_583_810_560 + 637_734_912 + 576_388_336  # language model, lm_head, vision tower
MESHES = {"single": ("single", LOGICAL_RULES), "model8": ("model8", LOGICAL_RULES), "fsdp8": ("data8", FSDP_RULES)}


@pytest.fixture(scope="module")
def memory(abstract_10b):
    """{mesh name: {gradient accumulation steps: StepMemory}} for stage 1's optimizer (accumulation
    4, the reference's, and 1)."""
    table = {}
    for name, (mesh, rules) in MESHES.items():
        table[name] = {k: step_memory(abstract_10b, TrainingStage.VLM,
                                      OptimizerConfig.stage1(1000, gradient_accumulation_steps=k), mesh, rules=rules)
                       for k in (4, 1)}
        for k, m in table[name].items():
            print(f"10B stage 1, {name}, accumulation {k}: parameters {m.parameters / GIB:.2f} GiB, gradients "
                  f"{m.gradients / GIB:.2f} GiB, AdamW state {m.optimizer_state / GIB:.2f} GiB, total "
                  f"{m.total / GIB:.2f} GiB per device (replicated parameters {m.replicated_parameters / 2**20:.1f} MiB)")
    return table


def test_one_device_holds_everything(abstract_10b, memory):
    model_bytes = sum(int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize
                      for v in module_variables(abstract_10b).values())
    for m in memory["single"].values():
        assert m.trainable_parameters == VLM_PARAMETERS  # stage 1 trains the whole VLM, nothing else
        assert m.parameters == m.replicated_parameters == model_bytes  # bfloat16 model, all of it
        assert m.gradients == 4 * VLM_PARAMETERS  # float32
    # AdamW: two float32 moments; MultiSteps adds a float32 accumulator; the rest are counters.
    assert 0 <= memory["single"][1].optimizer_state - 8 * VLM_PARAMETERS < 1024
    assert 0 <= memory["single"][4].optimizer_state - 12 * VLM_PARAMETERS < 1024


@pytest.mark.parametrize("mesh", ["model8", "fsdp8"])
def test_eight_devices_split_what_the_table_splits(memory, mesh):
    single = memory["single"][4]
    for k, m in memory[mesh].items():
        # Every sharded array is split 8 ways (one mesh axis of 8), the others held whole.
        sharded = single.parameters - m.replicated_parameters
        assert sharded % 8 == 0 and m.parameters == m.replicated_parameters + sharded // 8
        assert m.parameters < single.parameters / 7 and m.gradients < single.gradients / 7
        # The moments (and the accumulator) are float32 copies of the gradients, placed like them.
        copies = 3 if k == 4 else 2
        assert 0 <= m.optimizer_state - copies * m.gradients < 1024
    assert memory[mesh][4].total < 21 * GIB  # fits an 80 GB accelerator with room for activations
