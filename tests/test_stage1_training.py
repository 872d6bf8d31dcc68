"""The training loop in stage 1 (the whole VLM, next-token loss) on the tiny model: a real optimizer
run overfits four examples, a resumed run repeats the uninterrupted one bit for bit, the vision tower
learns at a tenth of the rate, and bfloat16 parameters train with float32 AdamW moments."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpamayo_jax.inference.pipeline import Pipeline
from alpamayo_jax.processing.collate import collate
from alpamayo_jax.training.optimizer import OptimizerConfig, TrainingStage
from alpamayo_jax.training.trainer import CHECKPOINT_DIR, METRICS_FILE, Trainer
from tests.training_support import four_clips, run_training

STEPS = 40
# The stage-1 preset (vision tower at 0.1 x) with a learning rate and warmup for 40 steps, no accumulation.
OPTIMIZER = OptimizerConfig.stage1(STEPS, learning_rate=1e-3, warmup_steps=2, min_learning_rate=1e-4,
                                   gradient_accumulation_steps=1)


@pytest.fixture(scope="module")
def pipeline(fixture_dir):
    return Pipeline.load(fixture_dir / "hf", processor_dir=fixture_dir / "vlm")


@pytest.fixture(scope="module")
def clips():
    return four_clips()


def run(pipeline, clips, run_dir, steps, **options):
    return run_training(pipeline, clips, run_dir, steps, optimizer=OPTIMIZER, stage=TrainingStage.VLM, **options)


@pytest.fixture(scope="module")
def uninterrupted(pipeline, clips, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, *run(pipeline, clips, run_dir, STEPS)


def test_stage1_overfits_four_examples(pipeline, clips, uninterrupted):
    """The stage-1 loss of the four examples before and after 40 steps (batches of two, peak
    learning rate 1e-3): measured 14.836 (7.872 + 6.964) -> 0.150 (0.144 + 0.006), far below half."""
    _, trainer, result = uninterrupted
    assert trainer.stage == TrainingStage.VLM and trainer.remat  # remat by default in stage 1
    batch = collate(clips, tokenizer=pipeline.tokenizer, chat_template=pipeline.chat_template, config=pipeline.config)
    inputs, labels = trainer.prepare(batch, pipeline.split)
    loss = jax.jit(trainer.loss)
    _, initial = Trainer.create(pipeline.model, OPTIMIZER, jax.random.key(0), stage=1)
    (before, before_terms), (after, after_terms) = (
        loss(state.params, trainer.frozen, inputs, labels, jax.random.key(0)) for state in (initial, result.state))
    print(f"stage-1 loss of the four examples: {float(before):.4f} before ({float(before_terms['loss.future_traj']):.4f}"
          f" + {float(before_terms['loss.others']):.4f}), {float(after):.4f} after {STEPS} steps "
          f"({float(after_terms['loss.future_traj']):.4f} + {float(after_terms['loss.others']):.4f}); "
          f"per step {np.round(result.losses[::8], 3).tolist()}")
    assert float(after) < 0.5 * float(before)
    assert len(result.losses) == STEPS and np.isfinite(result.losses).all()
    # Only the VLM trains; the vision tower's updates are a tenth of the language model's (Adam's
    # steps are about the learning rate in size whatever the gradient's).
    assert set(result.state.params) == {"vlm"}

    def mean_step(module):
        new, old = (jax.tree.leaves(state.params["vlm"][module]) for state in (result.state, initial))
        return float(np.mean([np.abs(np.asarray(a) - np.asarray(b)).mean() for a, b in zip(new, old, strict=True)]))

    ratio = mean_step("visual") / mean_step("language_model")
    print(f"mean |update| of the vision tower / the language model after {STEPS} steps: {ratio:.3f}")
    assert 0.03 < ratio < 0.3


def test_stage1_resume_repeats_the_uninterrupted_run(pipeline, clips, uninterrupted, tmp_path):
    """The uninterrupted run's directory cut back to its step-30 checkpoint, resumed: steps 31-40
    and the final parameters equal the uninterrupted run's bit for bit."""
    run_dir, _, full = uninterrupted
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / CHECKPOINT_DIR / str(STEPS))
    metrics = tmp_path / "run" / METRICS_FILE
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:30]))
    _, resumed = run(pipeline, clips, tmp_path / "run", STEPS, resume=True)
    assert resumed.losses == full.losses[30:]
    for ours, theirs in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(full.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {"loss", "loss.future_traj", "loss.others", "grad_norm", "learning_rate"} <= set(records[-1])
    assert records[-1]["loss"] == pytest.approx(records[-1]["loss.future_traj"] + records[-1]["loss.others"], rel=1e-6)


def test_stage1_bfloat16_parameters_keep_a_float32_optimizer_state(fixture_dir, clips):
    pipeline = Pipeline.load(fixture_dir / "hf", processor_dir=fixture_dir / "vlm", dtype="bfloat16")
    batch = collate(clips[:2], tokenizer=pipeline.tokenizer, chat_template=pipeline.chat_template,
                    config=pipeline.config)
    optimizer = OptimizerConfig.stage1(4, learning_rate=1e-2, warmup_steps=1, gradient_accumulation_steps=1)
    trainer, state = Trainer.create(pipeline.model, optimizer, jax.random.key(0), stage=1)
    inputs, labels = trainer.prepare(batch, pipeline.split)
    losses = []
    for _ in range(4):
        state, metrics = trainer.step(state, inputs, labels)
        losses.append(float(metrics["loss"]))
    print(f"stage 1, bfloat16 parameters: losses {np.round(losses, 3).tolist()}")
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves(state.opt_state)
            if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
