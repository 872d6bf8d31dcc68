"""Run with 8 CPU devices (tests/test_sharding.py starts it): three stage-2 training steps of the
tiny model on one device, then on a data 4 x model 2 mesh with the FSDP table (heads and widths
over model as in the tensor-parallel table, and every parameter's other dimension over data), and
three stage-1 steps (the whole VLM) on one device and on that mesh with the FSDP table; prints the
losses, the relative parameter differences and the placements as JSON."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from workload import Workload  # noqa: E402

from alpamayo_jax.sharding import FSDP_RULES, LOGICAL_RULES, make_mesh  # noqa: E402

workload = Workload(sys.argv[1])
pipeline = workload.load()
inputs, actions = workload.training_batch(pipeline)
stage1_batch = workload.training_batch(pipeline, stage=1)


def gradients(trainer, state, batch):
    """The first step's gradient of every trainable parameter (same key as the step's)."""
    key = jax.random.fold_in(state.key, state.step)
    grad = jax.jit(jax.grad(lambda params: trainer.loss(params, trainer.frozen, *batch, key)[0]))
    if trainer.mesh is None:
        return jax.tree.leaves(grad(state.params))
    with jax.set_mesh(trainer.mesh):
        return jax.tree.leaves(grad(state.params))


def relative(ours, reference):
    """Max |difference| over max |reference|, over all tensors together (per-tensor ratios of
    tensors whose gradients nearly cancel measure only the summation order)."""
    difference = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(ours, reference, strict=True))
    return difference / max(float(np.abs(np.asarray(b)).max()) for b in reference)


def three_steps(mesh=None, rules=LOGICAL_RULES, stage=2):
    batch = (inputs, actions) if stage == 2 else stage1_batch
    trainer, state = workload.trainer(pipeline, mesh, rules, stage=stage)
    first_gradients = gradients(trainer, state, batch)
    state, losses = workload.train(trainer, state, batch)
    return state, losses, first_gradients


reference_state, reference_losses, reference_gradients = three_steps()
report = {"devices": len(jax.devices()), "reference_losses": reference_losses}
for name, rules in (("data4_model2_fsdp", FSDP_RULES),):
    state, losses, first_gradients = three_steps(make_mesh("data4_model2"), rules)
    error = relative(jax.tree.leaves(state.params), jax.tree.leaves(reference_state.params))
    kernel = state.params["expert"]["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    moment = jax.tree.leaves(state.opt_state)
    report[name] = {"losses": losses, "params_relative_error": error,
                    "gradients_relative_error": relative(first_gradients, reference_gradients),
                    "expert_up_proj_spec": str(kernel.sharding.spec),
                    "expert_up_proj_block": list(kernel.addressable_shards[0].data.shape),
                    "optimizer_state_sharded": any(getattr(m, "sharding", None) is not None
                                                   and not m.sharding.is_fully_replicated for m in moment)}
reference_state, reference_losses, reference_gradients = three_steps(stage=1)
report["stage1_reference_losses"] = reference_losses
state, losses, first_gradients = three_steps(make_mesh("data4_model2"), FSDP_RULES, stage=1)
embed = state.params["vlm"]["language_model"]["embed_tokens"]["embedding"].get_value()
report["stage1_data4_model2_fsdp"] = {
    "losses": losses, "params_relative_error": relative(jax.tree.leaves(state.params),
                                                        jax.tree.leaves(reference_state.params)),
    "gradients_relative_error": relative(first_gradients, reference_gradients),
    "embed_tokens_spec": str(embed.sharding.spec), "embed_tokens_block": list(embed.addressable_shards[0].data.shape)}
print("RESULT " + json.dumps(report))
