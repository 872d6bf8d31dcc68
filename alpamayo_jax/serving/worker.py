"""The one inference thread: a FIFO queue of jobs run one at a time on the loaded pipeline, and the
warm-up that compiles the served shapes before the server reports ready.

Requests (HTTP and AlpaSim alike) prepare their `ModelInputs` on their own threads (image resize,
tokenization: host work that overlaps with the device) and `submit` them; the worker runs
`sample_from_inputs` with the job's key and settings. Jobs are not merged into batches: a batch
draws its tokens and noise from one key, so a request's result would depend on which requests
shared its batch, and the same seed would no longer give the same trajectories as `infer`.

The warm-up runs one synthetic clip per configured image size with the default settings, which
compiles the prefill, decode loop, flow matching and rollout for those shapes. A request of
another image aspect ratio, sample count, token budget or sampling setting compiles its own
programs on first use (they are then cached).

`close` stops taking jobs, lets the queued ones run until a deadline, then cancels the rest with
`ServerStopping`; a job that is running always finishes.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import jax

from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import Pipeline, TrajectorySamples, sample_from_inputs
from alpamayo_jax.processing.model_inputs import ModelInputs
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


class InferenceWorker:
    """Runs inference jobs one at a time on `pipeline`, after warming it up (module docstring)."""

    def __init__(self, pipeline: Pipeline, settings: InferenceConfig, *, metrics: Metrics | None = None,
                 warmup_sizes: Sequence[tuple[int, int]] = DEFAULT_WARMUP_SIZES,
                 run: Callable[..., TrajectorySamples] = sample_from_inputs):
        self.pipeline = pipeline
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.warmup_sizes = tuple(warmup_sizes)
        self.warmup_seconds: float | None = None
        self._run = run
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
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
        if not self._thread.is_alive():
            self._cancel_all()
            return True
        self._queue.put(None)
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
        or the job's exception. Raises `ServerStopping` once `close` was called."""
        job = Job(inputs, int(seed), self.settings if settings is None else settings, source, Future(),
                  time.perf_counter())
        with self._lock:
            if not self._accepting:
                raise ServerStopping("the server is stopping and takes no new inference requests")
            self._pending += 1
            self._queue.put(job)
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
        while True:
            job = self._queue.get()
            if job is None:
                break
            with self._lock:
                self._pending -= 1
            if self._cancel_queued:
                job.future.set_exception(ServerStopping("the server stopped before this request ran"))
                self.metrics.inc("alpamayo_inference_requests_total", source=job.source, outcome="cancelled")
                continue
            self._execute(job)
        self._cancel_all()

    def _execute(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        started = time.perf_counter()
        wait = started - job.enqueued
        try:
            samples = self._run(self.pipeline, job.inputs, jax.random.key(job.seed), job.settings)
        except Exception as error:  # the caller reports it; the worker keeps serving
            logger.exception("inference failed (%s request)", job.source)
            self.metrics.inc("alpamayo_inference_requests_total", source=job.source, outcome="error")
            job.future.set_exception(error)
            return
        self.metrics.inc("alpamayo_inference_requests_total", source=job.source, outcome="ok")
        self.metrics.observe("alpamayo_stage_seconds", wait, source=job.source, stage="queue_wait")
        for stage, seconds in samples.timings.items():
            self.metrics.observe("alpamayo_stage_seconds", seconds, source=job.source, stage=stage)
        timings = {"queue_wait": round(wait, 4), **samples.timings,
                   "inference": round(time.perf_counter() - started, 4)}
        job.future.set_result(dataclasses.replace(samples, timings=timings))

    def _cancel_all(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is None:
                continue
            with self._lock:
                self._pending -= 1
            job.future.set_exception(ServerStopping("the server stopped before this request ran"))

    def _warm_up(self) -> None:
        start = time.perf_counter()
        for height, width in self.warmup_sizes:
            began = time.perf_counter()
            inputs = self.pipeline.prepare(synthetic_clip(0, image_size=(height, width)))
            samples = self._run(self.pipeline, inputs, jax.random.key(0), self.settings)
            logger.info("warmed up %dx%d frames in %.1f s (%s)", height, width, time.perf_counter() - began,
                        ", ".join(f"{k} {v:.2f} s" for k, v in samples.timings.items()))
        self.warmup_seconds = time.perf_counter() - start
