"""Training data from a directory of clip files: checked up front, served in a seeded order.

Every clip must carry its ground-truth future (`ego_future_xyz`, `ego_future_rot`); all are read
and checked before training starts, so a bad file never stops a run halfway. Batches are drawn
epoch by epoch from a permutation seeded by (seed, epoch); an epoch's last, incomplete batch is
dropped. Batch k of the whole run is a pure function of (seed, k), which is what makes a resumed
run see exactly the batches the uninterrupted one would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alpamayo_jax.processing.clip import Clip, ClipError
from alpamayo_jax.processing.clip_file import load_clip


def load_training_clips(paths: Sequence[str | os.PathLike]) -> list[Clip]:
    """Reads and checks every clip; raises `ClipError` listing each unreadable clip or clip
    without ground truth (all of them, not just the first)."""
    clips, problems = [], []
    for path in map(Path, paths):
        try:
            clip = load_clip(path)
        except (ClipError, OSError) as error:
            problems.append(str(error))
            continue
        if not clip.has_ground_truth:
            problems.append(f"{path}: no ground-truth future (ego_future_xyz, ego_future_rot): training needs it")
        clips.append(clip)
    if problems:
        raise ClipError(f"{len(problems)} training clip(s) cannot be used:\n  " + "\n  ".join(problems))
    return clips


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
