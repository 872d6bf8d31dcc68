"""Multi-device benchmark: time per clip, data parallel and tensor parallel against one device.

Runs on 8 fake CPU devices (`--xla_force_host_platform_device_count=8`), so it measures the
overhead and scaling of the placement, not GPU speed: the fake devices share this machine's cores.
Two configs: the fixture's tiny checkpoint and a medium random-weight config (8 x 512-wide layers).
Also prints the 10B model's parameter bytes per device under each preset, computed from the
shardings of `jax.eval_shape` (no allocation; on a GPU, measure with `--measure-10b`).

    python bench/sharding_bench.py [--clips 8] [--repeats 3] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from alpamayo_jax.config import AlpamayoConfig, alpamayo_r1_10b  # noqa: E402
from alpamayo_jax.inference.inference_config import InferenceConfig  # noqa: E402
from alpamayo_jax.inference.pipeline import Pipeline, sample_trajectories  # noqa: E402
from alpamayo_jax.models.alpamayo import AlpamayoR1  # noqa: E402
from alpamayo_jax.nn.abstract import abstract_module  # noqa: E402
from alpamayo_jax.processing.synthetic import synthetic_clip  # noqa: E402
from alpamayo_jax.sharding import make_mesh, param_shardings, shard_model  # noqa: E402
from common import FIXTURE, scaled_configs  # noqa: E402
PRESETS = ["single", "data2", "data4", "data8", "model2", "data4_model2"]


def medium_pipeline(tiny: Pipeline) -> Pipeline:
    """Random weights, the tiny vocabulary and tokenizer, wider and deeper decoders and vision."""
    parsed = AlpamayoConfig.from_hf_config(*scaled_configs("medium"))
    return Pipeline.from_model(AlpamayoR1(parsed, rngs=nnx.Rngs(0)), tiny.tokenizer, tiny.chat_template)


def seconds_per_clip(pipeline: Pipeline, preset: str, clips, repeats: int, max_new_tokens: int) -> dict:
    mesh = make_mesh(preset)
    shard_model(pipeline.model, mesh)
    placed = Pipeline.from_model(pipeline.model, pipeline.tokenizer, pipeline.chat_template,
                                 None if preset == "single" else mesh)
    settings = InferenceConfig.from_model(pipeline.config, greedy=True, max_new_tokens=max_new_tokens)

    def run():
        start = time.perf_counter()
        samples = sample_trajectories(placed, clips, jax.random.key(0), settings)
        return time.perf_counter() - start, samples

    run()  # compile
    runs = [run() for _ in range(repeats)]
    def median(stage):
        return statistics.median(samples.timings[stage] for _, samples in runs) / len(clips)

    return {"per_clip": statistics.median(seconds for seconds, _ in runs) / len(clips),
            "generate_per_clip": median("generate"), "flow_per_clip": median("flow_matching"),
            "tokens": runs[-1][1].generated_token_ids}


def parameter_bytes_10b() -> dict[str, int]:
    """Largest per-device parameter bytes of the bf16 10B model under each preset (from shardings)."""
    model = abstract_module(AlpamayoR1, alpamayo_r1_10b(), param_dtype=jnp.bfloat16)
    from alpamayo_jax.nn.variables import module_variables

    variables = module_variables(model)
    result = {}
    for preset in ["single", "model2", "model4", "model8", "data2_model4"]:
        shardings = param_shardings(model, make_mesh(preset))
        result[preset] = sum(
            jnp.dtype(v.dtype).itemsize * int(jnp.prod(jnp.asarray(shardings[p].shard_shape(tuple(v.shape)))))
            for p, v in variables.items())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    print(f"{len(jax.devices())} {jax.devices()[0].platform} devices, {os.cpu_count()} cores; "
          f"{args.clips} clips x 1 sample, greedy, {args.max_new_tokens} new tokens, median of {args.repeats}")
    tiny = Pipeline.load(FIXTURE / "hf", processor_dir=FIXTURE / "vlm")
    clips = [synthetic_clip(seed, image_size=(32, 48)) for seed in range(args.clips)]
    for name, pipeline in [("tiny", tiny), ("medium", medium_pipeline(tiny))]:
        parameters = sum(v.size for v in jax.tree.leaves(nnx.state(pipeline.model, nnx.Param)))
        print(f"\n{name} ({parameters / 1e6:.1f} M parameters): seconds per clip")
        baseline = None
        for preset in PRESETS:
            result = seconds_per_clip(pipeline, preset, clips, args.repeats, args.max_new_tokens)
            baseline = baseline or result
            same = "same tokens" if result["tokens"] == baseline["tokens"] else "TOKENS DIFFER"
            print(f"  {preset:13s} {result['per_clip']:.4f} total ({baseline['per_clip'] / result['per_clip']:.2f}x "
                  f"vs single), generate {result['generate_per_clip']:.4f}, flow matching "
                  f"{result['flow_per_clip']:.4f}; {same}")
    print("\n10B bf16 parameters per device (computed from the shardings):")
    for preset, nbytes in parameter_bytes_10b().items():
        print(f"  {preset:13s} {nbytes / 2**30:6.2f} GiB")


if __name__ == "__main__":
    main()
