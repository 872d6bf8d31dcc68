"""The logical-axis rule table and tensor-parallel placement.

Multi-device checks run in a child process with 8 CPU devices (XLA_FLAGS must be set before JAX
starts, and this process already started it with one device)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from alpamayo_jax.nn.axes import LOGICAL_AXES
from alpamayo_jax.training.memory import abstract_mesh
from alpamayo_jax.sharding import (
    LOGICAL_RULES,
    MESH_AXES,
    ShardingError,
    make_mesh,
    mesh_shape,
    param_shardings,
    partition_spec,
)

SCRIPT = Path(__file__).parent / "multidevice" / "parallel_pipeline.py"
MULTI_HOST_SCRIPT = Path(__file__).parent / "multidevice" / "multi_host.py"
MULTI_HOST_TRAINING_SCRIPT = Path(__file__).parent / "multidevice" / "multi_host_training.py"
TRAINING_SCRIPT = Path(__file__).parent / "multidevice" / "parallel_training.py"


def test_every_logical_axis_has_a_rule():
    assert set(LOGICAL_AXES) <= set(LOGICAL_RULES)
    assert set(LOGICAL_RULES.values()) <= {None, *MESH_AXES}


def test_partition_specs_and_their_errors():
    assert partition_spec(("embed", "heads", "head_dim")) == PartitionSpec(None, "model", None)
    assert partition_spec(("vocab", "embed")) == PartitionSpec("model", None)
    with pytest.raises(ShardingError, match="no rule"):
        partition_spec(("embed", "sequence_parallel"))
    with pytest.raises(ShardingError, match="same mesh axis"):
        partition_spec(("heads", "mlp"))


def test_mesh_presets():
    assert mesh_shape("data2_model4") == (2, 4) and mesh_shape("3x2") == (3, 2) and mesh_shape((1, 8)) == (1, 8)
    with pytest.raises(ShardingError, match="unknown mesh"):
        mesh_shape("model3x")
    with pytest.raises(ShardingError, match="needs 8 devices"):
        make_mesh("model8", devices=[object()])


def test_merged_dimension_splits_over_both_mesh_axes():
    # One layer's (B * K, S, H) keys as the decode loop carries them (`KVCache.per_layer`).
    assert partition_spec((("batch", "kv_heads"), "cache_length", "head_dim")) == PartitionSpec(
        ("data", "model"), None, None)
    assert partition_spec((("batch", "layers"), None)) == PartitionSpec("data", None)
    with pytest.raises(ShardingError, match="same mesh axis"):
        partition_spec((("batch", "kv_heads"), "heads"))


def test_10b_places_on_one_device(abstract_10b):
    shardings = param_shardings(abstract_10b, make_mesh("single"))
    assert len(shardings) == 1166
    assert shardings["vlm.language_model.layers.0.self_attn.k_proj.kernel"].spec == PartitionSpec(None, "model", None)


def start_script(script: Path, *args) -> subprocess.Popen:
    """Starts a multi-device script in a child process (`script_result` collects it). Its output
    goes to files, so that a child nobody reads yet never blocks on a full pipe."""
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=stdout, stderr=stderr,
                               text=True, env=env)
    process.output = (stdout, stderr)
    return process


def script_result(process: subprocess.Popen) -> dict:
    """The JSON a started script printed after RESULT, once it exited 0."""
    process.wait(timeout=900)
    for file in process.output:
        file.seek(0)
    stdout, stderr = (file.read() for file in process.output)
    assert process.returncode == 0, stderr[-3000:]
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def eight_device_scripts(fixture_dir):
    """The pipeline and training scripts, started together: each spends much of its time compiling
    on one core, so two run in about the time of the longer one."""
    processes = {"pipeline": start_script(SCRIPT, fixture_dir),
                 "training": start_script(TRAINING_SCRIPT, fixture_dir)}
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def multidevice(eight_device_scripts):
    return script_result(eight_device_scripts["pipeline"])


@pytest.mark.parametrize("preset", ["model2", "data2", "data2_model2_vocab_width"])
def test_parallel_pipeline_matches_single_device(multidevice, preset):
    result = multidevice[preset]
    print(f"{preset}: xyz relative error {result['xyz_relative_error']:.2e}, actions "
          f"{result['actions_relative_error']:.2e}, parameter bytes per device {result['bytes_per_device']} "
          f"(single device {multidevice['single_device_bytes']})")
    assert multidevice["devices"] == 8
    assert result["tokens"] == multidevice["reference_tokens"]
    assert result["xyz_relative_error"] <= 1e-5 and result["actions_relative_error"] <= 1e-5
    assert result["placed_as_table"]
    assert result["kv_proj_spec"] == str(PartitionSpec(None, "model", None))
    data, model = mesh_shape(preset.removesuffix("_vocab_width"))
    vocab_width = preset.endswith("_vocab_width")
    assert result["lm_head_spec"] == str(PartitionSpec("model", None) if vocab_width else PartitionSpec(None, "model"))
    if model > 1:  # sharded heads, feed-forward widths and vocabulary: well under the total each
        assert max(result["bytes_per_device"]) < 0.6 * multidevice["single_device_bytes"]
    else:  # data parallel: a full replica on every device
        assert result["bytes_per_device"] == [multidevice["single_device_bytes"]]
    # The work splits: the 2-clip prefill (vision tower included) costs each device 1/data of it
    # when the clips divide over data (else it is replicated), and at most 1/model plus the
    # replicated norms and embeddings over the model axis.
    flops = result["prefill_flops_per_device"] / multidevice["single_device_prefill_flops"]
    print(f"{preset}: prefill flops per device {flops:.3f} of one device's")
    if data == 2 and model == 1:  # (the 0.2% over half: the cache's initialisation and row repeat)
        assert 0.5 <= flops <= 0.505
    elif model == 2:
        assert flops < 0.6
    # The cache: 8 rows over data, 2 key/value heads over model (L, B, K, S, H).
    cache = result["kv_cache"]
    print(f"{preset}: KV cache {cache['shape']} as {cache['spec']}, {cache['block']} per device")
    assert cache["spec"] == [None, "data" if data > 1 else None, "model" if model > 1 else None, None, None]
    assert cache["block"] == [cache["shape"][0], 8 // data, 2 // model, *cache["shape"][3:]]
    # In the decode loop, each layer's (B * K, S, H) keys and values keep both splits.
    print(f"{preset}: decode loop carries {cache['decode_carry_arrays']} layer arrays of "
          f"{cache['decode_carry_rows']} rows per device")
    assert cache["decode_carry_arrays"] == 2 * cache["shape"][0]
    assert cache["decode_carry_rows"] == [8 * 2 // (data * model)]


def test_10b_vocabulary_is_split_along_its_width(abstract_10b):
    # 155,697 entries divide over no model axis; every other dimension follows the table.
    shardings = param_shardings(abstract_10b, abstract_mesh("model8"))
    paths = ["vlm.lm_head.kernel", "vlm.language_model.embed_tokens.embedding",
             "vlm.language_model.layers.0.self_attn.k_proj.kernel", "expert.layers.0.mlp.up_proj.kernel"]
    assert {path: str(shardings[path].spec) for path in paths} == {
        "vlm.lm_head.kernel": str(PartitionSpec("model", None)),
        "vlm.language_model.embed_tokens.embedding": str(PartitionSpec(None, "model")),
        "vlm.language_model.layers.0.self_attn.k_proj.kernel": str(PartitionSpec(None, "model", None)),
        "expert.layers.0.mlp.up_proj.kernel": str(PartitionSpec(None, "model")),
    }


def test_rows_that_do_not_divide_over_data_are_a_clear_error(multidevice):
    error = multidevice["uneven_rows_error"]
    assert error is not None
    assert "rows (clips x samples = 1 x 3): dimension 0 (batch, size 3) does not divide over mesh axis 'data' of size 2" in error


def test_indivisible_dimension_is_a_clear_error(multidevice):
    error = multidevice["indivisible_error"]
    assert error is not None
    assert "kv_heads, size 2) does not divide over mesh axis 'model' of size 4" in error
    assert "vlm.language_model.layers.0.self_attn.k_proj.kernel" in error


def test_vocabulary_without_a_fallback_is_a_clear_error(multidevice):
    error = multidevice["indivisible_vocab_error"]
    assert error is not None
    assert "vlm.lm_head.kernel: dimension 1 (vocab, size 778) does not divide over mesh axis 'model' of size 3" in error
    assert "vlm.language_model.embed_tokens.embedding: dimension 0 (vocab, size 778)" in error


def test_evaluation_data_parallel_over_eight_devices_matches_one(multidevice):
    """`evaluate` on three synthetic dataset clips, one batch of 8 rows over data 8 against one
    clip at a time on one device (greedy): the same results and metrics to float rounding."""
    evaluation = multidevice["evaluate"]
    assert evaluation["clips"] == [3, 3]
    print(f"evaluate on data8: xyz max abs difference {evaluation['xyz_max_abs_difference']:.2e} m")
    assert evaluation["xyz_max_abs_difference"] <= 1e-4
    single, data8 = evaluation["metrics_single"], evaluation["metrics_data8"]
    assert single.keys() == data8.keys()
    for name in single:
        for key, value in single[name].items():
            assert abs(data8[name][key] - value) <= 1e-4 * max(1.0, abs(value)), (name, key)


def test_bundle_loads_straight_into_shardings(multidevice):
    bundle = multidevice["bundle"]
    assert bundle["tokens"] == multidevice["reference_tokens"]
    assert bundle["lm_head_spec"] == str(PartitionSpec(None, "model"))
    assert bundle["lm_head_shard_shape"] == [64, 778 // 2]


def run_two_processes(script: Path, fixture_dir) -> list[dict]:
    """Runs `script FIXTURE PROCESS_ID PORT` as two processes joined on a free local port; their
    RESULT lines, in process order."""
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("localhost", 0))
        port = str(probe.getsockname()[1])
    processes = [start_script(script, fixture_dir, index, port) for index in range(2)]
    return [script_result(process) for process in processes]


@pytest.fixture(scope="module")
def multi_host(fixture_dir):
    """Two processes on this machine, joined by `start_distributed` into one mesh."""
    return run_two_processes(MULTI_HOST_SCRIPT, fixture_dir)


def test_two_processes_match_single_device(multi_host, multidevice):
    reference = np.asarray(multidevice["reference_xyz"])
    for result in multi_host:
        error = float(np.abs(np.asarray(result["xyz"]) - reference).max()) / float(np.abs(reference).max())
        print(f"process {result['process_index']} of {result['process_count']}: {result['local_devices']} of "
              f"{result['global_devices']} devices, xyz relative error {error:.2e}")
        assert (result["process_count"], result["global_devices"], result["local_devices"]) == (2, 8, 4)
        assert result["lm_head_addressable_shards"] == 4  # each process holds its own devices' shards only
        assert result["tokens"] == multidevice["reference_tokens"]
        assert error <= 1e-5


def test_two_processes_train_as_one_device(fixture_dir, multidevice_training):
    """Three stage-2 steps on a data-2 mesh over two processes with the FSDP table, so every
    trainable parameter and its AdamW moments are split across the processes: the losses of one
    device, step after step (so the updates too)."""
    reference = multidevice_training["reference_losses"]
    for result in run_two_processes(MULTI_HOST_TRAINING_SCRIPT, fixture_dir):
        error = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference, strict=True))
        print(f"process {result['process_index']}: losses {result['losses']} vs {reference} (relative {error:.2e})")
        assert result["global_devices"] == 2
        shape, block = result["expert_up_proj_shape"], result["expert_up_proj_addressable_block"]
        assert 2 * int(np.prod(block)) == int(np.prod(shape))  # each process holds half
        assert error <= 1e-5


@pytest.fixture(scope="module")
def multidevice_training(eight_device_scripts):
    return script_result(eight_device_scripts["training"])


@pytest.mark.parametrize("preset", ["data4_model2_fsdp"])
def test_sharded_training_steps_match_one_device(multidevice_training, preset):
    """Three stage-2 steps, batch of 4 over data 4, heads and widths over model 2 and, with FSDP,
    every parameter's other dimension over data: the losses, gradients and parameters of one
    device. (The tensor-parallel table alone is this placement without the data split, which the
    inference presets above check.)

    Tolerances, measured: losses 5e-7. Gradients 1.6e-5 of the largest (relative to the largest
    gradient over all tensors): action_out_proj's kernel gradient sums 256 token contributions,
    here reduced across four devices in another order (9e-6 absolute of 0.57). Parameters after
    three AdamW steps 3.9e-4 of the largest: AdamW's normalised update moves an entry by about
    the learning rate (1e-3) whatever its gradient's size, so an entry whose gradient is rounding
    noise can move by up to 2 x 1e-3 per step either way (bound 6e-3 over three steps, parameters
    of order 1); the losses and gradients above are the tight checks."""
    result = multidevice_training[preset]
    reference = multidevice_training["reference_losses"]
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference, strict=True))
    print(f"{preset}: losses {result['losses']} vs {reference} (relative {loss_error:.2e}); gradients relative "
          f"{result['gradients_relative_error']:.2e}, parameters {result['params_relative_error']:.2e}; "
          f"expert up_proj {result['expert_up_proj_spec']}, block {result['expert_up_proj_block']}")
    assert multidevice_training["devices"] == 8
    assert loss_error <= 1e-5
    assert result["gradients_relative_error"] <= 2e-5
    assert result["params_relative_error"] <= 1e-3
    assert result["optimizer_state_sharded"]
    fsdp = preset.endswith("_fsdp")
    assert result["expert_up_proj_spec"] == str(PartitionSpec("data" if fsdp else None, "model"))
    assert result["expert_up_proj_block"] == ([48 // 4, 96 // 2] if fsdp else [48, 96 // 2])


def test_sharded_stage1_steps_match_one_device(multidevice_training):
    """Three stage-1 steps (the whole VLM, next-token loss, remat) with the FSDP table on data 4 x
    model 2: the losses, first gradients and parameters of one device. Measured: losses 1e-7,
    gradients 2.9e-7, parameters 4.5e-6 (of the largest)."""
    result = multidevice_training["stage1_data4_model2_fsdp"]
    reference = multidevice_training["stage1_reference_losses"]
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference, strict=True))
    print(f"stage 1 FSDP: losses {result['losses']} vs {reference} (relative {loss_error:.2e}); gradients relative "
          f"{result['gradients_relative_error']:.2e}, parameters {result['params_relative_error']:.2e}; embed_tokens "
          f"{result['embed_tokens_spec']}, block {result['embed_tokens_block']}")
    assert loss_error <= 1e-5 and result["gradients_relative_error"] <= 2e-5 and result["params_relative_error"] <= 1e-4
    assert reference[-1] < reference[0]  # the steps train
    # The vocabulary over model, the width over data (FSDP): 778 x 64 in blocks of 389 x 16.
    assert result["embed_tokens_spec"] == str(PartitionSpec("model", "data"))
    assert result["embed_tokens_block"] == [778 // 2, 64 // 4]
