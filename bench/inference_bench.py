"""Inference benchmark: alpamayo-jax against NVIDIA's own inference code, side by side on CPU.

Both load one float32 random-weight checkpoint (bench/common.py's sizes: "260m" by default, the
tiny fixture's architecture made 12 x 1024 wide, with its tokenizer) and run one clip of 4 cameras x
4 frames: NVIDIA's `AlpamayoR1.sample_trajectories_from_data_with_vlm_rollout` (reasoning rollout
with its stopping rule, 10 flow-matching steps, unicycle rollout) and alpamayo-jax's
`sample_from_inputs`, both with the reference's sampling (top-p 0.98, temperature 0.6), one
sample, at most --max-new-tokens reasoning tokens. Calls are interleaved (JAX, reference, JAX, ...)
after one untimed call each; the first JAX call (tracing and compiling, no persistent cache) and
the first reference call are reported on their own.

Inputs. Both get the same prepared prompt (our processor's token ids with the history
placeholders, pixel values and image grid, which equal the reference processor's bit for bit:
tests/test_image_processing.py, tests/test_prompt.py); the reference fuses the history tokens
itself, as it does in its own test script. Image preprocessing is timed by neither
(bench/preprocess_bench.py compares it).

Stages. Reference: `vlm.generate` (its first forward is the prefill, the rest decode), the
diffusion sampler, `action_to_traj`, each timed by wrapping the call. alpamayo-jax: its own
timings (`generate` = prefill + decode loop, `flow_matching`, `rollout`), and the prefill program
timed alone once per round (the same compiled program, an extra call outside the timed run).
With random weights a row may stop early (it samples `<|traj_future_start|>`): each side's token
count is reported and decode is compared per token.

The ratios depend on the CPU (the instruction sets PyTorch's and XLA's kernels use): the report
names its model and features (`common.cpu_description`).

Threads: `--threads k` pins the process to k CPUs before jax and torch start
(`bench/common.configure_threads`) and sets `torch.set_num_threads(k)`.

The reference source: `git clone https://github.com/NVlabs/alpamayo && git -C alpamayo checkout
1cba38c`, passed as --reference-src; NVIDIA's model code imports hydra-core, omegaconf and einops,
which must be importable (`pip install --target DIR hydra-core==1.3.8 omegaconf==2.3.0
antlr4-python3-runtime==4.9.3` and PYTHONPATH=DIR, as for `verify --stage 2`).

    python bench/inference_bench.py --reference-src ALPAMAYO_TREE [--threads 1] [--size 260m]
        [--rounds 3] [--max-new-tokens 64] [--image-size 224 384] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys

from common import configure_threads


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-src", required=True, help="an NVlabs/alpamayo source tree (commit 1cba38c)")
    parser.add_argument("--threads", type=int, default=1, help="CPUs to pin to and torch threads (default 1)")
    parser.add_argument("--size", default="260m", help="bench/common.py size (default 260m)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per framework (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, nargs=2, default=(224, 384), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    return parser


if __name__ == "__main__":
    ARGS = _parser().parse_args()
    PINNED = configure_threads(ARGS.threads)

import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from alpamayo_jax.inference.generation import cache_capacity, prefill  # noqa: E402
from alpamayo_jax.inference.inference_config import InferenceConfig  # noqa: E402
from alpamayo_jax.inference.pipeline import Pipeline, sample_from_inputs  # noqa: E402
from alpamayo_jax.processing.prompt import encode_prompt  # noqa: E402
from alpamayo_jax.processing.synthetic import synthetic_clip  # noqa: E402
from common import CPU_FEATURES, ReferenceStages, cpu_description, write_checkpoint  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls, as torch on CPU


class Reference:
    """NVIDIA's AlpamayoR1 from the checkpoint, with its stages timed by wrapping their calls."""

    def __init__(self, root: Path, hf: Path, vlm: Path):
        from alpamayo_reference.verify_training import import_torchvision

        for path in (root, root / "src"):
            if str(path) not in sys.path:
                sys.path.insert(0, str(path))
        import_torchvision([])  # transformers' Qwen3-VL processor module, which NVIDIA's code imports
        from alpamayo_r1.config import AlpamayoR1Config
        from alpamayo_r1.models.alpamayo_r1 import AlpamayoR1

        config = json.loads((hf / "config.json").read_text())
        config.update(vlm_name_or_path=str(vlm.absolute()), model_dtype="float32", attn_implementation="sdpa")
        self.model = AlpamayoR1.from_pretrained(str(hf), config=AlpamayoR1Config(**config), dtype=torch.float32)
        self.model.eval()
        self.timer = ReferenceStages(self.model)

    def run(self, prompt_ids: np.ndarray, pixels: np.ndarray, grid: np.ndarray, clip, max_new_tokens: int) -> dict:
        self.timer.reset()
        data = {
            "tokenized_data": {"input_ids": torch.from_numpy(prompt_ids.astype(np.int64)[None]),
                               "attention_mask": torch.ones((1, prompt_ids.size), dtype=torch.int64),
                               "pixel_values": torch.from_numpy(pixels),
                               "image_grid_thw": torch.from_numpy(grid.astype(np.int64))},
            "ego_history_xyz": torch.from_numpy(np.asarray(clip.ego_history_xyz, np.float32))[None, None],
            "ego_history_rot": torch.from_numpy(np.asarray(clip.ego_history_rot, np.float32))[None, None],
        }
        start = time.perf_counter()
        with torch.inference_mode():
            xyz, _ = self.model.sample_trajectories_from_data_with_vlm_rollout(
                data=data, top_p=0.98, temperature=0.6, num_traj_samples=1, max_generation_length=max_new_tokens)
        total = time.perf_counter() - start
        assert np.isfinite(xyz.numpy()).all()
        stages = self.timer.stages
        return {"total": total, **stages, "decode": stages["generate"] - stages["prefill"], "tokens": self.timer.tokens}


def jax_run(pipeline: Pipeline, inputs, settings: InferenceConfig, key) -> dict:
    start = time.perf_counter()
    samples = sample_from_inputs(pipeline, inputs, key, settings)
    total = time.perf_counter() - start
    generation = settings.generation_config(pipeline.config, pad_token_id=pipeline.tokenizer.pad_token_id)
    began = time.perf_counter()  # the prefill program alone (compiled by the run above)
    jax.block_until_ready(prefill(pipeline.split, inputs, capacity=cache_capacity(inputs.prompt_length,
                                                                                 settings.max_new_tokens),
                                  num_samples=1, stop_token_id=generation.stop_after_token_id))
    prefill_seconds = time.perf_counter() - began
    tokens = int(samples.num_generated_tokens.max())
    return {"total": total, "prefill": prefill_seconds, "generate": samples.timings["generate"],
            "decode": samples.timings["generate"] - prefill_seconds, "flow_matching": samples.timings["flow_matching"],
            "rollout": samples.timings["rollout"], "tokens": tokens}


def main() -> int:
    args = ARGS
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        hf, vlm = write_checkpoint(Path(scratch), args.seed, args.size)
        pipeline = Pipeline.load(hf, processor_dir=vlm)
        parameters = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(pipeline.model, nnx.Param)))
        clip = synthetic_clip(0, image_size=tuple(args.image_size))
        prompt_ids, pixels, grid = encode_prompt(clip.camera_frames, tokenizer=pipeline.tokenizer,
                                                 chat_template=pipeline.chat_template, config=pipeline.config)
        inputs = pipeline.prepare(clip)
        settings = InferenceConfig.from_model(pipeline.config, max_new_tokens=args.max_new_tokens)
        reference = Reference(Path(args.reference_src), hf, vlm)

        first_jax = jax_run(pipeline, inputs, settings, jax.random.key(args.seed))
        first_reference = reference.run(prompt_ids, pixels, grid, clip, args.max_new_tokens)
        runs = {"jax": [], "reference": []}
        for round_ in range(args.rounds):
            runs["jax"].append(jax_run(pipeline, inputs, settings, jax.random.key(args.seed + 1 + round_)))
            runs["reference"].append(reference.run(prompt_ids, pixels, grid, clip, args.max_new_tokens))

    def median(side: str, stage: str) -> float:
        return statistics.median(run[stage] for run in runs[side])

    def per_token(side: str) -> float:
        return statistics.median(run["decode"] / max(run["tokens"] - 1, 1) for run in runs[side])

    stages = ["total", "prefill", "decode", "flow_matching", "rollout"]
    report = {
        "size": args.size, "parameters": parameters, "prompt_tokens": int(inputs.prompt_length),
        "threads": args.threads, "pinned_cpus": PINNED, "max_new_tokens": args.max_new_tokens,
        "jax": {stage: median("jax", stage) for stage in stages} | {"decode_per_token": per_token("jax")},
        "reference": {stage: median("reference", stage) for stage in stages}
        | {"decode_per_token": per_token("reference")},
        "tokens": {side: [run["tokens"] for run in runs[side]] for side in runs},
        "first_call": {"jax": first_jax["total"], "reference": first_reference["total"]},
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "cpu": cpu_description(),
    }
    cpu = report["cpu"]
    print(f"{args.size}: {parameters / 1e6:.0f} M parameters, {report['prompt_tokens']}-token prompt, "
          f"{args.threads} thread(s) pinned to CPU {PINNED}; tokens generated {report['tokens']}")
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; of {', '.join(CPU_FEATURES)} it has "
          f"{', '.join(cpu['features']) or 'none'}")
    print(f"{'stage':<18}{'alpamayo-jax s':>16}{'reference s':>14}{'speed-up':>10}")
    for stage in [*stages, "decode_per_token"]:
        ours, theirs = report["jax"][stage], report["reference"][stage]
        print(f"{stage:<18}{ours:>16.4f}{theirs:>14.4f}{theirs / ours:>9.2f}x")
    print(f"first call: alpamayo-jax {first_jax['total']:.1f} s (compiles), reference {first_reference['total']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
