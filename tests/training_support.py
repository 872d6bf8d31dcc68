"""What the training-loop tests of both stages share: their four clips and one run of `train`."""

from __future__ import annotations

import jax

from alpamayo_jax.processing.synthetic import synthetic_clip
from alpamayo_jax.training.trainer import Trainer, train


def four_clips() -> list:
    """Four clips with ground truth: different speeds, turning left and right."""
    return [synthetic_clip(i, image_size=(32, 48), speed=4.0 + 2 * i, curvature=0.01 * (i - 1.5), with_future=True)
            for i in range(4)]


def run_training(pipeline, clips, run_dir, steps, *, optimizer, stage, **options):
    """(trainer, `train`'s result) of `steps` steps of `stage` from key 0: batches of 2, seed 1,
    a checkpoint every 10 steps."""
    trainer, state = Trainer.create(pipeline.model, optimizer, jax.random.key(0), stage=stage)
    result = train(trainer, state, clips, split=pipeline.split, tokenizer=pipeline.tokenizer,
                   chat_template=pipeline.chat_template, run_dir=run_dir, steps=steps, batch_size=2, seed=1,
                   save_every=10, **options)
    return trainer, result
