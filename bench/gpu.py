"""GPU benchmark: the full-size Alpamayo-R1-10B with random weights on one GPU, stage by stage, for
1 and 6 trajectory samples, with NVIDIA's PyTorch reference on the same GPU when it is installed.

The model. `--size 10b` (default) is configs/alpamayo_r1_10b.json + configs/qwen3_vl_8b_backbone.json
(11.1e9 parameters); `tiny` is the reference fixture's architecture (tests/fixtures/tiny_ar1_dev),
`medium` and `260m` bench/common.py's wider and deeper versions of it. No checkpoint: the model is
built abstractly (`nn/abstract.abstract_module`) and its parameters are made on the device
from those shapes and dtypes, by jitted programs (one per shape): normal(0, --std 0.02) kernels and
embeddings, norm scales at one, biases at zero (nothing is materialised on the host); the buffers
(Fourier frequencies, action statistics) are the constructor's, computed by one more jitted program.
--dtype bfloat16 (default) or float32 (then matmuls at "highest" precision, as torch's float32).

Tokenizer. The 10B ids need the Qwen3 vocabulary (151669 entries, `<|image_pad|>` = 151655): a
stand-in with that size and those added tokens (bench/convert_bench.py's `qwen_sized_tokenizer`,
with a byte-level pre-tokenizer so that the prompt text splits into about as many tokens as Qwen's
BPE gives) is extended the reference's way (`build_tokenizer`, which checks every id against the
config: 155697 entries). The small sizes use the fixture's own tokenizer. The chat template is the
fixture's (Qwen3-VL's).

Input: one synthetic clip (`synthetic_clip`: 4 cameras x 4 frames of uint8 RGB at --image-size,
default 1080 x 1920) and its 16-pose ego history, prepared by `Pipeline.prepare`: for the 10B
model each frame is resized to 320 x 576 (180 merged patches), a 3007-token prompt.

What is timed, per sample count S (--samples, default 1 and 6), after one untimed warm-up call
(for JAX: tracing and compiling, no persistent cache; its end-to-end time is reported as
first_call), --rounds timed calls (default 3), medians reported:

* end_to_end: `sample_trajectories` on the clip (frames and history in, trajectories and text out);
* preprocess, decode, flow_matching (the --flow-steps Euler steps of the expert, default the
  config's 10), rollout: its own `timings` (`prepare_inputs`; `generate` minus the prefill;
  `flow_matching`; `rollout`, with the transfer of the results to the host);
* vision_prefill: the prefill program (vision tower + language-model prefill into the cache of S
  rows) timed alone, the same compiled program called once more after each timed run;
* decode_per_token: decode / (tokens - 1), tokens being the rollout's steps (the first token is
  drawn from the prefill's logits, each later one costs one decode forward). With random weights
  a rollout rarely stops early: --max-new-tokens (default 64) is a fixed budget and the tokens
  actually generated are reported.
* attention: which kernel the prefill's causal attention uses (`nn.attention.use_fused_attention`:
  cuDNN's fused kernel on a GPU in 16-bit floats, XLA otherwise) and, for cuDNN, its time and
  largest difference from XLA's at the prompt's length, before the rounds;
* peak memory: `jax.devices()[0].memory_stats()["peak_bytes_in_use"]` after the rounds (JAX
  cannot reset it: the S = 6 figure is the peak of the whole process so far, the parameters
  alone are `bytes_after_build`); n/a (null) where the backend keeps no statistics (the CPU).

The reference (--reference-src TREE: NVlabs/alpamayo at commit 1cba38c; hydra-core, omegaconf,
einops and transformers importable, see bench/inference_bench.py). NVIDIA's `AlpamayoR1` is built
from the same configs with the same stand-in tokenizer, random weights (its own initialisation,
dtype --dtype), on "cuda" (on the CPU only with --allow-cpu), and run as NVIDIA's
test_inference.py runs it: its processor's `apply_chat_template` on the same frames (timed as
preprocess, with the copy to the device), then
`sample_trajectories_from_data_with_vlm_rollout` (top-p 0.98, temperature 0.6,
`num_traj_samples` = S) under `torch.autocast("cuda", dtype=torch.bfloat16)` (none for
float32). Its stages are
timed by wrapping the calls (with `torch.cuda.synchronize()`): the first `vlm.forward` of
`vlm.generate` is vision_prefill, the rest of `generate` is decode, `diffusion.sample`
flow_matching, `action_space.action_to_traj` rollout; peak memory is
`torch.cuda.max_memory_allocated()`, reset per sample count. For S > 1 the reference repeats the
prompt and images before its prefill (vision tower and prefill run S times), we prefill once
and repeat the cache (alpamayo_jax/inference/generation.py). It runs in a child process (this
script with --reference-only, JAX on the CPU there), after the JAX rounds, so that the two CUDA
runtimes never share a process; with a reference the JAX process takes at most 40% of the GPU's
memory (XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 unless set), leaving the rest to torch. The child also
checks that the reference processor's prompt (ids, image grid) equals ours. Without torch, CUDA
or the tree, the reference is reported as skipped, with the reason.

Time: on one H200 the whole run should take about 4-8 minutes (estimated, not yet measured):
building the model well under a minute, compiling the prefill, decode and flow programs (layers
unrolled) about 1-2 minutes per sample count, seconds per timed round; the reference 1-2 minutes
more. With --json the file is rewritten after each sample count, so a run cut short keeps what it
finished. --compilation-cache DIR keeps the compiled programs for a second run (first_call then
measures loading, not compiling). `--size 10b` refuses to run without a GPU unless --allow-cpu is
given. Smoke test on a CPU (under a minute):

    python bench/gpu.py --size tiny --rounds 1 --max-new-tokens 8 --image-size 64 96 --threads 1

    python bench/gpu.py [--size 10b] [--dtype bfloat16] [--samples 1 6] [--rounds 3]
        [--max-new-tokens 64] [--image-size 1080 1920] [--reference-src ALPAMAYO_TREE]
        [--allow-cpu] [--threads K] [--compilation-cache DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

from common import configure_threads

SIZES = ("10b", "tiny", "medium", "260m")
SIDES = ("jax", "reference")
STAGES = ("preprocess", "vision_prefill", "decode", "decode_per_token", "flow_matching", "rollout",
          "end_to_end")
JAX_MEMORY_FRACTION = "0.4"  # of the GPU's memory, when the reference runs after JAX


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="10b", help="model size (default 10b)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--samples", type=int, nargs="+", default=(1, 6), help="trajectory samples per run "
                        "(default 1 6)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per sample count (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--flow-steps", type=int, default=None,
                        help="Euler steps (default: the config's, 10)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(1080, 1920), metavar=("H", "W"))
    parser.add_argument("--std", type=float, default=0.02, help="standard deviation of the random weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-src", help="an NVlabs/alpamayo source tree (commit 1cba38c)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run --size 10b (and the reference) without a GPU")
    parser.add_argument("--threads", type=int, help="pin to this many CPUs (bench/common.configure_threads) "
                        "and set torch's threads; default: no pinning")
    parser.add_argument("--compilation-cache", metavar="DIR", help="a persistent compilation cache (default: "
                        "none, so that the warm-up call compiles everything)")
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--json", help="also write the results here")
    return parser


if __name__ == "__main__":
    ARGS = _parser().parse_args()
    if ARGS.threads:
        configure_threads(ARGS.threads)
    if ARGS.reference_src and not ARGS.reference_only:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_MEMORY_FRACTION)

import copy  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from alpamayo_jax.config import AlpamayoConfig, load_preset_json  # noqa: E402
from alpamayo_jax.inference.generation import cache_capacity, prefill  # noqa: E402
from alpamayo_jax.inference.inference_config import InferenceConfig  # noqa: E402
from alpamayo_jax.inference.pipeline import Pipeline, sample_trajectories  # noqa: E402
from alpamayo_jax.models.alpamayo import AlpamayoR1  # noqa: E402
from alpamayo_jax.nn.abstract import FixedKeyRngs, abstract_module  # noqa: E402
from alpamayo_jax.nn.attention import causal_attention, fused_attention, use_fused_attention  # noqa: E402
from alpamayo_jax.nn.variables import Buffer  # noqa: E402
from alpamayo_jax.processing.chat_template import load_chat_template  # noqa: E402
from alpamayo_jax.processing.prompt import encode_prompt  # noqa: E402
from alpamayo_jax.processing.synthetic import synthetic_clip  # noqa: E402
from alpamayo_jax.processing.tokenizer import build_tokenizer  # noqa: E402
from common import FIXTURE, ReferenceStages, scaled_configs  # noqa: E402

GIB = 2**30


# ---------------------------------------------------------------------------------------------
# Configs and the processor directory (tokenizer, chat template, image processor, backbone config)
# ---------------------------------------------------------------------------------------------


def model_configs(size: str) -> tuple[dict, dict]:
    """The Alpamayo and backbone config dicts of `size`."""
    if size == "10b":
        return load_preset_json("alpamayo_r1_10b"), load_preset_json("qwen3_vl_8b_backbone")
    if size == "tiny":
        return (json.loads((FIXTURE / "hf/config.json").read_text()),
                json.loads((FIXTURE / "vlm/config.json").read_text()))
    return scaled_configs(size)


def write_processor_dir(directory: Path, size: str, backbone: dict) -> Path:
    """A processor directory both sides load: for the small sizes the fixture's (its tokenizer);
    for 10b the Qwen-sized stand-in tokenizer, the fixture's chat template and image processor
    configs with the 10B patch sizes. Its config.json is the backbone config."""
    if size != "10b":
        shutil.copytree(FIXTURE / "vlm", directory)
    else:
        import tokenizers
        from convert_bench import qwen_sized_tokenizer

        directory.mkdir(parents=True)
        tokenizer = qwen_sized_tokenizer()
        # Split the text as a byte-level BPE would (every piece is then <unk>), for a realistic length.
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "Qwen2TokenizerFast", "processor_class": "Qwen3VLProcessor",
            "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False, "errors": "replace",
            "split_special_tokens": False, "model_max_length": 262144, "extra_special_tokens": {}}, indent=2))
        shutil.copy(FIXTURE / "vlm/chat_template.jinja", directory / "chat_template.jinja")
        vision = backbone["vision_config"]
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            processor = json.loads((FIXTURE / "vlm" / name).read_text())
            processor.update(patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                             temporal_patch_size=vision["temporal_patch_size"])
            (directory / name).write_text(json.dumps(processor, indent=2))
    (directory / "config.json").write_text(json.dumps(backbone, indent=2))
    return directory


# ---------------------------------------------------------------------------------------------
# alpamayo-jax
# ---------------------------------------------------------------------------------------------


def random_model(config: AlpamayoConfig, dtype, seed: int, std: float) -> tuple[AlpamayoR1, int]:
    """The model with random parameters made on the default device (see the module docstring)
    and its parameter count (buffers included)."""
    abstract = abstract_module(AlpamayoR1, config, param_dtype=dtype)
    graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(abstract)))

    def name(path) -> str:  # the variable's attribute name: (..., 'kernel', .value) -> 'kernel'
        keys = [getattr(entry, "key", None) for entry in path]
        return next(str(key) for key in reversed(keys) if key is not None)

    key = jax.random.key(seed)
    values = []
    for index, (path, leaf) in enumerate(leaves):
        kind = name(path)
        if kind == "scale":
            values.append(jnp.ones(leaf.shape, leaf.dtype))
        elif kind == "bias":
            values.append(jnp.zeros(leaf.shape, leaf.dtype))
        else:
            values.append(_normal(key, index, std, shape=leaf.shape, dtype=leaf.dtype))
    concrete = jax.tree_util.tree_unflatten(treedef, values)
    # The constructor's buffers; its parameter initialisers are dead code in this program.
    def buffers() -> nnx.State:
        return nnx.split(AlpamayoR1(config, param_dtype=dtype, rngs=FixedKeyRngs()), nnx.Param, ...)[2]

    rest = jax.jit(buffers)()
    model = nnx.merge(graphdef, concrete, rest)
    # Every variable is a parameter or a buffer (a new kind would be left uninitialised here).
    known = nnx.state(model, nnx.Any(nnx.Param, Buffer))
    assert len(jax.tree.leaves(known)) == len(jax.tree.leaves(nnx.state(model)))
    return model, count


# One program per (shape, dtype): the 10B model's 1159 parameters have 33 (one program for all of
# them would inline a random-number generator per parameter and compile for minutes).
@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key, index, std, *, shape, dtype):
    return (std * jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)).astype(dtype)


def device_memory() -> dict[str, int] | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats


def jax_round(pipeline: Pipeline, clip, inputs, settings: InferenceConfig, key) -> dict:
    """One timed `sample_trajectories` call and the prefill program timed alone after it."""
    start = time.perf_counter()
    samples = sample_trajectories(pipeline, clip, key, settings)
    total = time.perf_counter() - start
    if not np.isfinite(samples.xyz).all():
        raise RuntimeError("the trajectories are not finite")
    generation = settings.generation_config(pipeline.config, pad_token_id=pipeline.tokenizer.pad_token_id)
    began = time.perf_counter()  # the same compiled program as in the run above
    jax.block_until_ready(prefill(pipeline.split, inputs,
                                  capacity=cache_capacity(inputs.prompt_length, settings.max_new_tokens),
                                  num_samples=settings.num_samples,
                                  stop_token_id=generation.stop_after_token_id))
    prefill_seconds = time.perf_counter() - began
    timings = samples.timings
    tokens = len(samples.generated_token_ids[0][0])  # the rollout's steps (equal for all rows)
    decode = timings["generate"] - prefill_seconds
    return {"preprocess": timings["prepare_inputs"], "vision_prefill": prefill_seconds, "decode": decode,
            "decode_per_token": decode / max(tokens - 1, 1), "flow_matching": timings["flow_matching"],
            "rollout": timings["rollout"], "end_to_end": total, "tokens": tokens}


def run_jax(args, config_dict: dict, backbone: dict, processor_dir: Path, clip, save) -> dict:
    dtype = jnp.dtype(args.dtype)
    config = AlpamayoConfig.from_hf_config(config_dict, backbone)
    tokenizer = build_tokenizer(processor_dir, config)  # checks every id against the config
    start = time.perf_counter()
    model, parameters = random_model(config, dtype, args.seed, args.std)
    jax.block_until_ready(nnx.state(model))
    build_seconds = time.perf_counter() - start
    after_build = device_memory()
    pipeline = Pipeline.from_model(model, tokenizer, load_chat_template(processor_dir))
    inputs = pipeline.prepare(clip)
    if int(inputs.input_ids.max()) >= config.text.vocab_size or int(inputs.input_ids.min()) < 0:
        raise RuntimeError(f"prompt ids outside [0, {config.text.vocab_size})")
    device = jax.devices()[0]
    report = {"device": f"{device} ({device.device_kind})", "backend": jax.default_backend(),
              "parameters": parameters,
              "prompt_tokens": int(inputs.prompt_length), "build_s": build_seconds,
              "bytes_after_build": None if after_build is None else after_build.get("bytes_in_use")}
    print(f"alpamayo-jax on {report['device']}: {_count(parameters)} parameters ({args.dtype}) built in "
          f"{build_seconds:.1f} s, {report['prompt_tokens']}-token prompt", flush=True)
    report["attention"] = attention = attention_kernels(config, dtype, report["prompt_tokens"], args.seed)
    if attention["kernel"] == "cudnn":
        print(f"  prefill attention: cuDNN {attention['cudnn_s'] * 1e3:.2f} ms, "
              f"XLA {attention['xla_s'] * 1e3:.2f} ms, "
              f"largest difference {attention['max_difference']:.2e} of the largest output", flush=True)
    else:
        print("  prefill attention: XLA (cuDNN's fused kernel needs a GPU and 16-bit floats)", flush=True)
    for num_samples in args.samples:
        settings = InferenceConfig.from_model(config, num_samples=num_samples,
                                              max_new_tokens=args.max_new_tokens,
                                              num_flow_steps=args.flow_steps)
        first = jax_round(pipeline, clip, inputs, settings, jax.random.key(args.seed))
        print(f"  {num_samples} sample(s): warm-up (compiles) {first['end_to_end']:.1f} s", flush=True)
        rounds = [jax_round(pipeline, clip, inputs, settings, jax.random.key(args.seed + 1 + r))
                  for r in range(args.rounds)]
        memory = device_memory()
        report[str(num_samples)] = summarise(rounds) | {
            "first_call": first["end_to_end"],
            "peak_bytes": None if memory is None else memory.get("peak_bytes_in_use")}
        save(report)
    return report


def attention_kernels(config: AlpamayoConfig, dtype, num_tokens: int, seed: int) -> dict:
    """The prefill's causal attention at the language model's head shape and the prompt's length:
    which kernel `causal_attention` uses here, and, where that is cuDNN's, its largest difference
    from XLA's (`fused_attention(implementation="xla")`) relative to the largest output, and the
    time of each (median of 5 calls)."""
    text = config.text
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (1, num_tokens, text.num_attention_heads, text.head_dim), dtype)
    k, v = (jax.random.normal(key, (1, text.num_key_value_heads, num_tokens, text.head_dim), dtype)
            for key in keys[1:])
    key_mask = jnp.ones((1, num_tokens), bool)
    report = {"kernel": "cudnn" if use_fused_attention(q) else "xla", "tokens": num_tokens}
    if report["kernel"] == "xla":
        return report

    def timed(fn) -> tuple[jax.Array, float]:
        out = jax.block_until_ready(fn(q, k, v))
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            seconds.append(time.perf_counter() - start)
        return out, statistics.median(seconds)

    fused, report["cudnn_s"] = timed(jax.jit(lambda q, k, v: causal_attention(q, k, v, key_mask)))
    xla, report["xla_s"] = timed(jax.jit(lambda q, k, v: fused_attention(
        q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), key_mask, causal=True, implementation="xla")))
    difference = jnp.abs(fused.astype(jnp.float32) - xla.astype(jnp.float32)).max()
    report["max_difference"] = float(difference / jnp.abs(xla.astype(jnp.float32)).max())
    return report


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 1e9 else f"{parameters / 1e6:.1f} M"


def summarise(rounds: list[dict]) -> dict:
    return {stage: statistics.median(r[stage] for r in rounds) for stage in STAGES} | {
        "tokens": [r["tokens"] for r in rounds]}


# ---------------------------------------------------------------------------------------------
# The PyTorch reference (in a child process: --reference-only)
# ---------------------------------------------------------------------------------------------


class Reference:
    """NVIDIA's AlpamayoR1 built from the config with random weights on `device`, its stages timed
    by `common.ReferenceStages` (with device synchronisation), with its own preprocessing and S
    samples."""

    def __init__(self, root: Path, config_dict: dict, processor_dir: Path, dtype_name: str, device,
                 seed: int):
        import torch

        for path in (root, root / "src"):
            if str(path) not in sys.path:
                sys.path.insert(0, str(path))
        try:
            from alpamayo_reference.verify_training import import_torchvision
            import_torchvision([])  # transformers' Qwen3-VL processor module, which NVIDIA's code imports
        except ImportError:
            pass
        from alpamayo_r1 import helper
        from alpamayo_r1.config import AlpamayoR1Config
        from alpamayo_r1.models.alpamayo_r1 import AlpamayoR1 as TorchAlpamayoR1

        self.torch, self.helper, self.device = torch, helper, device
        # Random weights rarely write <|traj_future_start|>: one warning per row and call otherwise.
        logging.getLogger("alpamayo_r1.models.alpamayo_r1").setLevel(logging.ERROR)
        self.dtype = getattr(torch, dtype_name)
        config = copy.deepcopy(config_dict)
        config.update(vlm_name_or_path=str(processor_dir.absolute()), model_dtype=dtype_name,
                      dtype=dtype_name, attn_implementation="sdpa")
        config = AlpamayoR1Config(**config)  # loads the processor directory
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # as from_pretrained(dtype=...) builds
        try:
            with torch.device(device):  # parameters made and initialised there
                self.model = TorchAlpamayoR1(config)
        finally:
            torch.set_default_dtype(default)
        self.model.eval()
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.timer = ReferenceStages(self.model, sync=self.sync)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def frames(self, clip):
        """The clip's frames as the (N, 3, H, W) uint8 tensor NVIDIA's loader gives (not timed: our
        side, too, takes the frames as they are)."""
        frames = np.array(clip.camera_frames)  # a writable copy
        return self.torch.from_numpy(frames.reshape(-1, *frames.shape[2:]))

    def preprocess(self, clip, frames) -> dict:
        """NVIDIA's test_inference.py preprocessing: its processor's chat template on the frames."""
        torch = self.torch
        messages = self.helper.create_message(frames)
        inputs = self.model.processor.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=False, continue_final_message=True,
            return_dict=True, return_tensors="pt")
        return self.helper.to_device({
            "tokenized_data": inputs,
            "ego_history_xyz": torch.from_numpy(np.array(clip.ego_history_xyz, np.float32))[None, None],
            "ego_history_rot": torch.from_numpy(np.array(clip.ego_history_rot, np.float32))[None, None],
        }, self.device)

    def run(self, clip, num_samples: int, max_new_tokens: int, seed: int) -> dict:
        torch = self.torch
        self.timer.reset()
        frames = self.frames(clip)
        torch.manual_seed(seed)
        self.sync()
        start = time.perf_counter()
        data = self.preprocess(clip, frames)
        self.sync()
        preprocess = time.perf_counter() - start
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.dtype == torch.bfloat16):
            xyz, _ = self.model.sample_trajectories_from_data_with_vlm_rollout(
                data=data, top_p=0.98, temperature=0.6, num_traj_samples=num_samples,
                max_generation_length=max_new_tokens)
        self.sync()
        total = time.perf_counter() - start
        if not torch.isfinite(xyz.float()).all():
            raise RuntimeError("the reference's trajectories are not finite")
        stages, tokens = self.timer.stages, self.timer.tokens
        decode = stages["generate"] - stages["prefill"]
        return {"preprocess": preprocess, "vision_prefill": stages["prefill"], "decode": decode,
                "decode_per_token": decode / max(tokens - 1, 1),
                "flow_matching": stages["flow_matching"], "rollout": stages["rollout"],
                "end_to_end": total, "tokens": tokens}


def reference_not_requested(args) -> str | None:
    """Why the reference is not run, as far as can be told without importing torch."""
    if not args.reference_src:
        return "not requested (--reference-src ALPAMAYO_TREE)"
    if not Path(args.reference_src, "src/alpamayo_r1").is_dir():
        return f"{args.reference_src} is not an NVlabs/alpamayo tree (no src/alpamayo_r1)"
    return None


def reference_unavailable(args) -> tuple[str | None, object]:
    """(why the reference cannot run, or None; the torch device). Imports torch: in the child only."""
    why = reference_not_requested(args)
    if why:
        return why, None
    try:
        import torch
    except ImportError as error:
        return f"torch is not installed ({error})", None
    if torch.cuda.is_available():
        return None, torch.device("cuda")
    if args.allow_cpu:
        return None, torch.device("cpu")
    return (f"CUDA is not available to torch {torch.__version__} (pass --allow-cpu to run the reference on "
            "the CPU)"), None


def run_reference(args, config_dict: dict, backbone: dict, processor_dir: Path, clip) -> dict:
    """The reference's rounds (in the child process)."""
    why, device = reference_unavailable(args)
    if why:
        return {"skipped": why}
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    reference = Reference(Path(args.reference_src), config_dict, processor_dir, args.dtype, device, args.seed)
    reference.sync()
    report = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else device),
              "parameters": reference.parameters, "build_s": time.perf_counter() - start,
              "versions": {"torch": torch.__version__}}
    cuda = device.type == "cuda"
    if cuda:
        report["bytes_after_build"] = torch.cuda.memory_allocated(device)
    # The same prompt as ours? (our processing, on the CPU here)
    config = AlpamayoConfig.from_hf_config(config_dict, backbone)
    ours, _, our_grid = encode_prompt(clip.camera_frames, tokenizer=build_tokenizer(processor_dir, config),
                                      chat_template=load_chat_template(processor_dir), config=config)
    theirs = reference.preprocess(clip, reference.frames(clip))["tokenized_data"]
    report["same_prompt"] = bool(np.array_equal(theirs["input_ids"][0].cpu().numpy(), ours)
                                 and np.array_equal(theirs["image_grid_thw"].cpu().numpy(), our_grid))
    report["prompt_tokens"] = int(theirs["input_ids"].shape[1])
    print(f"reference on {report['device']}: {_count(reference.parameters)} parameters built in "
          f"{report['build_s']:.1f} s, {report['prompt_tokens']}-token prompt "
          f"({'the same as' if report['same_prompt'] else 'DIFFERENT from'} ours)", flush=True)
    for num_samples in args.samples:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        first = reference.run(clip, num_samples, args.max_new_tokens, args.seed)
        print(f"  {num_samples} sample(s): first call {first['end_to_end']:.1f} s", flush=True)
        rounds = [reference.run(clip, num_samples, args.max_new_tokens, args.seed + 1 + r)
                  for r in range(args.rounds)]
        report[str(num_samples)] = summarise(rounds) | {
            "first_call": first["end_to_end"],
            "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}
    return report


def reference_in_child(args) -> dict:
    """Runs this script with --reference-only in a child process (JAX on the CPU there) and
    returns its report."""
    why = reference_not_requested(args)
    if why:
        return {"skipped": why}
    print("running the reference in a child process", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "reference.json"
        command = [sys.executable, str(Path(__file__).absolute()), "--reference-only", "--json", str(out),
                   *_child_arguments(args)]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
        code = subprocess.run(command, check=False, env=env).returncode
        if code != 0 or not out.is_file():
            return {"skipped": f"failed: the reference process exited with status {code} "
                               "(its output is above)"}
        return json.loads(out.read_text())["reference"]


def _child_arguments(args) -> list[str]:
    values = ["--size", args.size, "--dtype", args.dtype, "--samples", *map(str, args.samples),
              "--rounds", str(args.rounds), "--max-new-tokens", str(args.max_new_tokens),
              "--image-size", *map(str, args.image_size), "--seed", str(args.seed),
              "--reference-src", args.reference_src]
    if args.flow_steps is not None:
        values += ["--flow-steps", str(args.flow_steps)]
    if args.allow_cpu:
        values.append("--allow-cpu")
    if args.threads:
        values += ["--threads", str(args.threads)]
    return values


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def print_table(report: dict, samples) -> None:
    sides = [side for side in SIDES if "skipped" not in report[side]]
    columns = [(s, side) for s in samples for side in sides]
    names = {"jax": "jax", "reference": "torch"}
    print(f"\n{'stage (ms)':<20}" + "".join(f"{f'S={s} {names[side]}':>14}" for s, side in columns))
    for stage in STAGES:
        cells = [report[side][str(s)][stage] * 1e3 for s, side in columns]
        print(f"{stage:<20}" + "".join(f"{cell:>14.1f}" for cell in cells))
    def row(name: str, cell) -> None:
        print(f"{name:<20}" + "".join(cell(report[side][str(s)]) for s, side in columns))

    row("tokens", lambda part: f"{max(part['tokens']):>14d}")
    row("first call (s)", lambda part: f"{part['first_call']:>14.1f}")
    row("peak memory (GiB)", lambda part: f"{'n/a':>14}" if part["peak_bytes"] is None
        else f"{part['peak_bytes'] / GIB:>14.2f}")
    for side in SIDES:
        if "skipped" in report[side]:
            print(f"{side}: skipped: {report[side]['skipped']}")
    if "reference" in sides and not report["reference"].get("same_prompt", True):
        print("warning: the reference processor's prompt differs from ours")


def main() -> int:
    args = ARGS
    if args.rounds < 1 or args.max_new_tokens < 2 or min(args.samples) < 1:
        raise SystemExit("need --rounds >= 1, --max-new-tokens >= 2 and --samples >= 1")
    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")  # as torch's float32 matmuls
    on_cpu = not args.reference_only and jax.default_backend() == "cpu"
    if on_cpu and args.size == "10b" and not args.allow_cpu:
        raise SystemExit(f"no GPU found (JAX's backend is the CPU: {jax.devices()}): --size 10b needs "
                         "about 25 GiB of accelerator memory. Use --size tiny for a smoke test, or pass "
                         "--allow-cpu to run it on the CPU anyway.")
    if args.compilation_cache:
        from alpamayo_jax.compilation_cache import setup_compilation_cache

        setup_compilation_cache(args.compilation_cache)

    def save(partial: dict) -> None:  # after each sample count, so that a run cut short leaves its results
        if args.json:
            Path(args.json).write_text(json.dumps(partial, indent=2) + "\n")

    config_dict, backbone = model_configs(args.size)
    clip = synthetic_clip(args.seed, image_size=tuple(args.image_size))
    report = {"size": args.size, "dtype": args.dtype, "samples": list(args.samples), "rounds": args.rounds,
              "max_new_tokens": args.max_new_tokens, "image_size": list(args.image_size),
              "versions": {"jax": jax.__version__}}
    with tempfile.TemporaryDirectory() as scratch:
        processor_dir = write_processor_dir(Path(scratch) / "processor", args.size, backbone)
        if args.reference_only:
            try:
                report["reference"] = run_reference(args, config_dict, backbone, processor_dir, clip)
            except Exception:  # noqa: BLE001 (reported, and the parent goes on without it)
                traceback.print_exc()
                return 1
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            return 0
        report["jax"] = run_jax(args, config_dict, backbone, processor_dir, clip,
                                save=lambda part: save(report | {"jax": part}))
    report["reference"] = reference_in_child(args)
    save(report)
    print_table(report, args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
