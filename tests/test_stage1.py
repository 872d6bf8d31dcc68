"""Stage 1 (the VLM's next-token loss on the trajectory tokens) against NVIDIA's fine-tuning code on
the tiny checkpoint (`tests/fixtures/tiny_ar1_dev/train`): the supervised targets and their split
into the two terms, the logits there, the two-term loss, every VLM gradient, the batches of one and
the toy vocabulary's unpatched mask.

float32, highest matmul precision (conftest). Tolerances are the fixture README's, relative to
each tensor's max |reference|: logits 1e-5, loss and future_traj 1e-6, others 2e-6, gradients
5e-5. The batch is collated here from the fixture's `input.*` (its `data.*` tensors are checked in
tests/test_training_data.py). The gradients are taken with the language model's layers
rematerialised, as the trainer runs stage 1 (the `loss --stage 1` command, tests/test_train_cli.py,
checks the path without remat against the same numbers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from alpamayo_jax.config import tiny
from alpamayo_jax.processing.chat_template import load_chat_template
from alpamayo_jax.processing.clip import Clip
from alpamayo_jax.processing.collate import collate
from alpamayo_jax.processing.tokenizer import build_tokenizer
from alpamayo_jax.processing.training_prompt import IGNORE_INDEX
from alpamayo_jax.training.stage1 import (
    masked_mean,
    next_token_loss,
    stage1_gradients,
    stage1_loss,
    supervised_logits,
    supervised_tail,
)
from tests.parity import assert_close

CONFIG = tiny()
# The fixture README's tolerances (of max |reference|) for the loss and its terms.
LOSS_TOLERANCE = {"loss": 1e-6, "loss.future_traj": 1e-6, "loss.others": 2e-6}


@pytest.fixture(scope="module")
def train(fixture_dir):
    return load_file(fixture_dir / "train" / "train_golden.safetensors")


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return build_tokenizer(fixture_dir / "vlm", CONFIG)


def fixture_clips(train) -> list[Clip]:
    return [Clip.create(train[f"input.image_frames.{b}"], train["input.ego_history_xyz"][b, 0],
                        train["input.ego_history_rot"][b, 0], ego_future_xyz=train["input.ego_future_xyz"][b, 0],
                        ego_future_rot=train["input.ego_future_rot"][b, 0]) for b in range(2)]


def collated(train, tokenizer, fixture_dir, rows=slice(None)):
    return collate(fixture_clips(train)[rows], tokenizer=tokenizer,
                   chat_template=load_chat_template(fixture_dir / "vlm"), config=CONFIG)


# One compiled forward for every batch of a shape.
forward = jax.jit(stage1_loss)


@pytest.fixture(scope="module")
def batch(train, tokenizer, fixture_dir):
    return collated(train, tokenizer, fixture_dir)


@pytest.fixture(scope="module")
def outputs(tiny_model, batch):
    _, (terms, aux) = forward(tiny_model, batch.fused_inputs(), jnp.asarray(batch.labels()))
    return terms, aux


def test_targets_and_their_terms(outputs, train):
    """The supervised targets (131 a row: `<|traj_future_start|>`, 128 future tokens,
    `<|traj_future_end|>`, the assistant's `<|im_end|>`) and which term each belongs to."""
    _, aux = outputs
    np.testing.assert_array_equal(np.asarray(aux.future_traj_mask), train["stage1.traj_mask"][:, 1:])
    np.testing.assert_array_equal(np.asarray(aux.others_mask), train["stage1.others_mask"][:, 1:])
    supervised = np.asarray(aux.future_traj_mask | aux.others_mask)
    positions = np.stack([np.flatnonzero(row) for row in supervised])  # logit i predicts label i + 1
    np.testing.assert_array_equal(positions, train["stage1.logit_positions"])
    targets = np.take_along_axis(np.asarray(aux.targets), positions, axis=1)
    np.testing.assert_array_equal(targets, train["stage1.targets"])
    is_traj = np.take_along_axis(np.asarray(aux.future_traj_mask), positions, axis=1)
    np.testing.assert_array_equal(is_traj, train["stage1.target_is_traj"])
    assert is_traj.sum(axis=1).tolist() == [130, 130]


def test_logits_and_loss_match_the_reference(outputs, train):
    terms, aux = outputs
    logits = np.stack(supervised_logits(aux))
    assert_close(logits, train["stage1.logits_at_supervised"], 1e-5, "stage1.logits_at_supervised")
    for name, value in (("loss", terms.total), ("loss.future_traj", terms.future_traj), ("loss.others", terms.others)):
        assert_close(value, train[f"stage1.{name}"], LOSS_TOLERANCE[name], f"stage1.{name}")
    # A sum of two means, not the token mean over all 262 targets (what Hugging Face computes).
    token_mean = float(np.asarray(aux.token_loss).sum() / 262)
    assert_close(token_mean, train["stage1.hf_internal_vlm_loss"], 1e-6, "token mean (discarded by the reference)")
    assert abs(float(terms.total) - token_mean) > 7


def test_the_label_tail_holds_every_supervised_label(batch):
    """Left padding and the assistant turn last: the 131 targets of each row and the position
    before them fit in the last 133 of 361 positions, rounded up to 192."""
    labels = batch.labels()
    assert labels.shape == (2, 361) and supervised_tail(labels) == 192
    assert (labels[:, :-192] == IGNORE_INDEX).all() and (labels[:, -133] == IGNORE_INDEX).all()
    assert (labels[:, -132] != IGNORE_INDEX).any()
    assert supervised_tail(labels, multiple=1) == 133 and supervised_tail(labels, multiple=512) == 361
    assert supervised_tail(np.full((2, 50), IGNORE_INDEX)) == 50  # nothing supervised


def test_every_vlm_gradient_matches_the_reference(tiny_model, batch, train, outputs):
    """Through the label tail training uses (logits at its 192 positions only): the reference's
    gradients, and the loss of the full labels."""
    labels = batch.labels()
    values, grads = stage1_gradients(tiny_model, batch.fused_inputs(), labels[:, -supervised_tail(labels):],
                                     remat=True)
    expected = {key[len("grad.stage1."):]: value for key, value in train.items() if key.startswith("grad.stage1.")}
    assert len(expected) == 93 and set(grads) == set(expected)  # every VLM parameter, nothing else
    assert all(grads[key].dtype == np.float32 and grads[key].shape == value.shape for key, value in expected.items())
    worst = max(assert_close(grads[key], value, 5e-5, f"grad.stage1.{key}") for key, value in expected.items())
    norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))
    print(f"stage-1 gradients: worst relative error {worst:.2e} over {len(expected)} tensors; global norm "
          f"{norm:.6g} (reference 28.1857)")
    assert abs(norm - 28.1857) < 1e-3
    assert_close(values["loss"], train["stage1.loss"], 1e-6, "stage1.loss (gradient run)")
    assert_close(values["loss"], float(outputs[0].total), 1e-6, "tail loss vs full-label loss")


@pytest.mark.parametrize("row", [0, 1])
def test_batch_of_one(tiny_model, train, tokenizer, fixture_dir, row):
    """Each sample alone (no padding): with 131 targets in every row, the batch's terms are the
    means of these."""
    single = collated(train, tokenizer, fixture_dir, slice(row, row + 1))
    _, (terms, _) = forward(tiny_model, single.fused_inputs(), jnp.asarray(single.labels()))
    for name, value in (("loss", terms.total), ("loss.future_traj", terms.future_traj),
                        ("loss.others", terms.others)):
        assert_close(value, train[f"stage1.b1.{row}.{name}"], LOSS_TOLERANCE[name], f"stage1.b1.{row}.{name}")


def test_toy_unpatched_mask(tiny_model, batch, train):
    """`data.labels_mask_toy_unpatched` is what the reference's collate gives on this toy vocabulary
    without the fixture's shim: it looks the role "assistant" up as ONE token, the toy BPE
    vocabulary has no such token, so no turn is the assistant's and its `<|im_end|>` is not
    supervised. With it the `others` term has no target and is 0 (the reference's early return),
    and `future_traj` is unchanged. Our collate finds the assistant turn by its header tokens, so
    its mask is `data.labels_mask` (the shimmed, production behaviour); this test feeds the
    unpatched mask to show the loss handles an empty term as the reference does."""
    labels = np.where(train["data.labels_mask_toy_unpatched"], batch.fused_input_ids(), IGNORE_INDEX)
    _, (terms, _) = forward(tiny_model, batch.fused_inputs(), jnp.asarray(labels))
    assert float(terms.others) == 0.0 == float(train["stage1.toy_unpatched.loss.others"])
    assert_close(terms.future_traj, train["stage1.toy_unpatched.loss.future_traj"], 1e-6, "toy_unpatched future_traj")
    assert_close(terms.total, train["stage1.toy_unpatched.loss"], 1e-6, "toy_unpatched loss")


def test_empty_terms_and_nan_are_zero():
    """On hand-made logits: a term without targets is 0, a NaN term is 0, and each term is the
    mean over its own targets."""
    vocab = CONFIG.text.vocab_size
    logits = jax.random.normal(jax.random.key(0), (2, 5, vocab))
    nothing = jnp.full((2, 5), IGNORE_INDEX)
    terms, _ = next_token_loss(logits, nothing, CONFIG)
    assert (float(terms.total), float(terms.future_traj), float(terms.others)) == (0.0, 0.0, 0.0)
    traj_id, text_id = CONFIG.traj_token_start_idx + 3, 7
    labels = nothing.at[0, 2].set(traj_id).at[1, 4].set(text_id).at[1, 3].set(text_id)
    terms, _aux = next_token_loss(logits, labels, CONFIG)
    ce = jax.nn.logsumexp(logits, axis=-1)
    assert_close(terms.future_traj, ce[0, 1] - logits[0, 1, traj_id], 1e-6, "future_traj of one target")
    expected_others = ((ce[1, 3] - logits[1, 3, text_id]) + (ce[1, 2] - logits[1, 2, text_id])) / 2
    assert_close(terms.others, expected_others, 1e-6, "others: mean of two targets")
    nan_logits = logits.at[1].set(jnp.nan)
    terms, _ = next_token_loss(nan_logits, labels, CONFIG)
    assert float(terms.others) == 0.0 and np.isfinite(float(terms.future_traj))
    assert float(masked_mean(jnp.ones(3), jnp.zeros(3, bool))) == 0.0


def test_remat_covers_the_language_model_layers(tiny_model, batch):
    """`remat=True` puts every language-model layer under a rematerialisation in the gradient's
    program (none without it)."""
    from flax import nnx

    from alpamayo_jax.training.optimizer import TrainingStage, trainable_filter

    graphdef, trainable, frozen = nnx.split(tiny_model, trainable_filter(TrainingStage.VLM), ...)
    inputs, labels = batch.fused_inputs(), jnp.asarray(batch.labels())
    counts = {}
    for remat in (False, True):
        def loss(trainable, remat=remat):
            return stage1_loss(nnx.merge(graphdef, trainable, frozen), inputs, labels, remat=remat)[0]

        counts[remat] = str(jax.make_jaxpr(jax.grad(loss))(trainable)).count("remat")
    assert counts[False] == 0 and counts[True] >= CONFIG.text.num_hidden_layers
