"""Run with 8 CPU devices (tests/test_sharding.py starts it): the tiny pipeline with its parameters
sharded over each mesh preset gives the single-device tokens and trajectories. Prints JSON."""

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from alpamayo_jax.inference.pipeline import Pipeline, prepare_clips, sample_from_inputs  # noqa: E402
from alpamayo_jax.io.assign import module_variables  # noqa: E402
from alpamayo_jax.io.convert import convert_checkpoint  # noqa: E402
from alpamayo_jax.sharding import (  # noqa: E402
    ShardingError,
    bytes_per_device,
    make_mesh,
    param_shardings,
    partition_spec,
    shard_model,
)

fixture = sys.argv[1]
golden = load_file(f"{fixture}/golden.safetensors")
history = golden["input.ego_history_xyz"][0], golden["input.ego_history_rot"][0]


def load(mesh=None):
    return Pipeline.load(f"{fixture}/hf", processor_dir=f"{fixture}/vlm", mesh=mesh)


def run(pipeline):
    inputs = prepare_clips(pipeline, [golden["input.image_frames"]], [history[0][0]], [history[1][0]])
    samples = sample_from_inputs(pipeline, inputs["fused_input_ids"], inputs["pixel_values"],
                                 inputs["image_grid_thw"], *history, jax.random.key(3), num_samples=2,
                                 temperature=1.0, max_new_tokens=12)
    return samples


report = {"devices": len(jax.devices())}
single = load()
report["single_device_bytes"] = sum(bytes_per_device(single.model).values())
reference = run(single)
report["reference_tokens"] = reference.generated_token_ids
for preset in ["model2", "data2_model2", "data4_model2"]:
    mesh = make_mesh(preset)
    if preset == "model2":  # each tensor streamed straight into its sharding
        pipeline = load(mesh)
        shardings = param_shardings(pipeline.model, mesh)
    else:  # or a loaded model moved afterwards
        pipeline = load()
        shardings = shard_model(pipeline.model, mesh)
    placed_as_table = all(
        variable.get_value().sharding.spec == partition_spec(variable.get_metadata()["logical_axes"])
        for path, variable in module_variables(pipeline.model).items())
    samples = run(pipeline)
    scale = float(np.abs(reference.xyz).max())
    per_device = bytes_per_device(pipeline.model)
    report[preset] = {
        "tokens": samples.generated_token_ids,
        "xyz_relative_error": float(np.abs(samples.xyz - reference.xyz).max()) / scale,
        "actions_relative_error": float(np.abs(samples.actions - reference.actions).max())
        / float(np.abs(reference.actions).max()),
        "placed_as_table": placed_as_table,
        "kv_proj_spec": str(shardings["vlm.language_model.layers.0.self_attn.k_proj.kernel"].spec),
        "bytes_per_device": sorted(set(per_device.values())),
    }

# A converted bundle restores straight into the shardings too.
bundle = Path(tempfile.mkdtemp()) / "bundle"
convert_checkpoint(f"{fixture}/hf", f"{fixture}/vlm", bundle)
from_bundle = Pipeline.load(bundle, mesh=make_mesh("model2"))
kernel = from_bundle.model.vlm.lm_head.kernel.get_value()
report["bundle"] = {"tokens": run(from_bundle).generated_token_ids, "lm_head_spec": str(kernel.sharding.spec),
                    "lm_head_shard_shape": list(kernel.addressable_shards[0].data.shape)}

# A model axis that does not divide the key/value heads (2 over 4) is an error naming the parameter.
try:
    param_shardings(load().model, make_mesh("model4"))
    report["indivisible_error"] = None
except ShardingError as error:
    report["indivisible_error"] = str(error)
print("RESULT " + json.dumps(report))
