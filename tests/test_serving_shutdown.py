"""`alpamayo-jax serve` as a process: it says where it listens once warm, and SIGTERM during a
request lets the request finish (or fail cleanly), closes the open AlpaSim session and exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from alpamayo_jax.processing.synthetic import synthetic_clip
from tests.serving_support import IMAGE_SIZE, TINY, nim_payload

READY = re.compile(r"ready in .* HTTP on http://127\.0\.0\.1:(\d+), AlpaSim egodriver on 127\.0\.0\.1:(\d+)")


def _start_session(port: int) -> None:
    """Opens an AlpaSim session (the model's cameras) and leaves it open."""
    import grpc
    from carla_driver_interface.protocol import DriveSessionRequest, EgodriverServiceStub
    from carla_driver_interface.testing import FakeCamera

    from alpamayo_jax.serving.cameras import MODEL_CAMERA_IDS

    request = DriveSessionRequest(session_uuid="left-open", random_seed=1)
    request.rollout_spec.vehicle.available_cameras.extend(
        FakeCamera(logical_id=camera_id).available_camera() for camera_id in MODEL_CAMERA_IDS)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        EgodriverServiceStub(channel).start_session(request, timeout=30)


def test_sigterm_during_a_request_finishes_it_and_exits_0():
    command = [sys.executable, "-m", "alpamayo_jax.serving", "--model", str(TINY / "hf"), "--processor-dir",
               str(TINY / "vlm"), "--http-port", "0", "--alpasim-port", "0", "--warmup-size", "90x160",
               "--shutdown-grace", "60", "--log-level", "WARNING"]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", JAX_PLATFORMS="cpu")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ports = threading.Event()
    found = {}

    def read():
        for line in process.stdout:
            lines.append(line)
            match = READY.search(line)
            if match:
                found["http"], found["alpasim"] = int(match[1]), int(match[2])
                ports.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ports.wait(180), "".join(lines)
        _start_session(found["alpasim"])
        # Sampling settings the warm-up did not compile: the request compiles for seconds, so it is
        # still running when the signal arrives.
        body = nim_payload(synthetic_clip(1, image_size=IMAGE_SIZE), seed=3, temperature=0.7,
                           max_generation_length=100)
        outcome = {}

        def request():
            try:
                response = httpx.post(f"http://127.0.0.1:{found['http']}/v1/infer", content=json.dumps(body),
                                      headers={"content-type": "application/json"}, timeout=120)
                outcome["status"], outcome["body"] = response.status_code, response.json()
            except httpx.HTTPError as error:
                outcome["error"] = repr(error)
            outcome["done"] = time.monotonic()

        client = threading.Thread(target=request)
        client.start()
        time.sleep(1.0)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        client.join(120)
        assert process.wait(120) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(10)
    output = "".join(lines)
    assert "error" not in outcome, outcome
    assert outcome["done"] > signalled  # it was in flight when the signal came
    assert outcome["status"] in (200, 503), outcome
    if outcome["status"] == 200:
        assert len(outcome["body"]["trajectories"]) == 1
    else:
        assert "stopping" in outcome["body"]["error"]
    assert "SIGTERM: stopping" in output and "stopped (1 AlpaSim session(s) closed)" in output, output
    assert "Traceback" not in output, output
