"""The inference worker batches waiting requests that share their shape and settings, and each
request keeps the result it gets alone (its own seed's key), on the tiny model."""

from __future__ import annotations

import dataclasses
import threading
import types

import jax
import numpy as np
import pytest

from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import sample_from_inputs
from alpamayo_jax.processing.synthetic import synthetic_clip
from alpamayo_jax.serving.worker import InferenceWorker, batch_sizes
from tests.serving_support import IMAGE_SIZE, tiny_pipeline


@pytest.fixture(scope="module")
def pipeline():
    return tiny_pipeline()


def test_batch_sizes_are_powers_of_two_up_to_the_limit():
    assert batch_sizes(1) == (1,)
    assert batch_sizes(4) == (1, 2, 4)
    assert batch_sizes(6) == (1, 2, 4, 6)
    with pytest.raises(ValueError, match="max_batch_clips must be >= 1"):
        batch_sizes(0)


def test_waiting_requests_share_a_batch_and_keep_their_own_results(pipeline):
    """While one request runs, three of the same shape and settings and one of other settings
    queue up: the three run as one batch (filled up to 4), the other alone. Each of the three gets
    exactly the tokens it gets alone with its seed, and the trajectories to float rounding."""
    settings = InferenceConfig.from_model(pipeline.config, max_new_tokens=8)
    gate, started = threading.Event(), threading.Event()
    calls = []

    def gated_run(pipeline, inputs, keys, run_settings):
        calls.append((inputs.num_clips, run_settings.num_samples))
        if len(calls) == 1:
            started.set()
            gate.wait(60)
        return sample_from_inputs(pipeline, inputs, keys, run_settings)

    worker = InferenceWorker(pipeline, settings, warmup_sizes=(), max_batch_clips=4, run=gated_run)
    worker.start()
    assert worker.wait_ready(60)
    try:
        clips = [pipeline.prepare(synthetic_clip(seed, image_size=IMAGE_SIZE)) for seed in range(4)]
        first = worker.submit(clips[0], seed=10, source="test")
        assert started.wait(60)
        batched = [worker.submit(clips[i], seed=20 + i, source="test") for i in (1, 2, 3)]
        other = worker.submit(clips[1], seed=30, settings=dataclasses.replace(settings, num_samples=2), source="test")
        assert worker.queue_depth == 4
        gate.set()
        results = [future.result(120) for future in (first, *batched, other)]
    finally:
        gate.set()
        worker.close()
    # First alone; the three together (filled up to the next power of two); the other settings alone.
    assert calls == [(1, 1), (4, 1), (1, 2)]
    assert worker.metrics.count("alpamayo_inference_batches_total", clips="3") == 1
    assert worker.metrics.count("alpamayo_inference_batches_total", clips="1") == 2
    assert [r.xyz.shape for r in results] == [(1, 1, 64, 3)] * 4 + [(1, 2, 64, 3)]
    for index, result in zip((1, 2, 3), results[1:4], strict=True):
        alone = sample_from_inputs(pipeline, clips[index], jax.random.key(20 + index), settings)
        assert result.generated_token_ids == alone.generated_token_ids
        error = float(np.abs(result.xyz - alone.xyz).max()) / float(np.abs(alone.xyz).max())
        print(f"clip {index}: batched vs alone, xyz relative {error:.2e}")
        assert error <= 1e-5
        assert {"queue_wait", "generate", "inference"} <= set(result.timings)


def test_a_job_of_several_clips_runs_whole(pipeline):
    """Two clips in one job: both come back, each sampled from the job's seed's key."""
    settings = InferenceConfig.from_model(pipeline.config, max_new_tokens=8)
    worker = InferenceWorker(pipeline, settings, warmup_sizes=(), max_batch_clips=4)
    worker.start()
    try:
        clips = [synthetic_clip(seed, image_size=IMAGE_SIZE) for seed in range(2)]
        result = worker.run(pipeline.prepare(clips), seed=5, source="test")
    finally:
        worker.close()
    assert result.xyz.shape == (2, 1, 64, 3)
    for index, clip in enumerate(clips):  # the clip alone with the same key
        alone = sample_from_inputs(pipeline, pipeline.prepare(clip), jax.random.key(5), settings)
        assert [result.generated_token_ids[index]] == alone.generated_token_ids


def test_a_mesh_whose_data_axis_does_not_divide_the_batches_is_refused(pipeline):
    """Checked when the worker is made, not when the first batch of an odd size arrives."""
    on_data2 = types.SimpleNamespace(mesh=types.SimpleNamespace(shape={"data": 2}))
    settings = InferenceConfig.from_model(pipeline.config)
    with pytest.raises(ValueError, match=r"batches of \[1\] clip\(s\) x 1 samples do not divide .* size 2"):
        InferenceWorker(on_data2, settings, max_batch_clips=2)
    InferenceWorker(on_data2, dataclasses.replace(settings, num_samples=2), max_batch_clips=4)  # 2, 4, 8 rows
