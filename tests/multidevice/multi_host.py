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

from alpamayo_jax.sharding import make_mesh, start_distributed  # noqa: E402

fixture, process_id, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)
jax.config.update("jax_default_matmul_precision", "highest")

from workload import Workload  # noqa: E402

workload = Workload(fixture)
pipeline = workload.load(make_mesh("data4_model2"))
samples = workload.run(pipeline)
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
