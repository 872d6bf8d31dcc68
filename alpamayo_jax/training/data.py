"""Training data from clip files or a dataset: checked up front, served in a seeded order.

Every clip must carry its ground-truth future (`ego_future_xyz`, `ego_future_rot`); all are read
and checked before training starts, so a bad file never stops a run halfway. Batches are drawn
epoch by epoch from a permutation seeded by (seed, epoch); an epoch's last, incomplete batch is
dropped. Batch k of the whole run is a pure function of (seed, k), which is what makes a resumed
run see exactly the batches the uninterrupted one would have seen.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alpamayo_jax.processing.clip import Clip, ClipError
from alpamayo_jax.processing.clip_file import load_clip
from alpamayo_jax.processing.training_prompt import check_cot


def load_training_clips(clips) -> list[Clip]:
    """Reads and checks every clip of `clips` (`.npz` paths, or an `alpamayo_jax.data.iterator`
    source such as a PhysicalAI-AV dataset); raises `ClipError` listing each unreadable clip or
    clip without ground truth (all of them, not just the first)."""
    if hasattr(clips, "load") and hasattr(clips, "name"):  # a data source
        items = [(clips.name(i), functools.partial(clips.load, i)) for i in range(len(clips))]
    else:
        items = [(str(path), functools.partial(load_clip, Path(path))) for path in clips]
    loaded, problems = [], []
    for name, load in items:
        try:
            clip = load()
        except (ClipError, OSError, ValueError) as error:
            message = str(error)
            problems.append(message if name in message else f"{name}: {message}")
            continue
        if not clip.has_ground_truth:
            problems.append(f"{name}: no ground-truth future (ego_future_xyz, ego_future_rot): training needs it")
        loaded.append(clip)
    if problems:
        raise ClipError(f"{len(problems)} training clip(s) cannot be used:\n  " + "\n  ".join(problems))
    return loaded


def check_cot_texts(clips: Sequence[Clip], tokenizer) -> None:
    """Raises `ClipError` listing every clip whose Chain-of-Causation text the tokenizer would not
    read as plain text (`training_prompt.check_cot`), before any batch is made."""
    problems = []
    for index, clip in enumerate(clips):
        if clip.cot is not None:
            try:
                check_cot(clip.cot, tokenizer)
            except ClipError as error:
                problems.append(f"clip {index}: {error}")
    if problems:
        raise ClipError(f"{len(problems)} training clip(s) cannot be used:\n  " + "\n  ".join(problems))


class BatchOrder:
    """Which clips make up batch k of a run: epoch k // batches_per_epoch, in the order of that
    epoch's seeded permutation."""

    def __init__(self, num_clips: int, batch_size: int, seed: int, *, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_clips < batch_size:
            raise ValueError(f"{num_clips} clip(s) cannot fill one batch of {batch_size}")
        self.num_clips, self.batch_size, self.seed, self.shuffle = num_clips, batch_size, seed, shuffle
        self.batches_per_epoch = num_clips // batch_size

    def __call__(self, k: int) -> list[int]:
        epoch, index = divmod(k, self.batches_per_epoch)
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_clips) if self.shuffle
                 else np.arange(self.num_clips))
        return order[index * self.batch_size:(index + 1) * self.batch_size].tolist()
