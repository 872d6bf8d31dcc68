"""Stage 2 (the expert's flow-matching loss on the frozen VLM) against NVIDIA's fine-tuning code on
the tiny checkpoint (`tests/fixtures/tiny_ar1_dev/train`): clean actions, predictions, loss and
every gradient, in the reference's attention mode and in the default one.

float32, highest matmul precision (conftest). Tolerances are the fixture README's: with the
fixture's x, t and noise fed in (`stage2_x_injected`): prediction 2e-5, loss 5e-6, gradients 2e-5
(of each tensor's max |reference|); x from `traj_to_action` 5e-4; end to end (x computed here)
prediction 5e-3, loss 5e-5, gradients 5e-2, because the least-squares fit is ill-conditioned in
float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from alpamayo_jax.config import tiny
from alpamayo_jax.io.assign import export_plan
from alpamayo_jax.io.weight_map import alpamayo_rules, to_checkpoint_layout
from alpamayo_jax.nn.variables import module_variables
from alpamayo_jax.processing.model_inputs import ModelInputs, assemble_inputs
from alpamayo_jax.training.optimizer import TrainingStage, trainable_filter
from alpamayo_jax.training.stage2 import FlowDraw, draw_flow, fit_actions, stage2_loss
from tests.parity import assert_close

CONFIG = tiny()


@pytest.fixture(scope="module")
def train(fixture_dir):
    return load_file(fixture_dir / "train" / "train_golden.safetensors")


def fixture_inputs(train, rows=slice(None)) -> ModelInputs:
    """The collate's batch (history fused, left-padded) for `rows`; a single row loses its padding."""
    ids, mask = train["data.input_ids"][rows], train["data.attention_mask"][rows].astype(bool)
    pixel_rows = np.cumsum([0] + [int(np.prod(g)) for g in train["data.image_grid_thw"]])
    per_sample = len(train["data.image_grid_thw"]) // 2
    samples = range(2)[rows]
    keep = mask.any(axis=0)  # columns some row attends (a lone row drops its left padding)
    pixels = np.concatenate([train["data.pixel_values"][pixel_rows[s * per_sample]:pixel_rows[(s + 1) * per_sample]]
                             for s in samples])
    grid = np.concatenate([train["data.image_grid_thw"][s * per_sample:(s + 1) * per_sample] for s in samples])
    return assemble_inputs(ids[:, keep], pixels, grid, train["input.ego_history_xyz"][rows, 0],
                           train["input.ego_history_rot"][rows, 0], config=CONFIG, attention_mask=mask[:, keep])


def injected(train, rows=slice(None)) -> dict:
    return {"actions": jnp.asarray(train["stage2.x"][rows]),
            "draw": FlowDraw(jnp.asarray(train["stage2.timesteps"][rows, 0, 0]), jnp.asarray(train["stage2.noise"][rows]))}


def loss_and_grads(model, inputs, *, actions, draw, expert_attention):
    """Loss, aux and the gradient of every parameter (the VLM's included), as {path: array}."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        merged = nnx.merge(graphdef, params, rest)
        return stage2_loss(merged, inputs, actions, draw, expert_attention=expert_attention)

    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    flat = {".".join(map(str, path)): v for path, v in nnx.to_flat_state(grads)}
    return value, aux, {path: np.asarray(v.get_value() if hasattr(v, "get_value") else v) for path, v in flat.items()}


def checkpoint_layout(model, grads: dict) -> dict:
    """Gradients keyed and laid out like the checkpoint (`grad.<checkpoint key>` in the fixture)."""
    variables = module_variables(model)
    return {key: to_checkpoint_layout(rule, grads[path], variables[path].get_metadata().get("conv_shape"))
            for key, (path, rule, _) in export_plan(model, alpamayo_rules()).items() if path in grads}


@pytest.fixture(scope="module")
def reference_run(tiny_model, train):
    inputs = fixture_inputs(train)
    return inputs, loss_and_grads(tiny_model, inputs, expert_attention="reference", **injected(train))


def test_inputs_are_the_reference_vlm_inputs(reference_run, train):
    inputs, _ = reference_run
    np.testing.assert_array_equal(inputs.input_ids, train["stage2.vlm_input_ids"])
    np.testing.assert_array_equal(inputs.position_ids, train["data.position_ids"])
    np.testing.assert_array_equal(inputs.rope_deltas, train["stage2.rope_deltas"][:, 0])


def test_clean_actions_match_traj_to_action(tiny_split, reference_run, train):
    inputs, _ = reference_run
    x = fit_actions(tiny_split, inputs, train["input.ego_future_xyz"][:, 0], train["input.ego_future_rot"][:, 0])
    assert_close(x, train["stage2.x"], 5e-4, "stage2.x")


def test_reference_mode_matches_the_reference(tiny_model, reference_run, train):
    _, (loss, aux, grads) = reference_run
    assert_close(aux.prediction, train["stage2.pred"], 2e-5, "stage2.pred (x injected)")
    assert_close(loss, train["stage2.loss"], 5e-6, "stage2.loss (x injected)")
    assert_close(aux.x_t, train["stage2.noisy_x"], 1e-6, "stage2.noisy_x")
    assert_close(aux.target, train["stage2.target_velocity"], 1e-6, "stage2.target_velocity")
    np.testing.assert_array_equal(np.asarray(aux.cache_lengths), [int(train["stage2.cache_len"])] * 2)
    expected = {key[len("grad.stage2."):]: value for key, value in train.items() if key.startswith("grad.stage2.")}
    ours = checkpoint_layout(tiny_model, grads)
    assert len(expected) == 46
    worst = max(assert_close(ours[key], value, 2e-5, f"grad {key}") for key, value in expected.items())
    print(f"worst gradient relative error {worst:.2e} over {len(expected)} tensors")
    # Nothing else learns: every VLM gradient is exactly zero, and so are the trainable set's others.
    trainable = set(module_variables(nnx.eval_shape(lambda: tiny_model)).keys())
    assert all(not grads[path].any() for path in grads if path.startswith("vlm."))
    assert set(expected) == {k for k in ours if not k.startswith("vlm.")} & set(expected)
    assert trainable >= set(grads)


@pytest.mark.parametrize("row", [0, 1])
def test_batch_of_one(tiny_model, train, row):
    rows = slice(row, row + 1)
    loss, aux, _ = loss_and_grads(tiny_model, fixture_inputs(train, rows), expert_attention="reference",
                                  **injected(train, rows))
    assert_close(aux.prediction, train[f"stage2.b1.{row}.pred"], 2e-5, f"stage2.b1.{row}.pred")
    assert_close(loss, train[f"stage2.b1.{row}.loss"], 5e-6, f"stage2.b1.{row}.loss")


def test_default_mode_does_not_depend_on_the_batch(tiny_model, reference_run, train):
    """Default: bidirectional action tokens (as at inference), padding masked. The padded sample's
    default prediction is the one it gets alone, while the reference mode's changes with the
    batch (its left padding is visible: 0.263 max abs in the fixture). The two modes also differ
    on the unpadded sample, since the reference's action tokens attend causally."""
    inputs, (_, reference, _) = reference_run
    loss, aux, _ = loss_and_grads(tiny_model, inputs, expert_attention="default", **injected(train))
    alone = loss_and_grads(tiny_model, fixture_inputs(train, slice(1, 2)), expert_attention="default",
                           **injected(train, slice(1, 2)))[1]
    assert_close(aux.prediction[1:], alone.prediction, 1e-5, "default mode: padded sample batched vs alone")
    leak = float(np.abs(np.asarray(reference.prediction[1]) - train["stage2.b1.1.pred"][0]).max())
    padded = float(jnp.abs(aux.prediction[1] - reference.prediction[1]).max())
    unpadded = float(jnp.abs(aux.prediction[0] - reference.prediction[0]).max())
    print(f"reference mode, padded sample batched vs alone: {leak:.3e}; default vs reference mode: padded "
          f"sample {padded:.3e}, unpadded sample {unpadded:.3e}; loss {float(loss):.5f} (default) vs "
          f"{float(train['stage2.loss']):.5f} (reference)")
    assert leak > 0.1 and padded > 1e-2 and unpadded > 1e-2


def test_end_to_end_and_trainable_filter(tiny_model, tiny_split, train):
    """x computed here (not injected), gradients taken only for the stage-2 trainable set."""
    inputs = fixture_inputs(train)
    draw = injected(train)["draw"]
    actions = fit_actions(tiny_split, inputs, train["input.ego_future_xyz"][:, 0], train["input.ego_future_rot"][:, 0])
    graphdef, trainable, rest = nnx.split(tiny_model, trainable_filter(TrainingStage.EXPERT), ...)

    def loss(trainable):
        return stage2_loss(nnx.merge(graphdef, trainable, rest), inputs, actions, draw, expert_attention="reference")

    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    assert_close(aux.prediction, train["stage2.pred"], 5e-3, "stage2.pred end to end")
    assert_close(value, train["stage2.loss"], 5e-5, "stage2.loss end to end")
    flat = {".".join(map(str, p)): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for p, v in nnx.to_flat_state(grads)}
    ours = checkpoint_layout(tiny_model, flat)
    expected = {key[len("grad.stage2."):]: value for key, value in train.items() if key.startswith("grad.stage2.")}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert_close(ours[key], value, 5e-2, f"grad {key} end to end")


def test_draws_come_from_the_key_and_the_config():
    first = draw_flow(jax.random.key(0), 3, 64, CONFIG.flow_matching)
    again = draw_flow(jax.random.key(0), 3, 64, CONFIG.flow_matching)
    np.testing.assert_array_equal(np.asarray(first.noise), np.asarray(again.noise))
    assert first.noise.shape == (3, 64, 2) and first.timesteps.shape == (3,)
    assert float(first.timesteps.max()) <= 0.999
