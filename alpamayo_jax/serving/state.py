"""What the endpoints share: the pipeline and its worker once loaded, the request defaults, the
served model's name, readiness, and the metrics. The server fills it in as it starts; the HTTP app
and the AlpaSim driver only read it."""

from __future__ import annotations

import dataclasses
import time

from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import Pipeline
from alpamayo_jax.serving.metrics import Metrics
from alpamayo_jax.serving.worker import InferenceWorker

# NIM's request body limit (134217728 bytes), for HTTP bodies.
MAX_BODY_BYTES = 128 * 1024 * 1024


@dataclasses.dataclass
class ServingState:
    model_name: str
    default_seed: int = 0
    settings: InferenceConfig | None = None  # the defaults of every request (None until the model loads)
    pipeline: Pipeline | None = None
    worker: InferenceWorker | None = None
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    max_body_bytes: int = MAX_BODY_BYTES
    phase: str = "starting"  # starting -> loading -> warming up -> ready -> stopping
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.metrics.gauge("alpamayo_ready", lambda: float(self.ready))
        self.metrics.gauge("alpamayo_queue_depth", lambda: float(self.worker.queue_depth if self.worker else 0))

    @property
    def ready(self) -> bool:
        """Loaded, warm, and not stopping."""
        return self.phase == "ready" and self.worker is not None and self.worker.ready
