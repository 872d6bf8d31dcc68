"""What the benchmarks share: CPU pinning and thread settings (before jax and torch start), the
CPU time other processes took, random-weight checkpoints of the tiny fixture's architecture
made wider and deeper, and the stage timing of NVIDIA's model.

Import `configure_threads` first and call it before anything imports jax or torch; the rest
imports jax lazily.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

FIXTURE = Path(__file__).parents[1] / "tests/fixtures/tiny_ar1_dev"

# (text decoder, vision tower, expert, Alpamayo config) overrides of the tiny fixture's configs.
SIZES = {
    # 8 x 512-wide language model layers: tens of millions of parameters.
    "medium": (dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64),
               dict(hidden_size=128, intermediate_size=512, depth=4, num_heads=4, out_hidden_size=512,
                    deepstack_visual_indexes=[1, 2]),
               dict(hidden_size=256, intermediate_size=768, num_attention_heads=8), {}),
    # 12 x 1024-wide layers, a 12-block 512-wide vision tower and a 512-wide expert: 2.6e8 parameters;
    # images resized to about 16,000 pixels (64 tokens each: a 1,100-token prompt for 16 frames).
    "260m": (dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=64),
             dict(hidden_size=512, intermediate_size=2048, depth=12, num_heads=8, out_hidden_size=1024,
                  deepstack_visual_indexes=[3, 7, 11]),
             dict(hidden_size=512, intermediate_size=1536, num_attention_heads=16),
             dict(min_pixels=12_288, max_pixels=16_384)),
}


def configure_threads(threads: int) -> list[int]:
    """Pins the process to `threads` CPUs and, for one, turns XLA's CPU threading off; must run
    before jax and torch are imported (XLA sizes its pools from the affinity). Returns the CPUs."""
    import sys

    if "jax" in sys.modules or "torch" in sys.modules:
        raise SystemExit("jax or torch was imported before the thread settings")
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    if threads == 1:
        # (the second token is not an XLA flag; XLA's parser ignores it)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    return cpus


# The instruction-set extensions PyTorch's and XLA's CPU kernels choose between.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx_vnni")


def cpu_description() -> dict:
    """The CPU the figures come from: model name, core count and which of `CPU_FEATURES` it has
    (ratios against PyTorch depend on them). From /proc/cpuinfo where there is one."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
            if model and flags:
                break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "features": [f for f in CPU_FEATURES if f in flags]}


def busy_seconds(cpus: list[int]) -> tuple[float, float]:
    """CPU seconds the given CPUs have spent busy since boot (user, nice, system, irq, softirq)
    and stolen by the hypervisor, from the per-CPU lines of /proc/stat."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = stolen = 0
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if name in wanted:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
                busy += user + nice + system + irq + softirq
                stolen += steal
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, stolen / tick


def scaled_configs(size: str) -> tuple[dict, dict]:
    """The tiny fixture's Alpamayo and backbone configs with `SIZES[size]`, float32."""
    text, vision, expert, alpamayo = SIZES[size]
    config = json.loads((FIXTURE / "hf/config.json").read_text())
    backbone = copy.deepcopy(json.loads((FIXTURE / "vlm/config.json").read_text()))
    head_dim = text["head_dim"]
    section = [head_dim // 4, head_dim // 8, head_dim // 8]
    backbone["text_config"].update(text, rope_scaling={"mrope_interleaved": True, "mrope_section": section,
                                                       "rope_type": "default"})
    backbone["vision_config"].update(vision)
    config["expert_cfg"].update(expert)
    config.update(alpamayo)
    config["dtype"] = config["model_dtype"] = "float32"
    return config, backbone


def write_checkpoint(directory: Path, seed: int, size: str = "medium") -> tuple[Path, Path]:
    """A float32 random-weight checkpoint of `size` in the reference layout (hf/) and its processor
    directory (vlm/: the fixture's tokenizer and template, the scaled backbone config)."""
    import jax.numpy as jnp
    from flax import nnx

    from alpamayo_jax.config import AlpamayoConfig
    from alpamayo_jax.io.hf import save_hf_checkpoint
    from alpamayo_jax.models.alpamayo import AlpamayoR1

    config, backbone = scaled_configs(size)
    vlm = directory / "vlm"
    shutil.copytree(FIXTURE / "vlm", vlm)
    (vlm / "config.json").write_text(json.dumps(backbone, indent=2))
    config["vlm_name_or_path"] = "../vlm"
    model = AlpamayoR1(AlpamayoConfig.from_hf_config(config, backbone), param_dtype=jnp.float32,
                       rngs=nnx.Rngs(seed))
    hf = save_hf_checkpoint(model, directory / "hf", config)
    return hf, vlm


class ReferenceStages:
    """NVIDIA's `AlpamayoR1` timed stage by stage, by wrapping its calls on the instance:
    `vlm.generate` ("generate"; `tokens` is what it generated), the first `vlm.forward` after
    `reset` ("prefill": a rollout's first forward is its prefill), `diffusion.sample`
    ("flow_matching") and `action_space.action_to_traj` ("rollout"). `sync` runs before and after
    each timed call (on a GPU, its synchronisation)."""

    def __init__(self, model, sync: Callable[[], None] = lambda: None):
        self.sync = sync
        self.reset()
        self._wrap(model.vlm, "generate", "generate", count_tokens=True)
        self._wrap(model.vlm, "forward", "prefill", first_only=True)
        self._wrap(model.diffusion, "sample", "flow_matching")
        self._wrap(model.action_space, "action_to_traj", "rollout")

    def reset(self) -> None:
        self.stages: dict[str, float] = {}
        self.tokens: int | None = None

    def _wrap(self, owner, name: str, stage: str, *, first_only: bool = False, count_tokens: bool = False) -> None:
        call = getattr(owner, name)

        def timed(*args, **kwargs):
            if first_only and stage in self.stages:
                return call(*args, **kwargs)
            self.sync()
            start = time.perf_counter()
            out = call(*args, **kwargs)
            self.sync()
            self.stages[stage] = time.perf_counter() - start
            if count_tokens:
                self.tokens = int(out.sequences.shape[1] - kwargs["input_ids"].shape[1])
            return out

        setattr(owner, name, timed)
