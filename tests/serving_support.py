"""Helpers of the serving tests: the tiny model behind an in-process server, NIM payloads built
from a clip, and a gRPC channel that records what a closed loop sent and received."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
from pathlib import Path

import numpy as np
from PIL import Image

TINY = Path(__file__).parent / "fixtures" / "tiny_ar1_dev"
# 16:9 like the fake cameras and NIM's 1920x1080: one compiled shape for every test request.
WARMUP_SIZES = ((90, 160),)
IMAGE_SIZE = (90, 160)


def tiny_pipeline():
    from alpamayo_jax.inference.pipeline import Pipeline

    return Pipeline.load(TINY / "hf", processor_dir=TINY / "vlm")


def config(**fields):
    from alpamayo_jax.serving.server import ServeConfig

    return ServeConfig(http_port=0, alpasim_port=0, warmup_sizes=WARMUP_SIZES, shutdown_grace_s=10.0, **fields)


@contextlib.contextmanager
def running_server(pipeline, **fields):
    """An in-process server on free loopback ports, started and warm; stopped on exit."""
    from alpamayo_jax.serving.server import Server

    server = Server(config(**fields), pipeline=pipeline, log=lambda message: None)
    try:
        server.start()
        yield server
    finally:
        server.shutdown()


def encode(frame_chw: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame_chw.transpose(1, 2, 0))).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def matrix_to_quaternion(rot: np.ndarray) -> np.ndarray:
    """(N, 3, 3) proper rotations -> (N, 4) unit quaternions (x, y, z, w), by Shepperd's method
    (the largest component first, so that none is taken from a difference of near-equal terms)."""
    out = []
    for m in np.asarray(rot, np.float64):
        trace = np.trace(m)
        i = int(np.argmax([m[0, 0], m[1, 1], m[2, 2], trace]))
        if i == 3:
            w = np.sqrt(1 + trace) / 2
            q = [(m[2, 1] - m[1, 2]) / (4 * w), (m[0, 2] - m[2, 0]) / (4 * w), (m[1, 0] - m[0, 1]) / (4 * w), w]
        else:
            j, k = (i + 1) % 3, (i + 2) % 3
            v = np.sqrt(1 + m[i, i] - m[j, j] - m[k, k]) / 2
            q = [0.0, 0.0, 0.0, (m[k, j] - m[j, k]) / (4 * v)]
            q[i], q[j], q[k] = v, (m[j, i] + m[i, j]) / (4 * v), (m[k, i] + m[i, k]) / (4 * v)
        q = np.asarray(q) / np.linalg.norm(q)
        out.append(q if q[3] >= 0 else -q)
    return np.stack(out)


def egomotion_rows(clip, *, objects: bool = False) -> list:
    quats = matrix_to_quaternion(clip.ego_history_rot)
    rows = [[*map(float, p), *map(float, q)] for p, q in zip(clip.ego_history_xyz, quats, strict=True)]
    if objects:
        return [dict(zip(("x", "y", "z", "qx", "qy", "qz", "qw"), row, strict=True)) for row in rows]
    return rows


def nim_payload(clip, *, fmt: str = "PNG", data_url: bool = False, **fields) -> dict:
    """A /v1/infer body of `clip`: its 16 frames camera-major in the model's order, its history."""
    images = []
    for camera in clip.camera_frames:
        for frame in camera:
            text = b64(encode(frame, fmt))
            images.append(f"data:image/{fmt.lower()};base64,{text}" if data_url else text)
    return {"images": images, "egomotion": egomotion_rows(clip), **fields}


class Recorder:
    """A client interceptor recording every unary call: (method, request, response or error)."""

    def __init__(self):
        import grpc

        self.calls = []
        self._lock = threading.Lock()

        class _Interceptor(grpc.UnaryUnaryClientInterceptor):
            def intercept_unary_unary(inner, continuation, details, request):
                outcome = continuation(details, request)
                try:
                    result = outcome.result()
                except grpc.RpcError as error:
                    result = error
                with self._lock:
                    self.calls.append((details.method.rsplit("/", 1)[-1], request, result))
                return outcome

        self.interceptor = _Interceptor()

    def channel(self, target: str):
        import grpc
        from carla_driver_interface.protocol import channel_options

        return grpc.intercept_channel(grpc.insecure_channel(target, options=channel_options()), self.interceptor)

    def drives(self) -> list:
        """(DriveRequest, DriveResponse) in call order."""
        return [(request, response) for method, request, response in self.calls if method == "drive"]

    def images(self) -> list:
        """The RolloutCameraImage requests sent, in order."""
        return [request for method, request, _ in self.calls if method == "submit_image_observation"]


def run_loop(port: int, cameras, steps: int, *, seed: int = 0, **loop_options):
    """A FakeLoop session of `steps` drives against localhost:`port`; returns (result, recorder)."""
    from carla_driver_interface.testing import FakeLoop

    recorder = Recorder()
    channel = recorder.channel(f"127.0.0.1:{port}")
    try:
        with FakeLoop(channel, cameras, timeout_s=120.0, **loop_options) as loop:
            result = loop.run(steps, seed=seed)
    finally:
        channel.close()
    return result, recorder
