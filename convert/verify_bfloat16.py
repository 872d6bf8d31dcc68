"""bfloat16 inference against the reference's autocast run, on one checkpoint and one input.

The reference runs bfloat16 weights under `torch.autocast(bfloat16)` (SPEC §10). Here the PyTorch
model gets bfloat16 parameters and runs under CPU autocast with CUDA autocast's LayerNorm rule
(`cuda_autocast`); alpamayo-jax loads the same checkpoint with `dtype=bfloat16`
(`alpamayo_jax.nn.precision`). The PyTorch model is either `alpamayo_reference.reference.TorchAlpamayo`
(transformers' Qwen3-VL modules and a restated action input projection; needs nothing but
transformers), or, given an NVlabs/alpamayo source tree (`reference_src`), NVIDIA's own
`AlpamayoR1` loaded by its `from_pretrained(dtype=bfloat16)`, with its action projections, its
flow-matching sampler (the noise injected) and its modules' dtypes as it leaves them
(`nvidia_reference`). `reference_run` records either's outputs; `precision_tables` compares one
run of ours with several reference runs (a live one and one recorded with NVIDIA's code, in the
tests). Both sides take `verify.synthetic_inputs`' prompt and:

* the vision tokens and the prefill's last-position logits;
* `decode_steps` decoding steps, teacher-forced with the reference's greedy tokens, each step's
  logits compared (the worst step is reported);
* the expert's velocity at flow times 0 and 0.7 on each side's own prefill cache;
* 10 Euler steps from one noise draw, each side on its own cache, and the trajectories both action
  sets roll out to (the float32 unicycle rollout, verified on its own elsewhere).

Logits are compared by KL(reference || ours) of their softmax distributions and by
max |a - b| / max |b|; everything else by the latter, the trajectory by its largest position
difference in metres. The same rows are computed for alpamayo-jax in float32 against the same
bfloat16 reference: that is the error of not reproducing the reference's rounding at all, the
scale against which the bfloat16 rows are read.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from alpamayo_reference.reference import TorchAlpamayo, cuda_autocast, expert_velocity, to_bfloat16
from alpamayo_reference.verify import synthetic_inputs

from alpamayo_jax.action.unicycle import action_to_traj
from alpamayo_jax.inference.flow_matching import euler_sample, time_grid
from alpamayo_jax.io.hf import read_hf_config
from alpamayo_jax.io.load import load_config, load_model
from alpamayo_jax.models.expert import expert_context
from alpamayo_jax.processing.synthetic import arc_history

FLOW_TIMES = (0.0, 0.7)


@dataclass(frozen=True)
class PrecisionRow:
    """One compared quantity: `measure` of alpamayo-jax in bfloat16 and in float32 against the
    reference's bfloat16 autocast run."""

    stage: str
    measure: str  # "relative", "kl" or "metres"
    bfloat16: float
    float32: float


def relative(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        raise ValueError(f"shape {ours.shape} != reference {theirs.shape}")
    return float(np.max(np.abs(ours - theirs)) / max(float(np.max(np.abs(theirs))), 1e-30))


def kl_divergence(ours, theirs) -> float:
    """Largest KL(softmax(theirs) || softmax(ours)) over the leading axes, in float64."""
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p_log, q_log = log_softmax(theirs), log_softmax(ours)
    return float(np.max((np.exp(p_log) * (p_log - q_log)).sum(axis=-1)))


def restated_euler(velocity: Callable, noise: torch.Tensor, num_steps: int = 10) -> torch.Tensor:
    """The reference's Euler loop restated (for `TorchAlpamayo`): float32 steps of the
    `linspace(0, 1)` grid, each velocity at its step's start time, of shape (1,)."""
    grid_times, x = time_grid(num_steps), noise
    for t, t_next in zip(grid_times[:-1], grid_times[1:], strict=True):
        v = velocity(x, torch.tensor([float(t)]))
        x = x + torch.tensor(t_next - t).view(1, 1, 1) * v  # the reference's float32 (B, 1, 1) step
    return x


class NvidiaReference(torch.nn.Module):
    """NVIDIA's `AlpamayoR1` behind `TorchAlpamayo`'s interface: `vlm`, `velocity` (its denoising
    step's arithmetic) and `euler` (its own `FlowMatching.sample`, the initial noise injected)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.vlm = model.vlm

    def velocity(self, x, t, cache, position_ids, attention_mask):
        return expert_velocity(self.model, x, t, cache, position_ids, attention_mask)

    def euler(self, velocity: Callable, noise: torch.Tensor, num_steps: int = 10) -> torch.Tensor:
        from alpamayo_reference.verify_training import torch_overrides

        draws = []

        def randn(*size, **kwargs):
            draws.append(size)
            if tuple(size) != tuple(noise.shape):
                raise ValueError(f"the reference drew noise of shape {size}, {tuple(noise.shape)} given")
            return noise.clone()

        with torch_overrides(self.model.diffusion, {"randn": randn}):
            actions = self.model.diffusion.sample(batch_size=noise.shape[0], step_fn=velocity,
                                                  inference_step=num_steps, int_method="euler")
        if len(draws) != 1:
            raise RuntimeError(f"expected one noise draw in the reference's sampler, got {len(draws)}")
        return actions


def nvidia_reference(reference_src: str | Path, hf_dir: str | Path, processor_dir: str | Path) -> NvidiaReference:
    """NVIDIA's `AlpamayoR1` from the checkpoint, as its inference loads it in bfloat16:
    `from_pretrained(dtype=bfloat16)`, which also moves the action modules to the expert's dtype
    (`keep_same_dtype`) and leaves the rotary inverse frequencies in float32."""
    from alpamayo_reference.verify_training import _open_reference, _reference_config

    _, hf_dir, notes = _open_reference(reference_src, hf_dir)
    from alpamayo_r1.config import AlpamayoR1Config
    from alpamayo_r1.models.alpamayo_r1 import AlpamayoR1

    config = _reference_config(hf_dir, Path(processor_dir), notes)
    config["model_dtype"] = "bfloat16"
    model = AlpamayoR1.from_pretrained(str(hf_dir), config=AlpamayoR1Config(**config), dtype=torch.bfloat16)
    return NvidiaReference(model.eval())


def _reference_run(reference, ids, pixels, grid, positions, deltas, decode_steps, noise):
    """The reference's outputs for every compared stage, under `cuda_autocast`."""
    out = {}
    with torch.no_grad(), cuda_autocast(reference):
        out["vision"] = reference.vlm.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid))[0]
        prefill = reference.vlm(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                                image_grid_thw=torch.from_numpy(grid), position_ids=torch.from_numpy(positions),
                                attention_mask=torch.ones_like(torch.from_numpy(ids)), use_cache=True)
        prefill_cache = copy.deepcopy(prefill.past_key_values)
        logits, cache, tokens = [prefill.logits[:, -1].float()], prefill.past_key_values, []
        length = ids.shape[1]
        for step in range(decode_steps):
            token = logits[-1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            position = torch.full((3, 1, 1), length + step + int(deltas[0, 0]), dtype=torch.long)
            step_out = reference.vlm(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True)
            logits.append(step_out.logits[:, -1].float())
            cache = step_out.past_key_values
        out["logits"] = torch.stack(logits, dim=1)  # (1, 1 + steps, V)
        out["tokens"] = torch.tensor(tokens, dtype=torch.long)

        waypoints = noise.shape[1]
        expert_positions = torch.arange(waypoints) + length + int(deltas[0, 0])
        expert_positions = expert_positions.expand(3, 1, waypoints).long()
        mask = torch.zeros((1, 1, waypoints, length + waypoints))

        def velocity(x, t):
            return reference.velocity(x, t, prefill_cache, expert_positions, mask)

        out["velocity"] = torch.stack([velocity(torch.from_numpy(noise), torch.tensor([t])).float()
                                       for t in FLOW_TIMES])
        euler = getattr(reference, "euler", restated_euler)
        out["actions"] = euler(velocity, torch.from_numpy(noise))
    return {name: value.numpy() if name == "tokens" else value.float().numpy() for name, value in out.items()}


def reference_run(hf_dir: str | Path, *, processor_dir: str | Path | None = None, reference_src=None, seed: int = 0,
                  image_size: tuple[int, int] = (64, 96), decode_steps: int = 8) -> dict[str, np.ndarray]:
    """The reference's bfloat16 autocast outputs on the checkpoint and the synthetic input of
    `seed`: "vision", "logits" (1, 1 + decode_steps, V), "tokens" (its greedy tokens), "velocity"
    (one per `FLOW_TIMES`), "actions" (after 10 Euler steps), all float32 but the tokens.
    `TorchAlpamayo`, or NVIDIA's `AlpamayoR1` with `reference_src` (`processor_dir` required)."""
    hf_dir = Path(hf_dir)
    if reference_src is None:
        _, config_dict, backbone = read_hf_config(hf_dir, processor_dir)
        reference = to_bfloat16(TorchAlpamayo.from_checkpoint(hf_dir, config_dict, backbone))
    else:
        if processor_dir is None:
            raise ValueError("NVIDIA's reference loads the processor directory: pass processor_dir")
        reference = nvidia_reference(reference_src, hf_dir, processor_dir)
    config = load_config(hf_dir, processor_dir=processor_dir)
    ids, pixels, grid, positions, deltas = synthetic_inputs(config, seed, image_size)
    return _reference_run(reference, ids, pixels, grid, positions, deltas, decode_steps, _noise(config, seed))


def _noise(config, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).normal(size=(1, config.n_waypoints, 2)).astype(np.float32)


def _jax_run(model, ids, pixels, grid, positions, deltas, tokens, noise):
    """alpamayo-jax's outputs for the same stages, fed the reference's tokens."""
    length = ids.shape[1]
    out = {"vision": model.vlm.visual(jnp.asarray(pixels), grid).image_embeds}
    cache = model.vlm.init_cache(1, length + len(tokens))
    prefill = model.vlm(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), image_grid_thw=grid,
                        position_ids=jnp.asarray(positions), cache=cache, num_logits=1)
    logits, cache = [prefill.logits[:, -1]], prefill.cache
    for step, token in enumerate(tokens):
        position = jnp.full((3, 1, 1), length + step + int(deltas[0, 0]), jnp.int32)
        step_out = model.vlm(jnp.asarray([[token]]), position_ids=position, cache=cache, num_logits=1)
        logits.append(step_out.logits[:, -1])
        cache = step_out.cache
    out["logits"] = jnp.stack(logits, axis=1).astype(jnp.float32)
    context = expert_context(prefill.cache, jnp.asarray([length]), jnp.asarray(deltas[:, 0]), noise.shape[1])
    out["velocity"] = jnp.stack([model.action_velocity(jnp.asarray(noise), jnp.asarray([t], jnp.float32), context)
                                 for t in FLOW_TIMES]).astype(jnp.float32)
    out["actions"] = euler_sample(lambda x, t: model.action_velocity(x, t, context), jnp.asarray(noise), 10).actions
    return {name: np.asarray(value, np.float32) for name, value in out.items()}


def precision_tables(hf_dir: str | Path, references: dict[str, dict[str, np.ndarray]], *,
                     processor_dir: str | Path | None = None, seed: int = 0, image_size: tuple[int, int] = (64, 96)
                     ) -> dict[str, list[PrecisionRow]]:
    """alpamayo-jax in bfloat16 and in float32, run once, against each of `references` (name ->
    a `reference_run` of the same checkpoint, seed and image size, live or recorded); one row per
    compared quantity and reference. The references must have decoded the same greedy tokens (ours
    are teacher-forced with them)."""
    jax.config.update("jax_default_matmul_precision", "highest")
    runs = list(references.values())
    tokens = [run["tokens"].tolist() for run in runs]
    if any(t != tokens[0] for t in tokens):
        raise ValueError(f"the references decoded different greedy tokens: {dict(zip(references, tokens))}")
    models = {dtype: load_model(Path(hf_dir), dtype=dtype, processor_dir=processor_dir)
              for dtype in (jnp.bfloat16, jnp.float32)}
    config = models[jnp.float32][1]
    ids, pixels, grid, positions, deltas = synthetic_inputs(config, seed, image_size)
    noise = _noise(config, seed)
    ours = {dtype: _jax_run(model, ids, pixels, grid, positions, deltas, tokens[0], noise)
            for dtype, (model, _) in models.items()}
    stats = models[jnp.float32][0].action_space.stats()
    return {name: _rows(theirs, ours[jnp.bfloat16], ours[jnp.float32], config, stats)
            for name, theirs in references.items()}


def verify_bfloat16(hf_dir: str | Path, *, processor_dir: str | Path | None = None, reference_src=None,
                    seed: int = 0, image_size: tuple[int, int] = (64, 96), decode_steps: int = 8
                    ) -> list[PrecisionRow]:
    """alpamayo-jax in bfloat16 and in float32 against the reference's bfloat16 autocast run on a
    Hugging Face checkpoint directory (`TorchAlpamayo`, or NVIDIA's `AlpamayoR1` with
    `reference_src`); returns one row per compared quantity."""
    theirs = reference_run(hf_dir, processor_dir=processor_dir, reference_src=reference_src, seed=seed,
                           image_size=image_size, decode_steps=decode_steps)
    return precision_tables(hf_dir, {"reference": theirs}, processor_dir=processor_dir, seed=seed,
                            image_size=image_size)["reference"]


def _rows(theirs, bfloat16_run, float32_run, config, stats) -> list[PrecisionRow]:
    hist_xyz, hist_rot = arc_history(8.0, 0.01)
    decode_steps = theirs["logits"].shape[1] - 1

    def trajectory(actions):  # the float32 rollout for every side: the actions are what differ
        xyz, _ = action_to_traj(jnp.asarray(actions), jnp.asarray(hist_xyz)[None], jnp.asarray(hist_rot)[None],
                                config.action_space, stats)
        return np.asarray(xyz, np.float64)

    reference_xyz = trajectory(theirs["actions"])

    def errors(run) -> dict[tuple[str, str], float]:  # (stage, measure) -> error against the reference
        logits = [(kl_divergence(run["logits"][:, s], theirs["logits"][:, s]),
                   relative(run["logits"][:, s], theirs["logits"][:, s])) for s in range(decode_steps + 1)]
        decode, worst = logits[1:], f"decode logits, worst of {decode_steps} steps"
        out = {("vision tokens", "relative"): relative(run["vision"], theirs["vision"]),
               ("prefill logits, last position", "kl"): logits[0][0],
               ("prefill logits, last position", "relative"): logits[0][1],
               (worst, "kl"): max(kl for kl, _ in decode),
               (worst, "relative"): max(rel for _, rel in decode)}
        for index, t in enumerate(FLOW_TIMES):
            out[(f"expert velocity (t={t})", "relative")] = relative(run["velocity"][index], theirs["velocity"][index])
        out[("actions after 10 Euler steps", "relative")] = relative(run["actions"], theirs["actions"])
        out[("trajectory xyz", "metres")] = float(np.max(np.abs(trajectory(run["actions"]) - reference_xyz)))
        return out

    bfloat16, float32 = errors(bfloat16_run), errors(float32_run)
    return [PrecisionRow(stage, measure, bfloat16[stage, measure], float32[stage, measure])
            for stage, measure in bfloat16]


# The language model's rows (its residual stream is bfloat16 on both sides) leave both of our
# precisions one or two bfloat16 ulps from the reference, and which one is nearer depends on the
# CPU the reference ran on: on the tiny checkpoint float32's prefill KL was 2.7e-4 against one
# reference run and 1.2e-4 against the same code on a CPU without AVX-512 (bfloat16 1.4e-4 and
# 1.5e-4). There bfloat16 may be up to this factor further than float32; a wrong dtype flow in the
# language model costs far more. From the expert on, where float32 is 3x to 110x further,
# bfloat16 must be no further.
LANGUAGE_MODEL_SLACK = 2.0
LANGUAGE_MODEL_STAGES = ("vision tokens", "prefill logits", "decode logits")


def further_than_float32(table: list[PrecisionRow]) -> list[str]:
    """The rows (as "stage (measure)") where bfloat16 is further from the reference than float32
    allows: by more than `LANGUAGE_MODEL_SLACK` times in the language model, at all from the
    expert's velocity on."""
    def allowed(row: PrecisionRow) -> float:
        slack = LANGUAGE_MODEL_SLACK if row.stage.startswith(LANGUAGE_MODEL_STAGES) else 1.0
        return slack * row.float32

    return [f"{row.stage} ({row.measure})" for row in table if not row.bfloat16 <= allowed(row)]


def format_precision_report(table: list[PrecisionRow]) -> str:
    lines = [f"{'against the reference in bfloat16 autocast':40s} {'measure':>9s} {'bfloat16':>11s} {'float32':>11s}"]
    lines += [f"{row.stage:40s} {row.measure:>9s} {row.bfloat16:11.3e} {row.float32:11.3e}" for row in table]
    return "\n".join(lines)
