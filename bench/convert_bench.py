"""Conversion benchmark: a synthetic multi-GB sharded bf16 checkpoint -> bundle.

Writes a random-weight checkpoint with the real key layout (the 10B vocabulary and vision tower,
narrower and shallower decoders so that it fits this machine), converts it in a child process and
reports the child's peak resident memory against the largest tensor, and the throughput.

    python bench/convert_bench.py [--workdir DIR] [--layers 8] [--shard-gb 1.0]

With --workdir, the checkpoint is kept there and reused by later runs with the same settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tokenizers

from alpamayo_jax.config import AlpamayoConfig, load_preset_json
from alpamayo_jax.io.assign import export_plan
from alpamayo_jax.io.safetensors import write_safetensors
from alpamayo_jax.io.weight_map import alpamayo_rules
from alpamayo_jax.models.alpamayo import AlpamayoR1
from alpamayo_jax.nn.abstract import abstract_module


class RandomTensors:
    """A lazy mapping key -> random bf16 tensor of the planned shape (made when read)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int):
        self.shapes, self.seed = shapes, seed

    def describe(self):
        return {k: (s, np.dtype(ml_dtypes.bfloat16)) for k, s in self.shapes.items()}

    def __getitem__(self, key):
        rng = np.random.default_rng([self.seed, sorted(self.shapes).index(key)])
        return (rng.standard_normal(self.shapes[key], np.float32) * 0.02).astype(ml_dtypes.bfloat16)


def qwen_sized_tokenizer() -> tokenizers.Tokenizer:
    """A stand-in with the Qwen3 tokenizer's size and image/vision ids (no real merges): 151643
    plain entries, then its 26 added tokens, so that the 10B token ids check out."""
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
             "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
             "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
             "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
             "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(151643)}, unk_token="w0"))
    tokenizer.add_special_tokens(added)
    return tokenizer


def synthetic_configs(layers: int) -> tuple[dict, dict]:
    config, backbone = copy.deepcopy(load_preset_json("alpamayo_r1_10b")), copy.deepcopy(load_preset_json("qwen3_vl_8b_backbone"))
    backbone["text_config"].update(hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers,
                                   num_attention_heads=16)
    backbone["vision_config"].update(depth=9, deepstack_visual_indexes=[2, 5, 8], out_hidden_size=2048)
    config["expert_cfg"].update(hidden_size=1024, intermediate_size=4096, num_attention_heads=8)
    return config, backbone


def write_checkpoint(directory: Path, layers: int, shard_bytes: float) -> tuple[int, int]:
    config, backbone = synthetic_configs(layers)
    parsed = AlpamayoConfig.from_hf_config(config, backbone)
    model = abstract_module(AlpamayoR1, parsed, param_dtype=jnp.bfloat16)
    shapes = {key: shape for key, (_, _, shape) in export_plan(model, alpamayo_rules()).items()}
    directory.mkdir(parents=True)
    vlm = directory / "vlm"
    vlm.mkdir()
    fixture_vlm = Path(__file__).parents[1] / "tests/fixtures/tiny_ar1_dev/vlm"
    for name in ("chat_template.jinja", "preprocessor_config.json"):
        shutil.copy(fixture_vlm / name, vlm / name)
    qwen_sized_tokenizer().save(str(vlm / "tokenizer.json"))
    (vlm / "config.json").write_text(json.dumps(backbone))
    hf = directory / "hf"
    hf.mkdir()
    config["vlm_name_or_path"] = "../vlm"
    (hf / "config.json").write_text(json.dumps(config))
    # Shards of about shard_bytes, filled in key order.
    shards, current, size = [], [], 0
    for key in sorted(shapes):
        nbytes = math.prod(shapes[key]) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    weight_map = {}
    tensors = RandomTensors(shapes, seed=0)
    for index, keys in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(hf / name, _Subset(tensors, keys))
        weight_map.update({k: name for k in keys})
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    total = sum(math.prod(s) * 2 for s in shapes.values())
    largest = max(math.prod(s) * 2 for s in shapes.values())
    return total, largest


class _Subset:
    def __init__(self, tensors: RandomTensors, keys: list[str]):
        self.tensors, self.keys = tensors, keys

    def describe(self):
        layout = self.tensors.describe()
        return {k: layout[k] for k in self.keys}

    def __getitem__(self, key):
        return self.tensors[key]


# Peak RSS of the current process image: VmHWM (getrusage's ru_maxrss survives exec, so a child
# would report its parent's peak).
PEAK_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
CHILD = f"""
import sys, time
from alpamayo_jax.io.convert import convert_checkpoint
start = time.perf_counter()
report = convert_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3])
seconds = time.perf_counter() - start
print(report["num_tensors"], seconds, {PEAK_RSS})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="alpamayo-convert-bench-"))
    try:
        started = time.perf_counter()
        source, marker = workdir / "src", workdir / "src/bench.json"
        settings = {"layers": args.layers, "shard_gb": args.shard_gb}
        stored = json.loads(marker.read_text()) if marker.is_file() else {}
        if {k: stored.get(k) for k in settings} == settings:
            total, largest = stored["total"], stored["largest"]
            how = "reused from an earlier run"
        else:
            shutil.rmtree(source, ignore_errors=True)
            total, largest = write_checkpoint(source, args.layers, args.shard_gb * 2**30)
            marker.write_text(json.dumps({**settings, "total": total, "largest": largest}))  # last: complete
            how = f"written in {time.perf_counter() - started:.1f} s"
        print(f"synthetic checkpoint: {total / 2**30:.2f} GiB bf16, largest tensor {largest / 2**20:.0f} MiB, {how}")
        shutil.rmtree(workdir / "bundle", ignore_errors=True)
        baseline = subprocess.run([sys.executable, "-c", f"import alpamayo_jax.io.convert; print({PEAK_RSS})"],
                                  capture_output=True, text=True, check=True)
        imports_rss = int(baseline.stdout.split()[-1])
        result = subprocess.run([sys.executable, "-c", CHILD, str(workdir / "src/hf"), str(workdir / "src/vlm"),
                                 str(workdir / "bundle")], capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"conversion failed:\n{result.stderr}")
        tensors, seconds, peak = result.stdout.split()[-3:]
        seconds, peak = float(seconds), int(peak)
        print(f"converted {tensors} tensors in {seconds:.1f} s: {total / seconds / 2**30:.3f} GiB/s")
        print(f"peak RSS {peak / 2**30:.2f} GiB; after imports alone {imports_rss / 2**30:.2f} GiB; "
              f"conversion adds {(peak - imports_rss) / 2**20:.0f} MiB = "
              f"{(peak - imports_rss) / largest:.2f} x the largest tensor")
        written = sum(f.stat().st_size for f in (workdir / "bundle").rglob("*") if f.is_file())
        print(f"bundle {written / 2**30:.2f} GiB on disk")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
