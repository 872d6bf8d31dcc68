"""The logical-axis rule table and tensor-parallel placement.

Multi-device checks run in a child process with 8 CPU devices (XLA_FLAGS must be set before JAX
starts, and this process already started it with one device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec

from alpamayo_jax.nn.axes import LOGICAL_AXES
from alpamayo_jax.sharding import (
    LOGICAL_RULES,
    MESH_AXES,
    ShardingError,
    make_mesh,
    mesh_shape,
    param_shardings,
    partition_spec,
)

SCRIPT = Path(__file__).parent / "multidevice" / "tensor_parallel.py"


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


def test_10b_places_on_one_device(abstract_10b):
    shardings = param_shardings(abstract_10b, make_mesh("single"))
    assert len(shardings) == 1166
    assert shardings["vlm.language_model.layers.0.self_attn.k_proj.kernel"].spec == PartitionSpec(None, "model", None)


@pytest.fixture(scope="module")
def multidevice(fixture_dir):
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    run = subprocess.run([sys.executable, str(SCRIPT), str(fixture_dir)], capture_output=True, text=True,
                         timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("preset", ["model2", "data2_model2", "data4_model2"])
def test_tensor_parallel_matches_single_device(multidevice, preset):
    result = multidevice[preset]
    print(f"{preset}: xyz relative error {result['xyz_relative_error']:.2e}, actions "
          f"{result['actions_relative_error']:.2e}, parameter bytes per device {result['bytes_per_device']} "
          f"(single device {multidevice['single_device_bytes']})")
    assert multidevice["devices"] == 8
    assert result["tokens"] == multidevice["reference_tokens"]
    assert result["xyz_relative_error"] <= 1e-5 and result["actions_relative_error"] <= 1e-5
    assert result["placed_as_table"]
    assert result["kv_proj_spec"] == str(PartitionSpec(None, "model", None))
    # Sharded heads, feed-forward widths and vocabulary: each device holds well under the total.
    assert max(result["bytes_per_device"]) < 0.6 * multidevice["single_device_bytes"]


def test_indivisible_dimension_is_a_clear_error(multidevice):
    error = multidevice["indivisible_error"]
    assert error is not None
    assert "kv_heads, size 2) does not divide over mesh axis 'model' of size 4" in error
    assert "vlm.language_model.layers.0.self_attn.k_proj.kernel" in error


def test_bundle_loads_straight_into_shardings(multidevice):
    bundle = multidevice["bundle"]
    assert bundle["tokens"] == multidevice["reference_tokens"]
    assert bundle["lm_head_spec"] == str(PartitionSpec(None, "model"))
    assert bundle["lm_head_shard_shape"] == [64, 778 // 2]
