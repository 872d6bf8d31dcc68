"""Prompt MRoPE positions against the reference fixture and transformers' Qwen3-VL."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from safetensors.numpy import load_file

from alpamayo_jax.config import tiny
from alpamayo_jax.processing.rope_index import get_rope_index

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_ar1_dev"
CFG = tiny()
MERGE = CFG.vision.spatial_merge_size
IMAGE, VISION_START, VISION_END = CFG.image_token_id, CFG.vision_start_token_id, CFG.vision_end_token_id
VIDEO = 493  # <|video_pad|> of the fixture tokenizer


def _rope_index(input_ids, grids, **kwargs):
    return get_rope_index(
        input_ids,
        grids,
        spatial_merge_size=MERGE,
        image_token_id=IMAGE,
        vision_start_token_id=VISION_START,
        **kwargs,
    )


def test_fixture_prompt():
    golden = load_file(FIXTURE / "golden.safetensors")
    position_ids, deltas = _rope_index(golden["fused.input_ids"], golden["processor.image_grid_thw"])
    assert position_ids.dtype == np.int64 and deltas.dtype == np.int64
    np.testing.assert_array_equal(position_ids, golden["rope.position_ids"])
    np.testing.assert_array_equal(deltas, golden["rope.deltas"])


def _prompt(rng, pieces) -> list[int]:
    """Token ids from pieces: an int n is n random text tokens, a grid (t, h, w) one image."""
    ids = []
    for piece in pieces:
        if isinstance(piece, int):
            ids += rng.integers(0, 480, piece).tolist()
        else:
            ids += [VISION_START] + [IMAGE] * (int(np.prod(piece)) // MERGE**2) + [VISION_END]
    return ids


def _left_pad(rows):
    length = max(len(r) for r in rows)
    ids = np.array([[0] * (length - len(r)) + r for r in rows], dtype=np.int64)
    mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    return ids, mask


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3VLConfig(
        text_config=dict(
            vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            rope_scaling=dict(rope_type="default", mrope_section=[2, 1, 1], mrope_interleaved=True),
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
            patch_size=8, spatial_merge_size=MERGE, num_position_embeddings=16, deepstack_visual_indexes=[0],
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
    )
    torch.manual_seed(0)
    return torch, transformers.Qwen3VLModel(config).eval()


def _hf_rope_index(hf_model, ids, grids, mask):
    torch, model = hf_model
    position_ids, deltas = model.get_rope_index(
        torch.from_numpy(ids),
        None if grids is None else torch.from_numpy(np.asarray(grids, dtype=np.int64)),
        None,
        None if mask is None else torch.from_numpy(mask),
    )
    return position_ids.numpy(), deltas.numpy()


@pytest.mark.parametrize("padded", [False, True])
def test_two_images_per_row_match_transformers(hf_model, padded):
    rng = np.random.default_rng(3)
    a, b = (1, 4, 6), (1, 6, 2)
    rows = [_prompt(rng, [5, a, 3, b, 7]), _prompt(rng, [2, b, 6, a, 7])]  # equal lengths
    if padded:
        rows[1] = rows[1][:-3]  # shorter row, left-padded
        ids, mask = _left_pad(rows)
    else:
        ids, mask = np.array(rows, dtype=np.int64), None
    grids = np.array([a, b, b, a])
    position_ids, deltas = _rope_index(ids, grids, attention_mask=mask)
    expected_ids, expected_deltas = _hf_rope_index(hf_model, ids, grids, mask)
    np.testing.assert_array_equal(position_ids, expected_ids)
    np.testing.assert_array_equal(deltas, expected_deltas)


@pytest.mark.parametrize("padded", [False, True])
def test_text_only_matches_transformers(hf_model, padded):
    rng = np.random.default_rng(4)
    rows = [_prompt(rng, [9]), _prompt(rng, [6 if padded else 9])]
    ids, mask = _left_pad(rows) if padded else (np.array(rows, dtype=np.int64), None)
    position_ids, deltas = _rope_index(ids, None, attention_mask=mask)
    expected_ids, expected_deltas = _hf_rope_index(hf_model, ids, None, mask)
    np.testing.assert_array_equal(position_ids, expected_ids)
    np.testing.assert_array_equal(deltas, expected_deltas)
    if not padded:
        np.testing.assert_array_equal(position_ids, np.broadcast_to(np.arange(ids.shape[1]), (3, *ids.shape)))
        np.testing.assert_array_equal(deltas, np.zeros((2, 1)))


def test_decode_positions_continue_the_prompt():
    rng = np.random.default_rng(5)
    prompt = np.array([_prompt(rng, [3, (1, 4, 6), 2])], dtype=np.int64)
    _, deltas = _rope_index(prompt, np.array([(1, 4, 6)]))
    length = prompt.shape[1]
    # Appending text tokens to the prompt must give them the positions decode assigns.
    extended = np.concatenate([prompt, rng.integers(0, 480, (1, 4))], axis=1)
    full, _ = _rope_index(extended, np.array([(1, 4, 6)]))
    # generation feeds the token at sequence index j at position j + rope_delta on all three axes
    decode_positions = np.broadcast_to(np.arange(length, length + 4) + deltas[0, 0], (3, 1, 4))
    np.testing.assert_array_equal(decode_positions, full[:, :, length:])


def test_placeholder_count_mismatch_raises():
    rng = np.random.default_rng(6)
    ids = np.array([_prompt(rng, [3, (1, 4, 6), 2, (1, 6, 2), 1])])
    with pytest.raises(ValueError, match="2 image placeholders .* 1 rows"):
        _rope_index(ids, np.array([(1, 4, 6)]))
    with pytest.raises(ValueError, match="2 image placeholders .* 3 rows"):
        _rope_index(ids, np.array([(1, 4, 6), (1, 6, 2), (1, 2, 2)]))


def test_image_token_count_mismatch_raises():
    rng = np.random.default_rng(7)
    ids = np.array([_prompt(rng, [3, (1, 4, 6), 2])])
    with pytest.raises(ValueError, match="6 image tokens .* needs .* = 8"):
        _rope_index(ids, np.array([(1, 4, 8)]))
    swapped = np.array([_prompt(rng, [3, (1, 4, 6), 2, (1, 2, 2), 1])])  # 6 + 1 tokens
    with pytest.raises(ValueError, match="image 0 has 6 image tokens"):
        _rope_index(swapped, np.array([(1, 2, 2), (1, 4, 6)]))


def test_malformed_prompts_raise():
    rng = np.random.default_rng(8)
    ids = np.array([_prompt(rng, [3, (1, 4, 6), 2])])
    stray = ids.copy()
    stray[0, 3] = 7  # replace <|vision_start|> before the image tokens
    with pytest.raises(ValueError, match="do not follow <\\|vision_start\\|>"):
        _rope_index(stray, np.array([(1, 4, 6)]))
    with pytest.raises(ValueError, match="image_grid_thw is None"):
        _rope_index(ids, None)
    with_video = ids.copy()
    with_video[0, 0] = VIDEO
    with pytest.raises(ValueError, match="video"):
        _rope_index(with_video, np.array([(1, 4, 6)]), video_token_id=VIDEO)
    with pytest.raises(ValueError, match="\\(B, L\\)"):
        _rope_index(ids[0], np.array([(1, 4, 6)]))
