"""The stage-2 training loop on the tiny model: a real optimizer run lowers the loss, a resumed run
repeats the uninterrupted one exactly, metrics and checkpoints land in the run directory, and the
model the run started from is left intact (the step donates only its own buffers)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpamayo_jax.inference.pipeline import Pipeline
from alpamayo_jax.processing.collate import collate
from alpamayo_jax.training.optimizer import OptimizerConfig
from alpamayo_jax.training.stage2 import fit_actions
from alpamayo_jax.training.trainer import CHECKPOINT_DIR, METRICS_FILE, Trainer
from tests.training_support import four_clips, run_training

STEPS = 40
OPTIMIZER = OptimizerConfig(learning_rate=3e-3, warmup_steps=2, total_steps=STEPS, min_learning_rate=3e-4)


@pytest.fixture(scope="module")
def pipeline(fixture_dir):
    return Pipeline.load(fixture_dir / "hf", processor_dir=fixture_dir / "vlm")


@pytest.fixture(scope="module")
def clips():
    return four_clips()


def run(pipeline, clips, run_dir, steps, **options):
    return run_training(pipeline, clips, run_dir, steps, optimizer=OPTIMIZER, stage=2, **options)


@pytest.fixture(scope="module")
def uninterrupted(pipeline, clips, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, *run(pipeline, clips, run_dir, STEPS)


def test_training_lowers_the_loss(pipeline, clips, uninterrupted):
    """The loss of the four examples, on eight fixed flow draws, before and after 40 steps.

    It falls from 1.278 to about 1.08, not to half (measured: 1.068 / 1.058 / 1.115 after 40 steps
    on the full batch at peak learning rates 3e-3 / 1e-2 / 3e-2). The target x - eps is
    predictable only if the expert can recover eps from x_t, and it sees x_t only through sin/cos
    at 1 to 100 cycles per unit, which wrap many times over noise of unit spread: decoding the
    value back is out of reach of a 32-wide encoder in 40 steps. Without it the best prediction
    is x alone, whose loss is Var(eps) = 1: the floor this run approaches. So the bound is on the
    gap to that floor: at least half of it closed (measured: 71 %; 88 % on another eight draws)."""
    _, trainer, result = uninterrupted
    batch = collate(clips, tokenizer=pipeline.tokenizer, chat_template=pipeline.chat_template, config=pipeline.config)
    actions = fit_actions(pipeline.split, batch.inputs, batch.ego_future_xyz, batch.ego_future_rot)

    draws = jax.jit(jax.vmap(trainer.loss, in_axes=(None, None, None, None, 0)))  # one program, eight keys

    def loss(params):
        return float(np.mean(draws(params, trainer.frozen, batch.inputs, actions,
                                   jnp.stack([jax.random.key(100 + i) for i in range(8)]))[0]))

    _, initial = Trainer.create(pipeline.model, OPTIMIZER, jax.random.key(0), stage=2)
    before, after = loss(initial.params), loss(result.state.params)
    floor = 1.0  # Var(eps), the docstring's argument
    print(f"stage-2 loss on fixed draws: {before:.4f} before, {after:.4f} after {STEPS} steps "
          f"({1 - (after - floor) / (before - floor):.0%} of the gap to the floor closed)")
    assert after - floor < 0.5 * (before - floor)
    assert len(result.losses) == STEPS and np.isfinite(result.losses).all()


def test_resume_repeats_the_uninterrupted_run(pipeline, clips, uninterrupted, tmp_path):
    _run_dir, _, full = uninterrupted
    _first_trainer, first = run(pipeline, clips, tmp_path, 20)
    assert first.losses == full.losses[:20]
    # A fresh process would rebuild the trainer; the state comes from the step-20 checkpoint.
    _, resumed = run(pipeline, clips, tmp_path, STEPS, resume=True)
    assert resumed.losses == full.losses[20:]  # bit for bit
    for ours, theirs in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(full.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {"loss", "grad_norm", "learning_rate", "seconds"} <= set(records[0])


def test_run_directory_and_model_are_intact(pipeline, uninterrupted, clips):
    run_dir, _, _ = uninterrupted
    saved = sorted(int(p.name) for p in (run_dir / CHECKPOINT_DIR).iterdir() if p.name.isdigit())
    assert saved == [20, 30, 40]  # every 10 steps, the newest 3 kept
    # The model the run started from still works: its buffers were not donated.
    assert np.isfinite(np.asarray(pipeline.model.expert.norm.scale[...])).all()
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        run(pipeline, clips, run_dir, STEPS)


@pytest.fixture(scope="module")
def batch_and_actions(pipeline, clips):
    batch = collate(clips[:2], tokenizer=pipeline.tokenizer, chat_template=pipeline.chat_template,
                    config=pipeline.config)
    return batch.inputs, fit_actions(pipeline.split, batch.inputs, batch.ego_future_xyz, batch.ego_future_rot)


def test_remat_recomputes_the_same_gradients(pipeline, batch_and_actions):
    """`remat=True` puts each expert layer under a rematerialisation (the backward pass recomputes
    its activations) and changes no number: loss and gradients equal to float32 rounding."""
    inputs, actions = batch_and_actions
    key = jax.random.key(3)
    results = {}
    for remat in (False, True):
        trainer, state = Trainer.create(pipeline.model, OPTIMIZER, jax.random.key(0), stage=2, remat=remat)

        def loss(params, trainer=trainer):
            return trainer.loss(params, trainer.frozen, inputs, actions, key)[0]

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(state.params))
        results[remat] = (jax.jit(jax.value_and_grad(loss))(state.params), jaxpr.count("remat"))
    (plain_loss, plain_grads), plain_remats = results[False]
    (remat_loss, remat_grads), remats = results[True]
    assert plain_remats == 0 and remats >= pipeline.config.expert.num_hidden_layers
    error = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads), strict=True))
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(plain_grads))
    print(f"remat: loss {float(remat_loss):.7f} vs {float(plain_loss):.7f}; gradients max error {error:.2e} "
          f"of {scale:.2e}")
    assert abs(float(remat_loss) - float(plain_loss)) <= 1e-6 * abs(float(plain_loss))
    assert error <= 1e-6 * scale


def test_bfloat16_parameters_keep_a_float32_optimizer_state(fixture_dir, batch_and_actions):
    """A model loaded in bfloat16 trains in bfloat16 with float32 AdamW moments: the step keeps
    the parameters' dtype, the moments stay float32, and the loss falls on a repeated batch."""
    pipeline = Pipeline.load(fixture_dir / "hf", processor_dir=fixture_dir / "vlm", dtype="bfloat16")
    inputs, actions = batch_and_actions
    optimizer = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10)
    trainer, state = Trainer.create(pipeline.model, optimizer, jax.random.key(0), stage=2)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert moments and {leaf.dtype for leaf in moments} == {jnp.dtype(jnp.float32)}
    before = jax.tree.map(np.asarray, state.params)
    losses = []
    for _ in range(6):
        state, metrics = trainer.step(state, inputs, actions)
        losses.append(float(metrics["loss"]))
    print(f"bfloat16 parameters, float32 moments: losses {np.round(losses, 4).tolist()}")
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves(state.opt_state)
            if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(losses).all() and metrics["loss"].dtype == jnp.float32
    changed = [not np.array_equal(np.asarray(a), b) for a, b in
               zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True)]
    assert all(changed)
    assert np.mean(losses[-2:]) < losses[0]
