"""`alpamayo-jax serve`'s HTTP API on the tiny model: NIM's /v1/infer gives what `infer` gives on
the same inputs and seed; malformed requests get a 4xx naming the problem; readiness, liveness
under load, model failures (500, then serving on), models and metrics.

One server per module, started step by step so that readiness is observed before the warm-up ends.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from unittest import mock

import httpx
import numpy as np
import pytest

from alpamayo_jax import cli
from alpamayo_jax.processing.clip_file import save_clip
from alpamayo_jax.processing.synthetic import synthetic_clip
from alpamayo_jax.serving.server import Server
from alpamayo_jax.serving.worker import InferenceWorker
from tests.serving_support import IMAGE_SIZE, TINY, b64, config, encode, nim_payload, tiny_pipeline

SEED = 7


@pytest.fixture(scope="module")
def server():
    server = Server(config(), pipeline=tiny_pipeline(), log=lambda message: None)
    gate = threading.Event()
    warm_up = InferenceWorker._warm_up

    def gated_warm_up(worker):  # holds the warm-up until the cold server has been probed
        gate.wait(60)
        warm_up(worker)

    try:
        server.serve_http()
        server.readiness = [_ready(server)]  # before the model loads
        server.load()
        with mock.patch.object(InferenceWorker, "_warm_up", gated_warm_up):
            warming = threading.Thread(target=server.warm_up)
            warming.start()
            while server.state.phase != "warming up":
                time.sleep(0.01)
            server.readiness.append(_ready(server))
            server.cold_infer = httpx.post(f"http://127.0.0.1:{server.http_port}/v1/infer", timeout=10,
                                           json=nim_payload(synthetic_clip(0, image_size=IMAGE_SIZE)))
            gate.set()
            warming.join()
        server.readiness.append(_ready(server))  # warm, not yet reported ready
        server.serve_alpasim()
        server.become_ready()
        yield server
    finally:
        gate.set()
        server.shutdown()


def _ready(server) -> tuple[int, dict]:
    response = httpx.get(f"http://127.0.0.1:{server.http_port}/v1/health/ready", timeout=10)
    return response.status_code, response.json()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(3, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def payload(clip):
    return nim_payload(clip, seed=SEED)


def post(client, body, **kwargs):
    """POST /v1/infer with a body that may hold NaN (json.dumps writes it; httpx's json= refuses)."""
    return client.post("/v1/infer", content=json.dumps(body), headers={"content-type": "application/json"}, **kwargs)


def test_ready_is_false_until_warm_then_true(server, client):
    statuses = [(code, body["ready"], body["status"]) for code, body in server.readiness]
    assert statuses[0] == (503, False, "starting")
    assert (503, False, "warming up") in statuses
    assert all(code == 503 and not ready for code, ready, _ in statuses)
    # NIM's health body: object and message always, an error object on 503.
    assert all(body["object"] == "health.response" and "not ready" in body["error"]["message"]
               for _, body in server.readiness)
    assert server.cold_infer.status_code == 503 and "not ready (warming up)" in server.cold_infer.json()["error"]
    response = client.get("/v1/health/ready")
    assert response.status_code == 200 and response.json()["ready"] is True
    assert response.json()["object"] == "health.response" and response.json()["message"]
    assert client.get("/v1/health/live").json()["live"] is True


def test_infer_matches_the_infer_command(client, clip, payload, tmp_path):
    response = post(client, payload)
    assert response.status_code == 200, response.text
    body = response.json()
    clip_file = tmp_path / "clip.npz"
    save_clip(clip_file, clip)
    out = tmp_path / "result.json"
    assert cli.main(["infer", "--model", str(TINY / "hf"), "--processor-dir", str(TINY / "vlm"), "--clip",
                     str(clip_file), "--out", str(out), "--seed", str(SEED)]) == 0
    expected = json.loads(out.read_text())
    assert body["generated_token_ids"] == expected["generated_token_ids"]
    assert body["reasoning"] == expected["cot"]
    assert body["trajectories"] == expected["xyz"] and body["rotations"] == expected["rotation"]
    assert body["actions"] == expected["actions"]
    assert (body["seed"], body["num_traj_samples"], body["model"], body["warnings"]) == (SEED, 1, "alpamayo-r1", [])
    assert np.shape(body["trajectories"]) == (1, 64, 3) and {"generate", "total"} <= set(body["timings"])


def test_other_spellings_of_the_same_request_give_the_same_result(client, clip, payload):
    reference = post(client, payload).json()["trajectories"]
    # Cameras in another order, named by camera_order; egomotion rows as objects; JPEG data URLs.
    order = [3, 1, 0, 2]
    shuffled = dict(payload, images=[payload["images"][4 * c + f] for c in order for f in range(4)],
                    camera_order=["front_tele", "camera_front_wide_120fov", "cross_left_120fov", "cross_right"])
    assert post(client, shuffled).json()["trajectories"] == reference  # num_frames_per_camera: NIM's default 4
    rows = [dict(zip(("x", "y", "z", "qx", "qy", "qz", "qw"), row, strict=True)) for row in payload["egomotion"]]
    assert post(client, dict(payload, egomotion=rows)).json()["trajectories"] == reference
    # NIM's egomotion object: positions and quaternions [w, x, y, z], or rotation matrices.
    nim_form = {"ego_history_xyz": [row[:3] for row in payload["egomotion"]],
                "ego_history_rot": [[row[6], *row[3:6]] for row in payload["egomotion"]]}
    assert post(client, dict(payload, egomotion=nim_form)).json()["trajectories"] == reference
    matrices = dict(nim_form, ego_history_rot=clip.ego_history_rot.tolist())
    answer = post(client, dict(payload, egomotion=matrices)).json()
    np.testing.assert_allclose(answer["trajectories"], reference, rtol=0, atol=1e-5)  # no quaternion round trip
    jpeg = nim_payload(synthetic_clip(3, image_size=(180, 320)), fmt="JPEG", data_url=True, seed=SEED)
    response = post(client, jpeg)
    assert response.status_code == 200 and np.isfinite(response.json()["trajectories"]).all()


def _malformed(payload):
    """(name, body or raw bytes, expected status, text the error must contain)."""
    nan = float("nan")
    rows = payload["egomotion"]
    far = copy.deepcopy(rows)
    far[-1][0] = 3.0
    unnormed = copy.deepcopy(rows)
    unnormed[4][6] = 2.0
    missing_qw = [dict(zip(("x", "y", "z", "qx", "qy", "qz"), row[:6], strict=True)) for row in rows]
    images = payload["images"]
    small = b64(encode(np.zeros((3, 45, 80), np.uint8)))
    return [
        ("bad base64", dict(payload, images=[*images[:5], "not base64!", *images[6:]]), 422, "images[5]"),
        ("not an image", dict(payload, images=[*images[:2], b64(b"hello"), *images[3:]]), 422, "images[2]"),
        ("GIF", dict(payload, images=[b64(encode(np.zeros((3, 9, 16), np.uint8), "GIF")), *images[1:]]), 422,
         "images[0]"),
        ("15 images, no camera_order", dict(payload, images=images[:15]), 422, "camera_order"),
        ("sizes within a camera", dict(payload, images=[small, *images[1:]]), 422,
         "one size, got [(45, 80), (90, 160)]"),
        ("15 egomotion rows", dict(payload, egomotion=rows[:15]), 422, "egomotion: expected 16 poses"),
        ("17 egomotion rows", dict(payload, egomotion=[rows[0], *rows]), 422, "got 17"),
        ("NaN in egomotion", dict(payload, egomotion=[*rows[:3], [nan, *rows[3][1:]], *rows[4:]]), 422,
         "egomotion[3].x"),
        ("NaN temperature", dict(payload, temperature=nan), 422, "temperature"),
        ("unknown field", dict(payload, colour="red"), 422, "colour: unknown field"),
        ("NIM answer field", dict(payload, nav_text="turn left"), 422, "nav_text"),
        ("NIM answer mode", dict(payload, mode="answer"), 422, "mode"),
        ("string temperature", dict(payload, temperature="hot"), 422, "temperature"),
        ("float sample count", dict(payload, num_traj_samples=1.5), 422, "num_traj_samples"),
        ("bool top_k", dict(payload, top_k=True), 422, "top_k"),
        ("images not a list", dict(payload, images=images[0]), 422, "images"),
        ("row of 6", dict(payload, egomotion=[row[:6] for row in rows]), 422, "egomotion[0]"),
        ("object without qw", dict(payload, egomotion=missing_qw), 422, "egomotion[0]: missing key(s) ['qw']"),
        ("not a unit quaternion", dict(payload, egomotion=unnormed), 422, "egomotion[4]"),
        ("t0 not the origin", dict(payload, egomotion=far), 422, "egomotion"),
        ("no egomotion", {k: v for k, v in payload.items() if k != "egomotion"}, 422, "egomotion"),
        ("unknown camera", dict(payload, camera_order=["cross_left", "rear_left", "cross_right", "front_tele"],
                                num_frames_per_camera=4), 422, "camera_order[1]"),
        ("NIM egomotion without rotations", dict(payload, egomotion={"ego_history_xyz": [r[:3] for r in rows]}), 422,
         "egomotion: missing key(s) ['ego_history_rot']"),
        ("NIM egomotion, 15 positions", dict(payload, egomotion={"ego_history_xyz": [r[:3] for r in rows[1:]],
                                                                 "ego_history_rot": [[1, 0, 0, 0]] * 16}), 422,
         "egomotion.ego_history_xyz: expected 16 positions"),
        ("NIM egomotion, scaled quaternion", dict(payload, egomotion={"ego_history_xyz": [r[:3] for r in rows],
                                                                      "ego_history_rot": [[2, 0, 0, 0]] * 16}), 422,
         "egomotion.ego_history_rot[0]: [w, x, y, z] must be a unit quaternion"),
        ("2 frames per camera", dict(payload, images=images[:8], num_frames_per_camera=2,
                                     camera_order=["cross_left", "front_wide", "cross_right", "front_tele"]), 422,
         "num_frames_per_camera"),
        ("seed too large", dict(payload, seed=2**32), 422, "seed"),
        ("top_p above 1", dict(payload, top_p=1.5), 422, "top_p"),
        ("not JSON", b"{'images': ", 422, "body: not valid JSON"),
    ]


def test_malformed_requests_get_4xx_naming_the_problem(client, payload):
    cases = _malformed(payload)
    assert len(cases) >= 15
    failures = []
    for name, body, status, text in cases:
        if isinstance(body, bytes):
            response = client.post("/v1/infer", content=body, headers={"content-type": "application/json"})
        else:
            response = post(client, body)
        error = response.json().get("error", "")
        if response.status_code != status or text not in error:
            failures.append(f"{name}: {response.status_code} {error!r}")
    assert not failures, "\n".join(failures)


def test_bodies_over_128_mib_are_refused(server):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 134217729\r\n\r\n{")
        reply = sock.recv(65536).decode()
    status_line, _, rest = reply.partition("\r\n")
    assert " 413 " in status_line and "134,217,728 bytes" in rest


def test_streamed_body_over_the_limit_is_refused(server):
    import asyncio

    from alpamayo_jax.serving.http import create_app

    state = copy.copy(server.state)
    state.max_body_bytes = 1000

    async def chunks():
        for _ in range(3):
            yield b"x" * 600

    async def send():  # chunked: no Content-Length to refuse it by
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as test_client:
            return await test_client.post("/v1/infer", content=chunks(), headers={"content-type": "application/json"})

    response = asyncio.run(send())
    assert response.status_code == 413 and "over the limit of 1,000 bytes" in response.json()["error"]


def test_model_failure_is_a_500_and_the_server_keeps_serving(server, client, payload, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(server.state.worker, "_run", fail)
    response = post(client, payload)
    assert response.status_code == 500 and "device lost" in response.json()["error"]
    monkeypatch.undo()
    assert post(client, payload).status_code == 200


def test_health_answers_while_the_model_is_busy(server, client, payload, monkeypatch):
    real = server.state.worker._run

    def slow(*args, **kwargs):
        time.sleep(2.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(server.state.worker, "_run", slow)
    answers = []
    request = threading.Thread(target=lambda: answers.append(post(client, payload).status_code))
    request.start()
    time.sleep(0.3)
    start = time.perf_counter()
    live = client.get("/v1/health/live")
    ready = client.get("/v1/health/ready")
    elapsed = time.perf_counter() - start
    request.join(60)
    assert live.status_code == 200 and ready.status_code == 200 and elapsed < 1.0
    assert answers == [200]


def test_models_and_metrics(client, payload):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "alpamayo-r1"
    assert {"created", "owned_by", "backend", "checkpoint"} <= set(models["data"][0])  # NIM's model card
    response = client.get("/v1/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert 'alpamayo_http_requests_total{path="/v1/infer",status="200"}' in text
    assert 'alpamayo_http_requests_total{path="/v1/infer",status="422"}' in text
    assert 'alpamayo_stage_seconds_bucket{source="http",stage="generate",le="+Inf"}' in text
    assert 'alpamayo_stage_seconds_count{source="http",stage="decode_images"}' in text
    assert "alpamayo_ready 1" in text

