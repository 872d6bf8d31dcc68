"""Training examples and their collate against the reference's fine-tuning data path
(`tests/fixtures/tiny_ar1_dev/train`: two clips of different image sizes, so different prompt
lengths and left padding)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from alpamayo_jax.config import tiny
from alpamayo_jax.processing.chat_template import PromptError, load_chat_template
from alpamayo_jax.processing.clip import Clip, ClipError
from alpamayo_jax.processing.collate import TrainingBatch, collate, last_future_start
from alpamayo_jax.processing.image import (
    flatten_camera_frames,
    patchify,
    preprocess_images,
    resize_bicubic_aa_float,
)
from alpamayo_jax.processing.model_inputs import left_pad
from alpamayo_jax.processing.prompt import history_tokens
from alpamayo_jax.processing.tokenizer import build_tokenizer, special_token
from alpamayo_jax.processing.training_prompt import (
    IGNORE_INDEX,
    encode_training_prompt,
    future_tokens,
    labels_mask,
    render_training_prompt,
    training_messages,
)

CFG = tiny()


@pytest.fixture(scope="module")
def train_dir(fixture_dir):
    return fixture_dir / "train"


@pytest.fixture(scope="module")
def data(train_dir):
    return load_file(train_dir / "train_golden.safetensors")


@pytest.fixture(scope="module")
def meta(train_dir):
    return json.loads((train_dir / "train_golden.json").read_text())["meta"]


@pytest.fixture(scope="module")
def tok(fixture_dir):
    return build_tokenizer(fixture_dir / "vlm", CFG)


@pytest.fixture(scope="module")
def template(fixture_dir):
    return load_chat_template(fixture_dir / "vlm")


def _clip(data, b: int, *, ground_truth: bool = True) -> Clip:
    future = {}
    if ground_truth:
        future = {
            "ego_future_xyz": data["input.ego_future_xyz"][b, 0],
            "ego_future_rot": data["input.ego_future_rot"][b, 0],
        }
    return Clip.create(
        data[f"input.image_frames.{b}"],
        data["input.ego_history_xyz"][b, 0],
        data["input.ego_history_rot"][b, 0],
        **future,
    )


@pytest.fixture(scope="module")
def clips(data):
    return [_clip(data, 0), _clip(data, 1)]


@pytest.fixture(scope="module")
def batch(clips, tok, template) -> TrainingBatch:
    return collate(clips, tokenizer=tok, chat_template=template, config=CFG)


def _assert_equal(ours, reference, name):
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, f"{name}: shape {ours.shape} != {reference.shape}"
    np.testing.assert_array_equal(ours, reference, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Against the fixture
# ---------------------------------------------------------------------------------------------


def test_rendered_text_matches_reference(meta, tok, template):
    text = render_training_prompt(
        16,
        tokenizer=tok,
        chat_template=template,
        num_history_tokens=CFG.tokens_per_history_traj,
        num_future_tokens=CFG.tokens_per_future_traj,
    )
    # Both samples have 16 images, so the same text before image-token expansion.
    assert meta["text_chat_template"] == [text, text]
    assert text.endswith(special_token("traj_future_end") + "<|im_end|>\n")


def test_prompt_ids_and_left_padding_match_reference(data, meta, clips, tok, template):
    encoded = [
        encode_training_prompt(c.camera_frames, tokenizer=tok, chat_template=template, config=CFG)
        for c in clips
    ]
    assert [len(ids) for ids, _, _ in encoded] == meta["prompt_lengths_unpadded"]
    ids, mask = left_pad([ids for ids, _, _ in encoded], tok.pad_token_id)
    _assert_equal(ids, data["data.input_ids"], "data.input_ids")
    _assert_equal(mask, data["data.attention_mask"].astype(bool), "data.attention_mask")
    assert tok.pad_token_id == meta["token_ids"]["pad_token_id"]


def test_batch_matches_reference_exactly(batch, data):
    inputs = batch.inputs
    _assert_equal(inputs.attention_mask, data["data.attention_mask"].astype(bool), "data.attention_mask")
    _assert_equal(np.asarray(inputs.image_grid), data["data.image_grid_thw"], "data.image_grid_thw")
    _assert_equal(inputs.position_ids, data["data.position_ids"], "data.position_ids")
    _assert_equal(inputs.rope_deltas[:, None], data["data.rope_deltas"], "data.rope_deltas")
    _assert_equal(batch.future_token_ids, data["data.future_tokens"], "data.future_tokens")
    _assert_equal(batch.fused_input_ids(), data["data.fused_input_ids"], "data.fused_input_ids")
    _assert_equal(batch.labels_mask, data["data.labels_mask"], "data.labels_mask")
    _assert_equal(batch.labels(), data["data.labels"], "data.labels")
    # Stage 2 feeds the VLM the prompt with only the history fused, and crops its cache here.
    _assert_equal(inputs.input_ids, data["stage2.vlm_input_ids"], "stage2.vlm_input_ids")
    assert last_future_start(batch) == int(data["stage2.cache_len"]) == 230
    _assert_equal(batch.ego_future_xyz, data["input.ego_future_xyz"][:, 0], "ego_future_xyz")
    _assert_equal(batch.ego_future_rot, data["input.ego_future_rot"][:, 0], "ego_future_rot")
    assert (batch.labels() != IGNORE_INDEX).sum(axis=1).tolist() == [131, 131]
    assert len(jax.tree_util.tree_leaves(batch)) == len(jax.tree_util.tree_leaves(inputs)) + 4  # a pytree


def test_every_data_tensor_is_reproduced(batch, data, clips, tok, template):
    """Each `data.*` tensor of the fixture, from the clips (`input.*`) through our collate: the
    integer and boolean ones exactly, the pixels to 1e-7. The toy vocabulary's unpatched mask is
    what a role that matches no turn gives (test_toy_unpatched_mask_is_what_a_one_token_lookup_gives)."""
    encoded = [encode_training_prompt(c.camera_frames, tokenizer=tok, chat_template=template, config=CFG)
               for c in clips]
    history = CFG.traj_token_ids.history
    inputs = batch.inputs
    ours = {
        "data.input_ids": left_pad([ids for ids, _, _ in encoded], tok.pad_token_id)[0],
        "data.attention_mask": inputs.attention_mask.astype(np.int64),
        "data.image_grid_thw": np.asarray(inputs.image_grid),
        "data.position_ids": inputs.position_ids,
        "data.rope_deltas": inputs.rope_deltas[:, None],
        "data.hist_tokens_raw": np.stack([history_tokens(c.ego_history_xyz, c.ego_history_rot, CFG) for c in clips]),
        "data.hist_tokens": inputs.input_ids[data["data.input_ids"] == history].reshape(2, -1),
        "data.future_tokens_raw": batch.future_token_ids - CFG.traj_token_start_idx,
        "data.future_tokens": batch.future_token_ids,
        "data.fused_input_ids": batch.fused_input_ids(),
        "data.labels_mask": batch.labels_mask,
        "data.labels_mask_toy_unpatched": labels_mask(data["data.input_ids"], tokenizer=tok, config=CFG,
                                                      role="nobody"),
        "data.labels": batch.labels(),
    }
    assert set(ours) | {"data.pixel_values"} == {key for key in data if key.startswith("data.")}
    for key, value in ours.items():
        assert data[key].dtype.kind in "biu", key
        _assert_equal(value, data[key], key)
    error = float(np.abs(inputs.pixel_values - data["data.pixel_values"]).max())
    print(f"data.pixel_values: max abs error {error:.3g}; every other data.* tensor exact")
    assert inputs.pixel_values.shape == data["data.pixel_values"].shape and error <= 1e-7
    # Stage 1's input: the fused ids with the same positions (they depend on images and padding only).
    fused = batch.fused_inputs()
    _assert_equal(fused.input_ids, data["data.fused_input_ids"], "fused_inputs().input_ids")
    _assert_equal(fused.position_ids, data["data.position_ids"], "fused_inputs().position_ids")


def test_history_and_future_tokens_match_reference(batch, data, clips):
    hist = np.stack([history_tokens(c.ego_history_xyz, c.ego_history_rot, CFG) for c in clips])
    _assert_equal(hist, data["data.hist_tokens_raw"], "data.hist_tokens_raw")
    placeholders = data["data.input_ids"] == CFG.traj_token_ids.history
    fused_history = batch.inputs.input_ids[placeholders].reshape(2, -1)
    _assert_equal(fused_history, data["data.hist_tokens"], "data.hist_tokens")
    assert (data["data.hist_tokens"] - hist == CFG.history_token_start_idx).all()

    raw = future_tokens(
        data["input.ego_history_xyz"][:, 0],
        data["input.ego_history_rot"][:, 0],
        data["input.ego_future_xyz"][:, 0],
        data["input.ego_future_rot"][:, 0],
        CFG,
    )
    _assert_equal(raw, data["data.future_tokens_raw"], "data.future_tokens_raw")
    assert (batch.future_token_ids - raw == CFG.traj_token_start_idx).all()


def test_pixel_values_float_path(batch, data, golden):
    """The training processor scales to float x / 255 before the (here skipped) resize and
    normalises from there; the inference path normalises the uint8 values directly. Without a
    resize the two differ only by float32 rounding."""
    error = float(np.abs(batch.inputs.pixel_values - data["data.pixel_values"]).max())
    print(f"pixel_values max abs error vs the training collate: {error:.3g}")
    assert batch.inputs.pixel_values.shape == data["data.pixel_values"].shape
    assert error <= 1e-7
    # Sample 0's frames are the inference fixture's; the uint8 path reproduces the inference
    # pixels, the float path the training pixels.
    np.testing.assert_array_equal(data["input.image_frames.0"], golden["input.image_frames"])
    inference = golden["processor.pixel_values"]
    uint8_path, _ = preprocess_images(
        flatten_camera_frames(data["input.image_frames.0"]),
        vision=CFG.vision,
        min_pixels=CFG.min_pixels,
        max_pixels=CFG.max_pixels,
    )
    np.testing.assert_array_equal(uint8_path, inference)
    train_vs_inference = float(np.abs(batch.inputs.pixel_values[: len(inference)] - inference).max())
    print(f"training vs inference pixel values, sample 0: {train_vs_inference:.4g}")
    assert 0 < train_vs_inference < 1e-7


def test_batch_of_one_has_no_padding(clips, data, tok, template):
    for b, pad in ((0, 0), (1, 32)):
        single = collate([clips[b]], tokenizer=tok, chat_template=template, config=CFG)
        length = 361 - pad
        assert single.inputs.attention_mask.shape == (1, length) and single.inputs.attention_mask.all()
        _assert_equal(
            single.inputs.input_ids[0], data["stage2.vlm_input_ids"][b, pad:], f"ids of clip {b} alone"
        )
        _assert_equal(
            single.fused_input_ids()[0], data["data.fused_input_ids"][b, pad:], f"fused ids of clip {b}"
        )
        _assert_equal(single.labels_mask[0], data["data.labels_mask"][b, pad:], f"labels_mask of clip {b}")
        # Left padding does not move the real tokens' positions; it lowers rope_deltas by the padding.
        _assert_equal(
            single.inputs.position_ids[:, 0], data["data.position_ids"][:, b, pad:], f"positions of clip {b}"
        )
        assert single.inputs.rope_deltas[0] == data["data.rope_deltas"][b, 0] + pad
        assert last_future_start(single) == int(data["stage2.cache_len"]) - pad


# ---------------------------------------------------------------------------------------------
# The supervised tokens
# ---------------------------------------------------------------------------------------------


def _hand_built_prompt(tok, turns):
    """ids of `<|im_start|>role\\n text <|im_end|>\\n` per (role, text) turn, left-padded by 3."""
    pad = [tok.pad_token_id] * 3
    ids = list(pad)
    for role, text in turns:
        ids += tok.encode(f"<|im_start|>{role}\n{text}<|im_end|>\n", add_special_tokens=False)
    return np.asarray([ids])


def test_assistant_turn_is_found_structurally(tok):
    """The assistant's end of turn is supervised where the tokens after `<|im_start|>` are the
    tokenisation of "assistant" (4 sub-tokens in this toy vocabulary, the first being 'a'): not
    where the text merely mentions the word, nor for another role that starts with the same
    sub-token 'a' (the reference's one-token lookup, patched to 'a', would take that turn too)."""
    assert "assistant" not in tok.get_vocab()
    assert len(tok.encode("assistant", add_special_tokens=False)) > 1
    assert tok.encode("a", add_special_tokens=False) == tok.encode("assistant", add_special_tokens=False)[:1]
    future = (
        special_token("traj_future_start")
        + special_token("traj_future") * 2
        + special_token("traj_future_end")
    )
    ids = _hand_built_prompt(
        tok,
        [
            ("system", "be safe"),
            ("user", "assistant, output the future trajectory."),
            ("a", "not the assistant"),
            ("assistant", future),
            ("assistant", "second answer"),
        ],
    )
    mask = labels_mask(ids, tokenizer=tok, config=CFG)
    row = ids[0]
    ends = np.flatnonzero(row == tok.token_to_id("<|im_end|>"))
    start = int(np.flatnonzero(row == CFG.traj_token_ids.future_start)[0])
    end = int(np.flatnonzero(row == CFG.traj_token_ids.future_end)[0])
    expected = np.zeros_like(mask)
    expected[0, start : end + 1] = True
    expected[0, ends[3:]] = True  # the two assistant turns, not system / user / "a"
    _assert_equal(mask, expected, "labels_mask")
    assert mask[0, ends[3]] and mask[0, ends[4]] and not mask[0, ends[:3]].any()


def test_toy_unpatched_mask_is_what_a_one_token_lookup_gives(batch, data, tok):
    """`data.labels_mask_toy_unpatched` is the reference's mask without the fixture's shim: it
    looks "assistant" up as ONE token, and this toy vocabulary has no such token, so no turn
    matches and only the `<|traj_future_start|>` ... `<|traj_future_end|>` span is supervised
    (130 tokens per row, without the assistant's `<|im_end|>`). The structural rule finds the
    assistant turn whatever the vocabulary, so it gives `data.labels_mask` (131): the shim's
    first sub-token 'a' (id 64) is the token right after `<|im_start|>` there."""
    unpatched = data["data.labels_mask_toy_unpatched"]
    assert tok.get_vocab().get("assistant") is None
    assert unpatched.sum(axis=1).tolist() == [130, 130]
    # A role that matches no turn is what the failed lookup amounts to.
    _assert_equal(
        labels_mask(data["data.input_ids"], tokenizer=tok, config=CFG, role="nobody"), unpatched, "unpatched"
    )
    im_end = data["data.input_ids"] == tok.token_to_id("<|im_end|>")
    _assert_equal(batch.labels_mask & ~im_end, unpatched, "labels_mask without the assistant <|im_end|>")
    assert tok.encode("assistant", add_special_tokens=False)[0] == 64


def test_unpaired_turns_are_errors(tok):
    ids = _hand_built_prompt(tok, [("user", "hi")])
    broken = np.concatenate([ids, [[tok.token_to_id("<|im_end|>")]]], axis=1)
    with pytest.raises(PromptError, match="row 0: 1 turn starts but 2 ends"):
        labels_mask(broken, tokenizer=tok, config=CFG)


# ---------------------------------------------------------------------------------------------
# Errors and the float resize
# ---------------------------------------------------------------------------------------------


def test_clip_without_ground_truth_is_an_error_naming_it(data, tok, template):
    clips = [_clip(data, 0), _clip(data, 1, ground_truth=False)]
    with pytest.raises(
        ClipError, match=r"clip 1: no ground-truth future \(ego_future_xyz and ego_future_rot are None\)"
    ):
        collate(clips, tokenizer=tok, chat_template=template, config=CFG)
    with pytest.raises(PromptError, match="no clips"):
        collate([], tokenizer=tok, chat_template=template, config=CFG)


def test_messages_are_the_trajectory_only_conversation():
    system, user, assistant = training_messages(2, num_history_tokens=3, num_future_tokens=4)
    assert [m["role"] for m in (system, user, assistant)] == ["system", "user", "assistant"]
    assert [item["type"] for item in user["content"]] == ["image", "image", "text", "text"]
    assert (
        user["content"][2]["text"]
        == "<|traj_history_start|>" + "<|traj_history|>" * 3 + "<|traj_history_end|>"
    )
    assert user["content"][3]["text"] == "output the future trajectory."
    assert assistant["content"] == [
        {"type": "text", "text": "<|traj_future_start|>" + "<|traj_future|>" * 4 + "<|traj_future_end|>"}
    ]
    with pytest.raises(PromptError, match="at least one image"):
        training_messages(0, num_history_tokens=3, num_future_tokens=4)


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [((41, 70), (32, 48)), ((37, 53), (64, 96)), ((100, 30), (48, 16)), ((270, 480), (80, 144)),
     ((719, 1283), (320, 576)), ((33, 47), (64, 96)), ((61, 5), (32, 16))],
)
def test_float_resize_matches_torch(in_hw, out_hw):
    """A training image the pixel budget does not admit is resized in float (no uint8 rounding or
    clamping), as PyTorch's float kernel does, odd sizes and a rig frame included; agreement to a
    float32 ulp or two."""
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(sum(in_hw + out_hw)).integers(0, 256, (3, *in_hw)).astype(
        np.float32
    ) / np.float32(255)
    ours = resize_bicubic_aa_float(image, *out_hw)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(image)[None], size=out_hw, mode="bicubic", align_corners=False, antialias=True
    )[0].numpy()
    error = float(np.abs(ours - reference).max())
    print(f"float resize {in_hw} -> {out_hw}: max abs error {error:.3g}")
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    assert error <= 2.5e-7


def test_training_pixels_of_a_resized_image(tok, template):
    """An image larger than the budget goes through the float resize in the training prompt."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (1, 1, 3, 40, 60), dtype=np.uint8)
    ids, pixels, grid = encode_training_prompt(frames, tokenizer=tok, chat_template=template, config=CFG)
    h, w = grid[0, 1] * CFG.vision.patch_size, grid[0, 2] * CFG.vision.patch_size
    assert (h, w) != (40, 60)
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(frames[0, 0].astype(np.float32) / np.float32(255))[None],
        size=(int(h), int(w)),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )[0].numpy()
    reference = patchify((resized - np.float32(0.5)) / np.float32(0.5), CFG.vision)
    error = float(np.abs(pixels - reference).max())
    print(f"training pixels of a resized image: max abs error {error:.3g}")
    assert error <= 5e-7
    assert int((ids == CFG.image_token_id).sum()) == int(np.prod(grid)) // CFG.vision.spatial_merge_size**2


# ---------------------------------------------------------------------------------------------
# Chain-of-Causation text (the reference's `cot` component)
# ---------------------------------------------------------------------------------------------

COT = "Slow down: a vehicle ahead is braking."


def test_cot_prompt_and_labels(data, tok, template):
    """A hand-built example with CoC text: the instruction asks for both outputs, the assistant turn
    is `<|cot_start|>` + text + `<|cot_end|>` + the trajectory span + `<|im_end|>`, and the labels
    gain exactly the cot span (start, text tokens, end), all in the `others` term of the stage-1
    loss; the trajectory labels stay as they were."""
    from alpamayo_jax.processing.prompt import INSTRUCTION
    from alpamayo_jax.training.stage1 import target_masks

    plain = _clip(data, 0)
    with_cot = Clip.create(plain.camera_frames, plain.ego_history_xyz, plain.ego_history_rot,
                           ego_future_xyz=plain.ego_future_xyz, ego_future_rot=plain.ego_future_rot, cot=COT)
    text = render_training_prompt(16, tokenizer=tok, chat_template=template,
                                  num_history_tokens=CFG.tokens_per_history_traj,
                                  num_future_tokens=CFG.tokens_per_future_traj, cot=COT)
    future = special_token("traj_future_start") + special_token("traj_future") * 128 + special_token("traj_future_end")
    assert INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n<|cot_start|>" + COT + "<|cot_end|>" + future \
        + "<|im_end|>\n" in text
    assert INSTRUCTION == "output the chain-of-thought reasoning of the driving process, then output the future trajectory."

    before = collate([plain], tokenizer=tok, chat_template=template, config=CFG)
    after = collate([with_cot], tokenizer=tok, chat_template=template, config=CFG)
    cot_ids = tok.encode(COT, add_special_tokens=False)
    labels, old = after.labels()[0], before.labels()[0]
    supervised, old_supervised = labels[labels != IGNORE_INDEX], old[old != IGNORE_INDEX]
    cot_start, cot_end = tok.token_to_id("<|cot_start|>"), tok.token_to_id("<|cot_end|>")
    np.testing.assert_array_equal(supervised[: len(cot_ids) + 2], [cot_start, *cot_ids, cot_end])
    np.testing.assert_array_equal(supervised[len(cot_ids) + 2:], old_supervised)  # trajectory span + <|im_end|>
    assert len(supervised) == 131 + len(cot_ids) + 2
    # The instruction grew too: the prompt is longer by the instruction's and the cot's tokens.
    extra = len(tok.encode(INSTRUCTION, add_special_tokens=False)) - len(
        tok.encode("output the future trajectory.", add_special_tokens=False))
    assert after.inputs.input_ids.shape[1] == before.inputs.input_ids.shape[1] + extra + len(cot_ids) + 2
    # Stage 1's split: the cot targets join the `others` term, the trajectory term keeps its 130.
    traj, others = (np.asarray(m) for m in target_masks(jnp.asarray(after.labels()[:, 1:]), CFG))
    assert traj.sum() == 130 and others.sum() == 1 + len(cot_ids) + 2
    _assert_equal(after.future_token_ids, before.future_token_ids, "future tokens")


def test_cot_with_the_tokenizers_special_tokens_is_refused(data, tok, template):
    """Clip.create refuses `<|...|>` markup; the tokenizer-level check also catches the vocabulary's
    other added tokens, e.g. the trajectory bins `<i3>`, which would enter the trajectory term."""
    from alpamayo_jax.processing.training_prompt import check_cot
    from alpamayo_jax.training.data import check_cot_texts

    plain = _clip(data, 0)
    sneaky = Clip.create(plain.camera_frames, plain.ego_history_xyz, plain.ego_history_rot,
                         ego_future_xyz=plain.ego_future_xyz, ego_future_rot=plain.ego_future_rot,
                         cot="turn left <i3> now")
    with pytest.raises(ClipError, match=r"cot: contains the tokenizer's special token\(s\) \['<i3>'\]"):
        check_cot("turn left <i3> now", tok)
    with pytest.raises(PromptError, match=r"clip 0: cot: contains the tokenizer's special token"):
        collate([sneaky], tokenizer=tok, chat_template=template, config=CFG)
    with pytest.raises(ClipError, match=r"1 training clip\(s\) cannot be used:\n  clip 1: cot: contains"):
        check_cot_texts([plain, sneaky], tok)
    check_cot(COT, tok)
