"""One process of a two-process run (tests/test_sharding.py starts both): 4 CPU devices per
process joined by `start_distributed` into one 8-device mesh (data 4 x model 2), running the tiny
pipeline data and tensor parallel across the processes. Prints JSON.

    python multi_host.py FIXTURE_DIR PROCESS_ID PORT
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from alpamayo_jax.sharding import make_mesh, start_distributed  # noqa: E402

fixture, process_id, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)
jax.config.update("jax_default_matmul_precision", "highest")

from alpamayo_jax.inference.pipeline import Pipeline, prepare_clips, sample_from_inputs  # noqa: E402

golden = load_file(f"{fixture}/golden.safetensors")
history = golden["input.ego_history_xyz"][0], golden["input.ego_history_rot"][0]
frames = [golden["input.image_frames"], golden["input.image_frames"][::-1]]

mesh = make_mesh("data4_model2")
pipeline = Pipeline.load(f"{fixture}/hf", processor_dir=f"{fixture}/vlm", mesh=mesh)
inputs = prepare_clips(pipeline, frames, [history[0][0]] * 2, [history[1][0]] * 2)
samples = sample_from_inputs(pipeline, inputs["fused_input_ids"], inputs["pixel_values"], inputs["image_grid_thw"],
                             np.repeat(history[0], 2, 0), np.repeat(history[1], 2, 0), jax.random.key(3),
                             num_samples=4, temperature=1.0, max_new_tokens=12)
kernel = pipeline.model.vlm.lm_head.kernel.get_value()
print("RESULT " + json.dumps({
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "global_devices": len(jax.devices()),
    "local_devices": len(jax.local_devices()),
    "lm_head_addressable_shards": len(kernel.addressable_shards),
    "tokens": samples.generated_token_ids,
    "xyz": samples.xyz.tolist(),
}))
