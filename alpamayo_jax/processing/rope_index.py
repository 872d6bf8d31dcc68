"""Multimodal (t, h, w) rotary positions of a prompt, computed on the host (numpy).

Same result as Hugging Face's Qwen3-VL `get_rope_index` for image prompts. Text tokens get
consecutive positions, equal on the three axes. An image placeholder (`<|vision_start|>` followed by
a run of `<|image_pad|>` tokens, one per merged patch) starting at position s gets
(s + t, s + r, s + c) for merged patch (t, r, c), and the text after it resumes at one past the
largest position used so far. Positions therefore advance by max(t, h, w) per image instead of by
its token count; `rope_deltas` records the difference so that decoding can continue from
sequence indices alone.

Shapes: B batch rows, L prompt length, N images (over the whole batch, row-major).
"""

from __future__ import annotations

import numpy as np


def _image_runs(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of image tokens in a 1-D id sequence."""
    is_image = np.concatenate([[False], ids == image_token_id, [False]])
    edges = np.flatnonzero(is_image[1:] != is_image[:-1])
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


def _row_positions(
    ids: np.ndarray,  # (L',) the attended tokens of one row
    grids: np.ndarray,  # (n, 3) the grids of this row's images, in order
    runs: list[tuple[int, int]],
    spatial_merge_size: int,
) -> np.ndarray:  # (3, L')
    pieces = []
    next_position = 0
    cursor = 0
    for (start, _), (t, h, w) in zip(runs, grids):
        text = np.arange(start - cursor) + next_position
        pieces.append(np.broadcast_to(text, (3, text.size)))
        base = next_position + text.size
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        image = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + base
        pieces.append(image)
        next_position = int(image.max()) + 1
        cursor = start + t * gh * gw
    tail = np.arange(ids.size - cursor) + next_position
    pieces.append(np.broadcast_to(tail, (3, tail.size)))
    return np.concatenate(pieces, axis=1)


def get_rope_index(
    input_ids: np.ndarray,  # (B, L) int
    image_grid_thw: np.ndarray | None,  # (N, 3) int, patches per image before merging
    *,
    spatial_merge_size: int,
    image_token_id: int,
    vision_start_token_id: int,
    attention_mask: np.ndarray | None = None,  # (B, L) 0/1
    video_token_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt positions: (position_ids (3, B, L) int64, rope_deltas (B, 1) int64).

    Images are matched to `image_grid_thw` rows in order, row after row of the batch. Padding
    (attention_mask == 0) gets position 1, and `rope_deltas[b] = max position + 1 - L`, both as
    in the reference. With `image_grid_thw=None` the prompt is text only.

    Videos are not supported: pass `video_token_id` to have prompts containing video tokens
    rejected instead of silently positioned as text.

    Raises ValueError when the image placeholders and `image_grid_thw` disagree (number of
    images, number of image tokens, or the length of one placeholder).
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {input_ids.shape}")
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids {input_ids.shape}")
    mask = mask.astype(bool)
    if video_token_id is not None and np.any(input_ids[mask] == video_token_id):
        raise ValueError("prompt contains video tokens; video input is not supported")

    if image_grid_thw is None:
        # The reference's text-only branch: running count of attended tokens.
        if np.any(input_ids[mask] == image_token_id):
            raise ValueError("prompt contains image tokens but image_grid_thw is None")
        positions = np.where(mask, np.cumsum(mask, axis=-1) - 1, 1).astype(np.int64)
        position_ids = np.broadcast_to(positions, (3, batch, length)).copy()
        deltas = positions.max(axis=-1, keepdims=True) + 1 - length
        return position_ids, deltas.astype(np.int64)

    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    rows = [input_ids[b][mask[b]] for b in range(batch)]
    runs = [_image_runs(ids, image_token_id) for ids in rows]
    _check_placeholders(rows, runs, grids, spatial_merge_size, vision_start_token_id)

    position_ids = np.ones((3, batch, length), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    first_image = 0
    for b, (ids, row_runs) in enumerate(zip(rows, runs)):
        if ids.size == 0:
            raise ValueError(f"row {b} has no attended tokens")
        row_grids = grids[first_image : first_image + len(row_runs)]
        first_image += len(row_runs)
        positions = _row_positions(ids, row_grids, row_runs, spatial_merge_size)
        position_ids[:, b, mask[b]] = positions
        deltas[b, 0] = positions.max() + 1 - length
    return position_ids, deltas


def _check_placeholders(rows, runs, grids, spatial_merge_size, vision_start_token_id) -> None:
    num_runs = sum(len(r) for r in runs)
    if num_runs != len(grids):
        raise ValueError(
            f"the prompt has {num_runs} image placeholders (<|vision_start|> + <|image_pad|> runs) "
            f"but image_grid_thw has {len(grids)} rows"
        )
    if np.any(grids[:, 1:] % spatial_merge_size) or np.any(grids <= 0):
        raise ValueError(
            f"image_grid_thw rows must be positive with h and w multiples of {spatial_merge_size}, "
            f"got {grids.tolist()}"
        )
    tokens_per_image = grids.prod(axis=-1) // spatial_merge_size**2
    num_tokens = sum(n for row in runs for _, n in row)
    if num_tokens != tokens_per_image.sum():
        raise ValueError(
            f"the prompt has {num_tokens} image tokens but image_grid_thw needs "
            f"sum(t*h*w)/{spatial_merge_size}^2 = {int(tokens_per_image.sum())}"
        )
    image = 0
    for b, (ids, row_runs) in enumerate(zip(rows, runs)):
        for start, n in row_runs:
            if start == 0 or ids[start - 1] != vision_start_token_id:
                raise ValueError(f"row {b}: image tokens at index {start} do not follow <|vision_start|>")
            if n != tokens_per_image[image]:
                raise ValueError(
                    f"row {b}: image {image} has {n} image tokens but its grid "
                    f"{tuple(int(v) for v in grids[image])} needs {int(tokens_per_image[image])}"
                )
            image += 1
