"""Run with 8 CPU devices (tests/test_sharding.py starts it): the tiny pipeline on each mesh preset
(rows over `data`, parameters over `model`) gives the single-device tokens and trajectories.
Prints JSON."""

import json
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from workload import Workload  # noqa: E402

from alpamayo_jax.data.iterator import DatasetSource  # noqa: E402
from alpamayo_jax.data.synthetic_dataset import write_synthetic_dataset  # noqa: E402
from alpamayo_jax.evaluation.evaluate import evaluate  # noqa: E402
from alpamayo_jax.inference.inference_config import InferenceConfig  # noqa: E402
from alpamayo_jax.inference.generation import cache_capacity, decode_rollout, prefill  # noqa: E402
from alpamayo_jax.inference.pipeline import Pipeline  # noqa: E402
from alpamayo_jax.nn.variables import module_variables  # noqa: E402
from alpamayo_jax.io.convert import convert_checkpoint  # noqa: E402
from alpamayo_jax.sharding import (  # noqa: E402
    LOGICAL_RULES,
    VOCAB_WIDTH_FALLBACK,
    ShardingError,
    bytes_per_device,
    make_mesh,
    param_shardings,
    partition_spec,
    shard_model,
)

workload = Workload(sys.argv[1])
fixture, load, run = workload.fixture, workload.load, workload.run


def prefill_report(pipeline, inputs) -> dict:
    """The KV cache placement and XLA's count of floating-point operations per device of the
    2-clip multimodal prefill, from the prefill `workload.run` compiled (so nothing compiles again)."""
    settings = workload.settings(pipeline)
    generation = settings.generation_config(pipeline.config, pad_token_id=pipeline.tokenizer.pad_token_id)
    arguments = dict(capacity=cache_capacity(inputs.prompt_length, generation.max_new_tokens),
                     num_samples=settings.num_samples, stop_token_id=generation.stop_after_token_id)
    with pipeline.on_mesh():
        cache, logits, rope_deltas, stops = prefill(pipeline.split, inputs, **arguments)
        cost = prefill.lower(pipeline.split, inputs, **arguments).compile().cost_analysis()
        decode_hlo = decode_rollout.lower(pipeline.split, cache, logits, rope_deltas, jax.random.key(0), stops,
                                          config=generation).compile().as_text()
    spec = list(getattr(cache.k.sharding, "spec", ()))  # none on one device
    # The decode loop carries each layer's keys and values as (B * K, S, H) (`KVCache.per_layer`):
    # the rows of those arrays in its per-device carry.
    _, _, _, capacity, head_dim = cache.k.shape
    carry = " ".join(re.findall(r"%while[.\d]* = \(([^)]*)\)", decode_hlo))
    decode_rows = re.findall(rf"f32\[(\d+),{capacity},{head_dim}\]", carry)
    return {"kv_cache": {"spec": spec + [None] * (cache.k.ndim - len(spec)), "shape": list(cache.k.shape),
                         "block": list(cache.k.addressable_shards[0].data.shape),
                         "decode_carry_rows": sorted({int(rows) for rows in decode_rows}),
                         "decode_carry_arrays": len(decode_rows)},
            "prefill_flops_per_device": float((cost[0] if isinstance(cost, list) else cost)["flops"])}


# Every kind of placement once: parameters over model (streamed into place), rows over data (moved
# by `shard_model`), and both with the 10B model's vocabulary fallback (placed by hand from the
# table); data 8 is `evaluate`'s mesh below, data 4 x model 2 the training scripts'.
PRESETS = ["model2", "data2", "data2_model2_vocab_width"]
report = {"devices": len(jax.devices()), "presets": PRESETS}
single = load()
report["single_device_bytes"] = sum(bytes_per_device(single.model).values())
reference = run(single)
inputs = workload.inputs(single)  # the same for every pipeline: one tokenizer, one template
report["reference_tokens"] = reference.generated_token_ids
report["reference_xyz"] = reference.xyz.tolist()
report["single_device_prefill_flops"] = prefill_report(single, inputs)["prefill_flops_per_device"]


def expected_spec(names, vocab_width):
    """The table's placement; with `vocab_width`, the fallback for the vocabulary tables."""
    return partition_spec(names, {**LOGICAL_RULES, **VOCAB_WIDTH_FALLBACK} if vocab_width and "vocab" in names
                          else LOGICAL_RULES)


for preset in PRESETS:
    mesh = make_mesh(preset.removesuffix("_vocab_width"))
    # The vocabulary-width fallback (which the 10B model takes), forced on the tiny model.
    vocab_width = preset.endswith("_vocab_width")
    if preset == "model2":  # each tensor streamed straight into its sharding
        pipeline = load(mesh)
        shardings = param_shardings(pipeline.model, mesh)
    else:  # or a loaded model moved afterwards (then split again: a pipeline is immutable)
        loaded = load()
        if vocab_width:
            shardings = {}
            for path, variable in module_variables(loaded.model).items():
                names = variable.get_metadata()["logical_axes"]
                shardings[path] = NamedSharding(mesh, expected_spec(names, vocab_width=True))
                variable.set_value(jax.device_put(variable.get_value(), shardings[path]))
        else:
            shardings = shard_model(loaded.model, mesh)
        pipeline = Pipeline.from_model(loaded.model, loaded.tokenizer, loaded.chat_template, mesh)
    placed_as_table = all(
        variable.get_value().sharding.spec == expected_spec(variable.get_metadata()["logical_axes"], vocab_width)
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
        "lm_head_spec": str(shardings["vlm.lm_head.kernel"].spec),
        "bytes_per_device": sorted(set(per_device.values())),
        **prefill_report(pipeline, inputs),
    }

# A converted bundle restores straight into the shardings too.
bundle = Path(tempfile.mkdtemp()) / "bundle"
convert_checkpoint(f"{fixture}/hf", f"{fixture}/vlm", bundle)
from_bundle = Pipeline.load(bundle, mesh=make_mesh("model2"))
kernel = from_bundle.model.vlm.lm_head.kernel.get_value()
report["bundle"] = {"tokens": run(from_bundle).generated_token_ids, "lm_head_spec": str(kernel.sharding.spec),
                    "lm_head_shard_shape": list(kernel.addressable_shards[0].data.shape)}

# Rows that do not divide over the data axis (1 clip x 3 samples over 2) are an error.
try:
    run(Pipeline.from_model(single.model, single.tokenizer, single.chat_template, make_mesh("data2")), clips=1,
        num_samples=3)
    report["uneven_rows_error"] = None
except ShardingError as error:
    report["uneven_rows_error"] = str(error)

# A model axis that does not divide the key/value heads (2 over 4) is an error naming the parameter;
# over 3, neither the vocabulary (778) nor its fallback, the width (64), divides: the error names
# the table's own placement.
for name, shape in [("indivisible_error", "model4"), ("indivisible_vocab_error", "1x3")]:
    try:
        param_shardings(single.model, make_mesh(shape))
        report[name] = None
    except ShardingError as error:
        report[name] = str(error)
# `evaluate` data parallel: three synthetic dataset clips in one batch of 8 over data 8 (five
# fill-up copies) against one clip at a time on one device, greedy.
scratch = Path(tempfile.mkdtemp())
dataset = write_synthetic_dataset(scratch / "pai", num_clips=3, seed=1)
greedy = InferenceConfig.from_model(single.config, greedy=True, num_samples=2, max_new_tokens=4)
evaluations = {name: evaluate(DatasetSource(dataset.root), scratch / name, pipeline=pipeline, settings=greedy)
               for name, pipeline in (("single", single), ("data8", load(make_mesh("data8"))))}


def result_xyz(name):
    return np.stack([json.loads(path.read_text())["xyz"] for path in sorted((scratch / name).glob("*@*.json"))])


report["evaluate"] = {
    "clips": [evaluations[name]["num_clips"] for name in ("single", "data8")],
    "metrics_single": evaluations["single"]["clips"],
    "metrics_data8": evaluations["data8"]["clips"],
    "xyz_max_abs_difference": float(np.abs(result_xyz("single") - result_xyz("data8")).max()),
}
print("RESULT " + json.dumps(report))
