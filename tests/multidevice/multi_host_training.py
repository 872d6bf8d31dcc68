"""One process of a two-process training run (tests/test_sharding.py starts both): one CPU device
per process, joined by `start_distributed` into a data-2 mesh, three stage-2 steps with the FSDP
table, so that every parameter and its optimizer state are split across the processes. Prints
the losses as JSON.

    python multi_host_training.py FIXTURE_DIR PROCESS_ID PORT

(One device per process keeps the run short; the same step on data 4 x model 2 over two
processes of four devices gives the same losses too, to 3e-6 relative, measured by hand.)
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"

import jax  # noqa: E402

from alpamayo_jax.sharding import FSDP_RULES, make_mesh, start_distributed  # noqa: E402

fixture, process_id, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)
jax.config.update("jax_default_matmul_precision", "highest")

from workload import Workload  # noqa: E402

workload = Workload(fixture)
pipeline = workload.load(make_mesh("data2"))
trainer, state = workload.trainer(pipeline, pipeline.mesh, FSDP_RULES)
state, losses = workload.train(trainer, state, workload.training_batch(pipeline))
kernel = state.params["expert"]["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
print("RESULT " + json.dumps({
    "process_index": jax.process_index(),
    "global_devices": len(jax.devices()),
    "expert_up_proj_spec": str(kernel.sharding.spec),
    "expert_up_proj_addressable_block": list(kernel.addressable_shards[0].data.shape),
    "expert_up_proj_shape": list(kernel.shape),
    "losses": losses,
}))
