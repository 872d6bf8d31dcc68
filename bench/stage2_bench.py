"""Stage-2 training step benchmark: the JAX trainer against a PyTorch stage-2 step, side by side.

Both frameworks load the same float32 random-weight checkpoint (a medium config derived from the
tiny fixture's, written once to a temporary directory) and train on the same batch: B synthetic
clips with ground truth, collated once. One training step is

    frozen VLM forward over the prompt (no gradient) -> cache cropped after the last
    <|traj_future_start|> -> action_in_proj(x_t, t) -> expert over the cache -> action_out_proj
    -> mean squared error to x - eps -> backward into the expert and the action projections
    -> global-norm clipping (1.0) -> AdamW

JAX: the stage-2 `Trainer.step` (jitted, state donated). PyTorch: the same computation written with
transformers' Qwen3-VL modules (`alpamayo_reference.reference.TorchAlpamayo`) and torch.optim.AdamW
under the same learning-rate table: `OptimizerConfig.stage2` over this run's steps with no warmup
(learning rate 1e-4 decaying to 1e-6; the recipe's 100 warmup steps would keep a 12-step run
near 1e-6), betas, eps, weight decay 0 and clipping 1.0 from the same config. The PyTorch VLM
forward is `vlm.model` (no lm_head: its logits are not part of the stage-2 loss, and XLA drops
them from the JAX program). Both see the same clean actions x (`fit_actions`), and the
flow times and noise of step k are the trainer's own draw for step k (`draw_flow(fold_in(key, k))`,
recomputed on the host and handed to the PyTorch step), so both compute the same loss; the
losses of every step are compared (relative difference).

Expert attention (`--expert-attention`): "reference" (default) is NVIDIA's training step, the
PyTorch expert gets `attention_mask=None` (transformers then attends causally over the action
tokens) and the cache is cropped at the last row's `<|traj_future_start|>`; "default" is the
trainer's default mode, the action tokens see each other in full and left padding is masked
(PyTorch gets the equivalent explicit 4-D additive mask).

Timing is interleaved (one JAX step, one PyTorch step, ...) after `--warmup` (2) warm-up steps
each, JAX's first; the first JAX call traces and compiles, and its time is reported separately.
Threads: `--threads k` pins the process to k CPUs (os.sched_setaffinity, before jax and torch
start their pools), calls
`torch.set_num_threads(k)` and, for k = 1, sets `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1` before jax is imported (XLA sizes its CPU thread pools from the
affinity: its thread count follows it; the second token is not an XLA flag, and XLA's parser
ignores it). "cores used" in the table is
process CPU time / wall time of the steps, to show what the setting achieved.

The CPUs of a shared machine may be busy with other processes: the table says how much CPU time
other processes took on the pinned CPUs during each framework's steps ("others", from the per-CPU
lines of /proc/stat) and warns. torch's OpenMP threads spin at every barrier by default, which
makes a 2-thread torch step erratic and many times slower when another process holds one of the
CPUs; `--omp-wait-policy PASSIVE` makes them sleep instead (XLA's pool showed no such effect
here).

Peak memory is the process's VmHWM from /proc/self/status (peak resident set), reset with
`/proc/self/clear_refs` (5) before each warm-up where the kernel allows it, so that each
framework's warm-up peak is its own.

    python bench/stage2_bench.py [--threads 2] [--clips 2] [--steps 10] [--image-size 32 48]
                                 [--expert-attention reference] [--omp-wait-policy PASSIVE] [--json PATH]
"""

from __future__ import annotations

import argparse
import os


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, choices=(1, 2),
                        help="CPUs to pin to, torch threads and XLA threading (default 2)")
    parser.add_argument("--clips", type=int, default=2, help="batch size B (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per framework (default 10)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed warm-up steps per framework (default 2: the second JAX call is still "
                             "slower than the rest)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(32, 48), metavar=("H", "W"))
    parser.add_argument("--expert-attention", choices=("reference", "default"), default="reference")
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default=None,
                        help="set OMP_WAIT_POLICY for torch's OpenMP pool (default: the environment's); "
                             "PASSIVE keeps torch steady when other processes share the CPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, metavar="PATH", help="write the results as JSON")
    return parser


from common import busy_seconds, configure_threads, write_checkpoint

if __name__ == "__main__":
    ARGS = _parser().parse_args()
    PINNED = configure_threads(ARGS.threads)
    if ARGS.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = ARGS.omp_wait_policy

import functools
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from alpamayo_reference.reference import TorchAlpamayo
from flax import nnx

from alpamayo_jax.inference.pipeline import Pipeline
from alpamayo_jax.io.hf import read_hf_config
from alpamayo_jax.processing.collate import collate
from alpamayo_jax.processing.synthetic import synthetic_clip
from alpamayo_jax.training.optimizer import OptimizerConfig, learning_rate_schedule
from alpamayo_jax.training.stage2 import draw_flow, fit_actions, future_start_lengths, stage2_loss
from alpamayo_jax.training.trainer import Trainer

TRAINED = ("expert.", "action_in_proj.", "action_out_proj.")


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1])


def memory() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident set of this process, MiB."""
    return {"rss_mib": _status_kib("VmRSS") / 1024, "peak_mib": _status_kib("VmHWM") / 1024}


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The shared checkpoint and batch
# ---------------------------------------------------------------------------------------------


def make_clips(count: int, image_size: tuple[int, int]):
    """Clips with ground truth: different scenes, speeds and turns."""
    return [synthetic_clip(i, image_size=image_size, speed=5.0 + 1.5 * i, curvature=0.01 * (i - 0.5),
                           with_future=True) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The PyTorch stage-2 step
# ---------------------------------------------------------------------------------------------


class TorchStage2:
    """The stage-2 step of NVIDIA's recipe over `TorchAlpamayo`: VLM without gradient, cropped
    cache, expert, MSE to x - eps, backward into the expert and projections, clipping, AdamW. With
    `expert_attention="reference"` the expert call is the recipe's (no mask); with "default" it
    gets the explicit mask of the trainer's default mode. The expert positions are the crop
    length + the rope deltas of the collated inputs (the recipe adds the VLM's rope deltas to the
    cropped cache length: the same numbers)."""

    def __init__(self, reference: TorchAlpamayo, inputs, optimizer: OptimizerConfig, expert_attention: str,
                 future_start_id: int, num_waypoints: int):
        self.reference, self.config, self.waypoints = reference, optimizer, num_waypoints
        self.parameters = []
        for name, parameter in reference.named_parameters():
            trained = name.startswith(TRAINED)
            parameter.requires_grad_(trained)
            if trained:
                self.parameters.append(parameter)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=optimizer.learning_rate,
                                           betas=(optimizer.b1, optimizer.b2), eps=optimizer.eps,
                                           weight_decay=optimizer.weight_decay)
        schedule = learning_rate_schedule(optimizer)
        self.lr_table = [float(schedule(k)) for k in range(optimizer.total_steps + 1)]
        self.step_count = 0
        self.vlm_inputs = {
            "input_ids": torch.from_numpy(np.array(inputs.input_ids, np.int64)),
            "attention_mask": torch.from_numpy(np.array(inputs.attention_mask, np.int64)),
            "pixel_values": torch.from_numpy(np.array(inputs.pixel_values, np.float32)),
            "image_grid_thw": torch.from_numpy(np.array(inputs.image_grid, np.int64)),
            "position_ids": torch.from_numpy(np.array(inputs.position_ids, np.int64)),
        }
        ids = np.asarray(inputs.input_ids)
        lengths = np.asarray(future_start_lengths(inputs, future_start_id, reference=False))
        batch = ids.shape[0]
        if expert_attention == "reference":
            # The cache is cropped after the last <|traj_future_start|> of the flattened batch.
            self.crop = int(np.nonzero(ids == future_start_id)[1][-1]) + 1
            self.mask = None
            offsets = np.full(batch, self.crop)
        else:
            # Crop at the longest row, hide each row's columns past its own crop and its padding.
            self.crop = int(lengths.max())
            visible = np.arange(self.crop)[None, :] < lengths[:, None]
            visible &= np.asarray(inputs.attention_mask, bool)[:, :self.crop]
            visible = np.concatenate([visible, np.ones((batch, num_waypoints), bool)], axis=1)
            bias = np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)
            self.mask = torch.from_numpy(np.ascontiguousarray(
                np.broadcast_to(bias[:, None, None, :], (batch, 1, num_waypoints, bias.shape[1]))))
            offsets = lengths
        # The positions the tokens after the crop would have had, on all three rotary axes.
        positions = (offsets + np.asarray(inputs.rope_deltas))[:, None] + np.arange(num_waypoints)[None, :]
        positions = np.broadcast_to(positions, (3, *positions.shape)).astype(np.int64)
        self.expert_positions = torch.from_numpy(positions)

    def loss(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.reference.vlm.model(**self.vlm_inputs, use_cache=True)
        cache = out.past_key_values
        cache.crop(self.crop)
        x_t = t[:, None, None] * x + (1 - t[:, None, None]) * noise
        embeds = self.reference.action_in_proj(x_t, t)
        hidden = self.reference.expert(inputs_embeds=embeds, position_ids=self.expert_positions,
                                       past_key_values=cache, attention_mask=self.mask, use_cache=True,
                                       is_causal=False).last_hidden_state
        prediction = self.reference.action_out_proj(hidden[:, -self.waypoints:])
        return torch.mean((prediction - (x - noise)) ** 2)

    def step(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_table[min(self.step_count, len(self.lr_table) - 1)]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, t, noise)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        self.optimizer.step()
        self.step_count += 1
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach()}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def timed(fn):
    """(result, wall s, this process's CPU s, other processes' CPU s on the pinned CPUs, stolen s)
    of one call. The others' time is the pinned CPUs' busy time minus this process's: how much
    the step had to share its CPUs (1/100 s resolution)."""
    busy, stolen = busy_seconds(PINNED)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    busy_after, stolen_after = busy_seconds(PINNED)
    return result, wall, cpu, max(busy_after - busy - cpu, 0.0), stolen_after - stolen


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def summary(runs: list[tuple[float, float, float, float]]) -> dict:
    seconds, cpu, others, stolen = (list(column) for column in zip(*runs, strict=True))
    median = statistics.median(seconds)
    return {"median_s": median, "min_s": min(seconds), "max_s": max(seconds), "steps_per_s": 1.0 / median,
            "cores_used": sum(cpu) / sum(seconds), "other_processes_cores": sum(others) / sum(seconds),
            "stolen_cores": sum(stolen) / sum(seconds), "seconds": seconds, "cpu_seconds": cpu,
            "other_processes_cpu_seconds": others}


def main() -> None:
    args = ARGS
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    result: dict = {"args": vars(args) | {"image_size": list(args.image_size)}, "environment": {
        "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "jax_backend": jax.default_backend(),
        "cpus_pinned": PINNED, "cpus_machine": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "memory_measure": "/proc/self/status VmHWM (peak RSS)"}}
    workdir = Path(tempfile.mkdtemp(prefix="alpamayo-stage2-bench-"))
    try:
        hf, vlm = write_checkpoint(workdir, args.seed)
        checkpoint_mib = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**20

        # --- both models from the same file
        pipeline = Pipeline.load(hf, processor_dir=vlm, dtype=jnp.float32)
        config = pipeline.config
        _, config_dict, backbone = read_hf_config(hf, vlm)
        reference = TorchAlpamayo.from_checkpoint(hf, config_dict, backbone)
        mem_loaded = memory()

        # --- the batch, the actions, the draws
        batch = collate(make_clips(args.clips, tuple(args.image_size)), tokenizer=pipeline.tokenizer,
                        chat_template=pipeline.chat_template, config=config)
        inputs = batch.inputs
        actions = fit_actions(pipeline.split, inputs, batch.ego_future_xyz, batch.ego_future_rot)
        total_steps = args.warmup + args.steps
        optimizer = OptimizerConfig.stage2(total_steps, warmup_steps=0)
        key = jax.random.key(args.seed)
        waypoints = actions.shape[1]
        draws = [draw_flow(jax.random.fold_in(key, k), args.clips, waypoints, config.flow_matching)
                 for k in range(total_steps)]
        torch_x = torch.from_numpy(np.array(actions, np.float32))
        torch_draws = [(torch.from_numpy(np.array(d.timesteps, np.float32)),
                        torch.from_numpy(np.array(d.noise, np.float32))) for d in draws]

        # --- JAX trainer
        trainer, state = Trainer.create(pipeline.model, optimizer, key, stage=2,
                                        expert_attention=args.expert_attention)
        initial_params = jax.tree.map(jnp.copy, state.params)  # the state is donated
        device_inputs, device_actions = jax.device_put(inputs), jax.device_put(actions)
        # --- PyTorch step
        torch_step = TorchStage2(reference, inputs, optimizer, args.expert_attention,
                                 config.traj_token_ids.future_start, waypoints)

        parameters = {
            "jax_total": int(sum(v.size for v in jax.tree.leaves(nnx.state(pipeline.model, nnx.Param)))),
            "jax_trained": int(sum(v.size for v in jax.tree.leaves(state.params))),
            "torch_total": int(sum(p.numel() for p in reference.parameters())),
            "torch_trained": int(sum(p.numel() for p in torch_step.parameters)),
        }
        ids = np.asarray(inputs.input_ids)
        shapes = {"batch": args.clips, "prompt_length": int(ids.shape[1]), "cache_crop": torch_step.crop,
                  "padding_tokens": int((~np.asarray(inputs.attention_mask)).sum()),
                  "pixel_rows": int(inputs.pixel_values.shape[0]), "images": len(inputs.image_grid),
                  "waypoints": int(waypoints), "checkpoint_mib": checkpoint_mib}
        print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, transformers "
              f"{transformers.__version__}; {args.threads} thread(s): pinned to CPUs {PINNED} of {os.cpu_count()}, "
              f"torch.get_num_threads() = {torch.get_num_threads()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
        print(f"medium config, float32: {parameters['jax_total'] / 1e6:.1f} M parameters "
              f"(torch {parameters['torch_total'] / 1e6:.1f} M), trained {parameters['jax_trained'] / 1e6:.2f} M "
              f"(torch {parameters['torch_trained'] / 1e6:.2f} M); checkpoint {checkpoint_mib:.0f} MiB")
        print(f"batch: {args.clips} clips, prompt length {shapes['prompt_length']} ({shapes['padding_tokens']} "
              f"padding), {shapes['images']} images / {shapes['pixel_rows']} patch rows of "
              f"{args.image_size[0]}x{args.image_size[1]}, cache cropped at {torch_step.crop}, {waypoints} "
              f"action tokens; expert attention {args.expert_attention!r}")
        if parameters["jax_trained"] != parameters["torch_trained"]:
            print("WARNING: the two frameworks train different parameter counts")

        losses = {"jax": [], "torch": []}
        grad_norms = {"jax": [], "torch": []}

        def jax_once():
            nonlocal state
            state, metrics = trainer.step(state, device_inputs, device_actions)
            jax.block_until_ready((state, metrics))
            return metrics

        def torch_once(k):
            return torch_step.step(torch_x, *torch_draws[k])

        def record(name, metrics):
            losses[name].append(float(metrics["loss"]))
            grad_norms[name].append(float(metrics["grad_norm"]))

        # --- warm-up: JAX (compiles), then PyTorch
        memory_log = {"after_load": mem_loaded}
        reset_ok = reset_peak()
        memory_log["before_jax_warmup"] = memory()
        warm_jax = []
        for _ in range(args.warmup):
            metrics, seconds, *_ = timed(jax_once)
            warm_jax.append(seconds)
            record("jax", metrics)
        memory_log["after_jax_warmup"] = memory()
        reset_peak()
        memory_log["before_torch_warmup"] = memory()
        warm_torch = []
        for k in range(args.warmup):
            metrics, seconds, *_ = timed(functools.partial(torch_once, k))
            warm_torch.append(seconds)
            record("torch", metrics)
        memory_log["after_torch_warmup"] = memory()
        reset_peak()

        # --- timed, interleaved
        load_before = os.getloadavg()
        jax_runs, torch_runs = [], []
        for i in range(args.steps):
            metrics, *measured = timed(jax_once)
            jax_runs.append(measured)
            record("jax", metrics)
            metrics, *measured = timed(functools.partial(torch_once, args.warmup + i))
            torch_runs.append(measured)
            record("torch", metrics)
        load_after = os.getloadavg()
        memory_log["after_timed_steps"] = memory()

        # --- the draw check: the trainer's step-0 loss against stage2_loss on the host's draw 0
        def injected_loss(params, inputs, actions, draw):
            return stage2_loss(trainer.model(params), inputs, actions, draw,
                               expert_attention=args.expert_attention)[0]

        injected = float(jax.jit(injected_loss)(initial_params, device_inputs, device_actions, draws[0]))

        jax_summary, torch_summary = summary(jax_runs), summary(torch_runs)
        loss_rel = [relative(a, b) for a, b in zip(losses["jax"], losses["torch"], strict=True)]
        grad_rel = [relative(a, b) for a, b in zip(grad_norms["jax"], grad_norms["torch"], strict=True)]
        ratio = jax_summary["median_s"] / torch_summary["median_s"]

        # --- the table
        print(f"\nseconds per training step (forward + backward + AdamW), median of {args.steps} interleaved "
              f"steps after {args.warmup} warm-up step(s):")
        print(f"  {'':8s} {'median s':>9s} {'min s':>8s} {'max s':>8s} {'steps/s':>8s} {'cores used':>10s} "
              f"{'others':>7s}  warm-up calls s")
        for name, s, warm in (("jax", jax_summary, warm_jax), ("torch", torch_summary, warm_torch)):
            print(f"  {name:8s} {s['median_s']:9.4f} {s['min_s']:8.4f} {s['max_s']:8.4f} {s['steps_per_s']:8.2f} "
                  f"{s['cores_used']:10.2f} {s['other_processes_cores']:7.2f}  "
                  + ", ".join(f"{w:.2f}" for w in warm))
        print(f"  ratio JAX / torch (median seconds per step): {ratio:.3f}  "
              f"({'JAX faster' if ratio < 1 else 'torch faster'} by {max(ratio, 1 / ratio):.2f}x)")
        print(f"  JAX first call (trace + compile + one step): {warm_jax[0]:.2f} s = about "
              f"{warm_jax[0] - jax_summary['median_s']:.2f} s of compilation")
        print(f"  cores used: this process's CPU s / wall s; others: CPU s of other processes on the pinned "
              f"CPUs {PINNED} per wall s (/proc/stat); stolen {jax_summary['stolen_cores']:.2f} / "
              f"{torch_summary['stolen_cores']:.2f}; load average (whole machine, {os.cpu_count()} CPUs) "
              f"{load_before[0]:.2f} before, {load_after[0]:.2f} after the timed steps")
        contended = max(jax_summary["other_processes_cores"], torch_summary["other_processes_cores"])
        if contended > 0.1:
            print(f"  WARNING: other processes used up to {contended:.2f} of the {len(PINNED)} pinned CPUs during "
                  f"the timed steps: the numbers are contended")

        print(f"\npeak resident memory (VmHWM, MiB){'' if reset_ok else ' - clear_refs not allowed: cumulative'}:")
        print(f"  {'':28s} {'RSS':>8s} {'peak':>8s}")
        for name, m in memory_log.items():
            print(f"  {name.replace('_', ' '):28s} {m['rss_mib']:8.0f} {m['peak_mib']:8.0f}")
        if reset_ok:
            peaks = {name: (memory_log[f"after_{name}_warmup"]["peak_mib"],
                            memory_log[f"after_{name}_warmup"]["peak_mib"] - memory_log[f"before_{name}_warmup"]["rss_mib"])
                     for name in ("jax", "torch")}
            print("  peak reset before each warm-up: " + ", ".join(
                f"{name} warm-up peak {peak:.0f} MiB (+{added:.0f} over its start)"
                for name, (peak, added) in peaks.items()))

        print("\nloss agreement (same weights, batch, x, flow times and noise; float32):")
        print(f"  draw check: stage2_loss on the host's draw 0 {injected:.7f} vs the trainer's step 0 "
              f"{losses['jax'][0]:.7f} (relative {relative(injected, losses['jax'][0]):.2e})")
        print(f"  {'step':>4s} {'jax loss':>12s} {'torch loss':>12s} {'rel diff':>9s} {'jax |g|':>10s} "
              f"{'torch |g|':>10s} {'rel diff':>9s}")
        for k in range(total_steps):
            print(f"  {k:4d} {losses['jax'][k]:12.7f} {losses['torch'][k]:12.7f} {loss_rel[k]:9.2e} "
                  f"{grad_norms['jax'][k]:10.5f} {grad_norms['torch'][k]:10.5f} {grad_rel[k]:9.2e}")
        verdict = "agree" if loss_rel[0] <= 1e-5 else "DO NOT AGREE to 1e-5"
        print(f"  step 0 (identical parameters): relative loss difference {loss_rel[0]:.2e}: {verdict}; "
              f"max over all {total_steps} steps {max(loss_rel):.2e} (later steps also compare the optimizers)")
        print(f"\ntotal wall time {time.perf_counter() - started:.1f} s")

        result |= {"parameters": parameters, "shapes": shapes,
                   "timing": {"jax": jax_summary | {"warmup_s": warm_jax},
                              "torch": torch_summary | {"warmup_s": warm_torch},
                              "ratio_jax_over_torch": ratio, "load_average_before": load_before,
                              "load_average_after": load_after,
                              "jax_compile_estimate_s": warm_jax[0] - jax_summary["median_s"]},
                   "memory": {"peak_reset_between_phases": reset_ok, **memory_log},
                   "losses": losses | {"relative_difference": loss_rel, "draw_check": injected},
                   "grad_norms": grad_norms | {"relative_difference": grad_rel},
                   "wall_s": time.perf_counter() - started}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            print(f"results written to {args.json}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
