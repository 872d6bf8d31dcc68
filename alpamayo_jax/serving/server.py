"""The lifecycle of `alpamayo-jax serve`: one process, one model, two fronts.

Start-up, in order: the HTTP API listens (health answers at once: live, not ready); the model
loads; the inference worker warms up (compiles the served shapes); the egodriver gRPC server
listens (AlpaSim's runtime dials it only once it is warm); `/v1/health/ready` turns true and one
line on stdout says where everything listens:

    alpamayo-jax serve: ready in 12.3 s (warm-up 8.1 s): HTTP on http://127.0.0.1:8000, AlpaSim egodriver on 127.0.0.1:50051

Stop (SIGTERM or SIGINT, or `shutdown()`): readiness turns false; the egodriver stops taking
calls and gives those in flight `shutdown_grace_s`; the worker takes no new jobs, runs the queued
ones within the same grace (then cancels the rest, whose requests get a clean 503 / hold) and
always finishes the one running; uvicorn lets the HTTP requests in flight finish; every open
AlpaSim session is closed. `run()` then returns 0. A signal during the model load stops the
server as soon as the load returns.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable

from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import Pipeline
from alpamayo_jax.serving.cameras import CameraMap
from alpamayo_jax.serving.state import MAX_BODY_BYTES, ServingState
from alpamayo_jax.serving.worker import DEFAULT_WARMUP_SIZES, InferenceWorker

logger = logging.getLogger(__name__)

PREFIX = "alpamayo-jax serve:"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Where and how to serve (the `serve` flags other than the model and sampling ones)."""

    host: str = "127.0.0.1"  # loopback unless asked otherwise
    http_port: int = 8000  # 0: any free port
    alpasim_port: int = 50051  # 0: any free port
    alpasim_mode: str = "alpasim"  # carla-driver-interface's --mode: alpasim or carla
    grpc_workers: int = 8
    camera_map: CameraMap = dataclasses.field(default_factory=CameraMap)
    warmup_sizes: tuple[tuple[int, int], ...] = DEFAULT_WARMUP_SIZES
    max_batch_clips: int = 1  # waiting requests run together, up to this many (worker docstring)
    model_name: str = "alpamayo-r1"
    default_seed: int = 0
    max_body_bytes: int = MAX_BODY_BYTES
    shutdown_grace_s: float = 30.0


class _StopRequested(Exception):
    """A stop signal arrived while the model was loading."""


class Server:
    """One serving process (module docstring). `load` builds the pipeline (or pass `pipeline`);
    `settings` are the request defaults (default: the checkpoint's, `InferenceConfig.from_model`).
    Messages for the operator go to `log` (stdout by default)."""

    def __init__(self, config: ServeConfig, *, load: Callable[[], Pipeline] | None = None,
                 pipeline: Pipeline | None = None, settings: InferenceConfig | None = None,
                 log: Callable[[str], None] | None = None):
        if (load is None) == (pipeline is None):
            raise ValueError("pass exactly one of load and pipeline")
        self.config = config
        self.state = ServingState(model_name=config.model_name, default_seed=config.default_seed,
                                  settings=settings, max_body_bytes=config.max_body_bytes)
        self._load = load if load is not None else (lambda: pipeline)
        self._log = log or (lambda message: print(f"{PREFIX} {message}", flush=True))
        self._uvicorn = None
        self._http_thread: threading.Thread | None = None
        self._grpc = None
        self._servicer = None
        self.driver = None
        self.http_port: int | None = None
        self.alpasim_port: int | None = None
        self._stop = threading.Event()
        self._stopped = False

    # -- start ---------------------------------------------------------------------------------

    def serve_http(self) -> int:
        """Starts the HTTP API (not ready yet); returns its port."""
        from alpamayo_jax.serving.dependencies import require

        require("fastapi", "uvicorn")
        import uvicorn

        from alpamayo_jax.serving.http import create_app

        sock = _listening_socket(self.config.host, self.config.http_port)
        self.http_port = sock.getsockname()[1]
        uvicorn_config = uvicorn.Config(create_app(self.state), log_level="warning", access_log=False,
                                        lifespan="off", timeout_graceful_shutdown=self.config.shutdown_grace_s)
        self._uvicorn = uvicorn.Server(uvicorn_config)
        self._http_thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]},
                                             name="alpamayo-http", daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server did not start on {self.config.host}:{self.http_port}")
            time.sleep(0.01)
        return self.http_port

    def load(self) -> Pipeline:
        self.state.phase = "loading"
        pipeline = self._load()
        self.state.pipeline = pipeline
        if self.state.settings is None:
            self.state.settings = InferenceConfig.from_model(pipeline.config)
        return pipeline

    def warm_up(self) -> float:
        """Starts the worker and waits for its warm-up; returns its seconds."""
        self.state.phase = "warming up"
        worker = InferenceWorker(self.state.pipeline, self.state.settings, metrics=self.state.metrics,
                                 warmup_sizes=self.config.warmup_sizes, max_batch_clips=self.config.max_batch_clips)
        self.state.worker = worker
        worker.start()
        worker.wait_ready()
        return worker.warmup_seconds or 0.0

    def serve_alpasim(self) -> int:
        """Starts the egodriver gRPC server; returns its port."""
        from alpamayo_jax.serving.alpasim import AlpamayoDriver, build_egodriver_server

        self.driver = AlpamayoDriver(self.state, self.config.camera_map)
        self._grpc, self.alpasim_port, self._servicer = build_egodriver_server(
            self.driver, host=self.config.host, port=self.config.alpasim_port, mode=self.config.alpasim_mode,
            max_workers=self.config.grpc_workers)
        self._grpc.start()
        return self.alpasim_port

    def become_ready(self) -> None:
        """Reports ready (/v1/health/ready true); after `warm_up` (and `serve_alpasim`)."""
        if self.state.worker is None or not self.state.worker.ready:
            raise RuntimeError("not warm: call warm_up first")
        self.state.phase = "ready"

    def start(self) -> None:
        """Everything, in the module docstring's order; returns once ready."""
        began = time.perf_counter()
        self.serve_http()
        self._log(f"HTTP on http://{_host(self.config.host)}:{self.http_port} (not ready: loading the model)")
        self.load()
        if self._stop.is_set():
            raise _StopRequested
        self._log("model loaded; warming up (compiling the served shapes)")
        warmup = self.warm_up()
        self.serve_alpasim()
        self.become_ready()
        self._log(f"ready in {time.perf_counter() - began:.1f} s (warm-up {warmup:.1f} s): HTTP on "
                  f"http://{_host(self.config.host)}:{self.http_port}, AlpaSim egodriver on "
                  f"{_host(self.config.host)}:{self.alpasim_port} ({self.config.alpasim_mode} mode, cameras: "
                  f"{self.config.camera_map.describe()})")

    # -- stop ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stops everything cleanly (module docstring); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.state.phase = "stopping"
        grace = self.config.shutdown_grace_s
        grpc_stopped = self._grpc.stop(grace) if self._grpc is not None else None
        if self.state.worker is not None:
            self.state.worker.close(timeout=grace)
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            self._http_thread.join(grace + 5)
        if grpc_stopped is not None:
            grpc_stopped.wait(grace + 5)
        closed = self._servicer.close_all_sessions() if self._servicer is not None else 0
        self._log(f"stopped ({closed} AlpaSim session(s) closed)")

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Serves until SIGTERM or SIGINT (from the main thread), then stops; returns 0."""
        loading = threading.Event()

        def on_signal(signum, frame):
            if not self._stop.is_set():
                self._log(f"{signal.Signals(signum).name}: stopping")
            self._stop.set()
            if loading.is_set():
                raise _StopRequested

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            loading.set()
            try:
                self.start()
            finally:
                loading.clear()
            while not self._stop.wait(0.5):
                pass
        except _StopRequested:
            pass
        finally:
            loading.clear()
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (port 0: any free one)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {error}") from None
    sock.set_inheritable(True)
    return sock
