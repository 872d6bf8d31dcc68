"""The one inference thread: a FIFO queue of jobs run on the loaded pipeline, one batch at a time,
and the warm-up that compiles the served shapes before the server reports ready.

Requests (HTTP and AlpaSim alike) prepare their `ModelInputs` on their own threads (image resize,
tokenization: host work that overlaps with the device) and `submit` them; the worker runs
`sample_from_inputs` with the job's seed and settings.

Batching (`max_batch_clips` > 1). When the worker takes the oldest job, it also takes the waiting
jobs that can share its batch (same settings, same prompt length and image grid), up to
`max_batch_clips`, and runs them as one batch with one PRNG key per clip, `key(seed)` of its own
job. A request's result therefore does not depend on which requests shared its batch (float
rounding aside): one clip run alone samples from its key the same way (`sample_from_inputs`), so
the same seed gives the trajectories of `infer --seed` whatever the load. Batches are filled up to
the next power of two (copies of the last clip, whose results are dropped) so that a few shapes
serve every load.

The warm-up runs one synthetic clip per configured image size (and each batch size) with the
default settings, which compiles the prefill, decode loop, flow matching and rollout for those
shapes. A request of another image aspect ratio, sample count, token budget or sampling setting
compiles its own programs on first use (they are then cached).

`close` stops taking jobs, lets the queued ones run until a deadline, then cancels the rest with
`ServerStopping`; a job that is running always finishes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future


from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import Pipeline, TrajectorySamples, sample_from_inputs
from alpamayo_jax.inference.sampling import seed_keys
from alpamayo_jax.processing.model_inputs import ModelInputs, concat_inputs
from alpamayo_jax.processing.synthetic import synthetic_clip
from alpamayo_jax.serving.metrics import Metrics

logger = logging.getLogger(__name__)

# (height, width) of the warm-up clip's frames: the PhysicalAI-AV (and NIM sample) resolution. Any
# size of the same aspect ratio resizes to the same model inputs and reuses these programs.
DEFAULT_WARMUP_SIZES = ((1080, 1920),)


class ServerStopping(RuntimeError):
    """The server is stopping: the job was not (or will not be) run."""


@dataclasses.dataclass
class Job:
    inputs: ModelInputs
    seed: int
    settings: InferenceConfig
    source: str  # "http", "alpasim", ...: the metrics label
    future: Future
    enqueued: float  # time.perf_counter() at submit


def batch_sizes(max_batch_clips: int) -> tuple[int, ...]:
    """The batch sizes the worker runs: powers of two below `max_batch_clips`, and it."""
    if max_batch_clips < 1:
        raise ValueError(f"max_batch_clips must be >= 1, got {max_batch_clips}")
    sizes = [1]
    while sizes[-1] * 2 < max_batch_clips:
        sizes.append(sizes[-1] * 2)
    return (*sizes, max_batch_clips) if sizes[-1] != max_batch_clips else tuple(sizes)


def _batchable(first: Job, other: Job) -> bool:
    """Whether `other` runs the programs `first` runs (so the two can share a batch)."""
    a, b = first.inputs, other.inputs
    return (first.settings == other.settings and a.num_clips == b.num_clips == 1
            and a.prompt_length == b.prompt_length and a.image_grid == b.image_grid)


def _clip_samples(samples: TrajectorySamples, clip: int) -> TrajectorySamples:
    """Clip `clip` of a batch's samples, as a batch of one."""
    pick = slice(clip, clip + 1)
    return dataclasses.replace(samples, xyz=samples.xyz[pick], rotation=samples.rotation[pick],
                               actions=samples.actions[pick], generated_token_ids=samples.generated_token_ids[pick],
                               num_generated_tokens=samples.num_generated_tokens[pick], cot=samples.cot[pick])


class InferenceWorker:
    """Runs inference jobs on `pipeline`, in batches of up to `max_batch_clips` waiting requests,
    after warming it up (module docstring)."""

    def __init__(self, pipeline: Pipeline, settings: InferenceConfig, *, metrics: Metrics | None = None,
                 warmup_sizes: Sequence[tuple[int, int]] = DEFAULT_WARMUP_SIZES, max_batch_clips: int = 1,
                 run: Callable[..., TrajectorySamples] = sample_from_inputs):
        self.pipeline = pipeline
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.warmup_sizes = tuple(warmup_sizes)
        self.batch_sizes = batch_sizes(max_batch_clips)
        data = 1 if pipeline.mesh is None else pipeline.mesh.shape["data"]
        uneven = [size for size in self.batch_sizes if size * settings.num_samples % data]
        if uneven:  # a request of other settings is checked when it runs (sample_from_inputs)
            raise ValueError(f"batches of {uneven} clip(s) x {settings.num_samples} samples do not divide over the "
                             f"mesh's data axis of size {data}")
        self.warmup_seconds: float | None = None
        self._run = run
        self._jobs: collections.deque[Job] = collections.deque()
        self._closing = False
        self._pending = 0
        self._lock = threading.Condition()
        self._accepting = True
        self._cancel_queued = False
        self._ready = threading.Event()
        self._warmup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="alpamayo-inference", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def ready(self) -> bool:
        """Warm and taking jobs."""
        return self._ready.is_set() and self._warmup_error is None and self._accepting

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Waits for the warm-up; re-raises its error. False on timeout."""
        if not self._ready.wait(timeout):
            return False
        if self._warmup_error is not None:
            raise self._warmup_error
        return True

    def close(self, timeout: float = 30.0) -> bool:
        """Stops taking jobs; runs what is queued until `timeout` seconds have passed, then cancels
        the rest (`ServerStopping`). Returns whether the thread stopped (a running job is never cut
        short, so it may still be finishing)."""
        with self._lock:
            self._accepting = False
            self._closing = True
            self._lock.notify_all()
        if not self._thread.is_alive():
            self._cancel_all()
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("inference queue not drained after %.0f s; cancelling the jobs still waiting", timeout)
            self._cancel_queued = True
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        """Jobs submitted and not yet started."""
        return self._pending

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, inputs: ModelInputs, *, seed: int, settings: InferenceConfig | None = None,
               source: str = "api") -> Future:
        """Queues one job; its future holds the `TrajectorySamples` (timings include `queue_wait`),
        or the job's exception. Every clip of `inputs` samples from `key(seed)`. Raises
        `ServerStopping` once `close` was called."""
        job = Job(inputs, int(seed), self.settings if settings is None else settings, source, Future(),
                  time.perf_counter())
        with self._lock:
            if not self._accepting:
                raise ServerStopping("the server is stopping and takes no new inference requests")
            self._pending += 1
            self._jobs.append(job)
            self._lock.notify()
        return job.future

    def run(self, inputs: ModelInputs, *, seed: int, settings: InferenceConfig | None = None,
            source: str = "api") -> TrajectorySamples:
        """`submit` and wait for the result."""
        return self.submit(inputs, seed=seed, settings=settings, source=source).result()

    def _main(self) -> None:
        try:
            self._warm_up()
        except BaseException as error:  # reported by wait_ready; the thread has nothing left to do
            logger.exception("warm-up failed")
            self._warmup_error = error
            self._ready.set()
            with self._lock:
                self._accepting = False
            self._cancel_all()
            return
        self._ready.set()
        while (batch := self._next_batch()) is not None:
            if self._cancel_queued:
                for job in batch:
                    job.future.set_exception(ServerStopping("the server stopped before this request ran"))
                    self.metrics.inc("alpamayo_inference_requests_total", source=job.source, outcome="cancelled")
                continue
            self._execute(batch)
        self._cancel_all()

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the waiting jobs that can share its batch (FIFO otherwise); None once
        closing and nothing waits."""
        with self._lock:
            while not self._jobs and not self._closing:
                self._lock.wait()
            if not self._jobs:
                return None
            batch = [self._jobs.popleft()]
            for job in list(self._jobs):
                if len(batch) == self.batch_sizes[-1]:
                    break
                if _batchable(batch[0], job):
                    self._jobs.remove(job)
                    batch.append(job)
            self._pending -= len(batch)
        return batch

    def _execute(self, batch: list[Job]) -> None:
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            return
        started = time.perf_counter()
        settings = batch[0].settings
        try:
            if len(batch) == 1:  # every clip of the job from the job's key
                inputs, seeds = batch[0].inputs, [batch[0].seed] * batch[0].inputs.num_clips
            else:  # one clip per job (`_batchable`)
                size = next(size for size in self.batch_sizes if size >= len(batch))
                fill = [batch[-1]] * (size - len(batch))  # fill-up rows, results dropped
                inputs = concat_inputs([job.inputs for job in batch + fill])
                seeds = [job.seed for job in batch + fill]
            keys = seed_keys(seeds)
            samples = self._run(self.pipeline, inputs, keys, settings)
        except Exception as error:  # the callers report it; the worker keeps serving
            logger.exception("inference failed (%d request(s): %s)", len(batch), ", ".join(j.source for j in batch))
            for job in batch:
                self.metrics.inc("alpamayo_inference_requests_total", source=job.source, outcome="error")
                job.future.set_exception(error)
            return
        elapsed = round(time.perf_counter() - started, 4)
        self.metrics.inc("alpamayo_inference_batches_total", clips=str(len(batch)))
        for index, job in enumerate(batch):
            wait = started - job.enqueued
            self.metrics.inc("alpamayo_inference_requests_total", source=job.source, outcome="ok")
            self.metrics.observe("alpamayo_stage_seconds", wait, source=job.source, stage="queue_wait")
            for stage, seconds in samples.timings.items():
                self.metrics.observe("alpamayo_stage_seconds", seconds, source=job.source, stage=stage)
            timings = {"queue_wait": round(wait, 4), **samples.timings, "inference": elapsed}
            own = samples if len(batch) == 1 else _clip_samples(samples, index)
            job.future.set_result(dataclasses.replace(own, timings=timings))

    def _cancel_all(self) -> None:
        with self._lock:
            jobs, self._pending = list(self._jobs), 0
            self._jobs.clear()
        for job in jobs:
            job.future.set_exception(ServerStopping("the server stopped before this request ran"))

    def _warm_up(self) -> None:
        start = time.perf_counter()
        for height, width in self.warmup_sizes:
            inputs = self.pipeline.prepare(synthetic_clip(0, image_size=(height, width)))
            for size in self.batch_sizes:
                began = time.perf_counter()
                samples = self._run(self.pipeline, concat_inputs([inputs] * size),
                                    seed_keys([0] * size), self.settings)
                logger.info("warmed up %d clip(s) of %dx%d frames in %.1f s (%s)", size, height, width,
                            time.perf_counter() - began, ", ".join(f"{k} {v:.2f} s" for k, v in samples.timings.items()))
        self.warmup_seconds = time.perf_counter() - start
