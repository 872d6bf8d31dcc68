"""The serving pieces that need no model: the ego history in the t0 frame, camera names and
`--camera-map`, image decoding, request settings, the Prometheus text, and the `serve` flags."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
from PIL import Image

from alpamayo_jax.serving.cameras import MODEL_CAMERA_IDS, CameraMap, model_camera_name
from alpamayo_jax.serving.images import ImageError, decode_base64_image, decode_image
from alpamayo_jax.serving.metrics import Metrics
from alpamayo_jax.serving.poses import HistoryUnavailable, ego_history, quaternion_to_matrix
from tests.serving_support import b64, encode, matrix_to_quaternion


def _yaw_quaternion(yaw):
    return np.stack([np.zeros_like(yaw), np.zeros_like(yaw), np.sin(yaw / 2), np.cos(yaw / 2)], axis=-1)


def test_ego_history_is_in_the_t0_frame_and_interpolated():
    # A car heading 90 degrees left of the local x axis at t0, driving 10 m/s, poses every 50 ms.
    times = np.arange(0, 2_000_001, 50_000)
    yaw = np.full(len(times), np.pi / 2)
    positions = np.stack([100 + np.zeros(len(times)), 5 + 10 * times / 1e6, np.ones(len(times))], axis=1)
    xyz, rot = ego_history(times, positions, _yaw_quaternion(yaw), t0_us=1_980_000)
    assert xyz.shape == (16, 3) and rot.shape == (16, 3, 3) and xyz.dtype == np.float32
    np.testing.assert_allclose(xyz[-1], 0, atol=1e-6)
    np.testing.assert_allclose(rot[-1], np.eye(3), atol=1e-6)
    # In the t0 ego frame the car came from straight behind: x = -10 m/s * age, y = 0.
    ages = np.arange(15, -1, -1) * 0.1
    np.testing.assert_allclose(xyz[:, 0], -10 * ages, atol=1e-4)
    np.testing.assert_allclose(xyz[:, 1:], 0, atol=1e-4)


def test_ego_history_slerps_rotations():
    times = np.array([0, 1_000_000, 2_000_000])
    quats = _yaw_quaternion(np.array([0.0, 0.2, 0.4]))
    _, rot = ego_history(times, np.zeros((3, 3)), quats, t0_us=2_000_000, num_poses=3, dt_us=500_000)
    yaws = np.arctan2(rot[:, 1, 0], rot[:, 0, 0])
    np.testing.assert_allclose(yaws, [-0.2, -0.1, 0.0], atol=1e-6)  # yaw 0.2, 0.3, 0.4 at 1.0, 1.5, 2.0 s, from t0


@pytest.mark.parametrize("times, t0, message", [
    ([0], 0, r"1 pose\(s\) received"),
    ([0, 100_000], 1_500_000, "older than the latest camera frame"),
    ([100_000, 1_500_000], 1_500_000, "need 1.5 s"),
])
def test_ego_history_says_what_is_missing(times, t0, message):
    quats = _yaw_quaternion(np.zeros(len(times)))
    with pytest.raises(HistoryUnavailable, match=message):
        ego_history(times, np.zeros((len(times), 3)), quats, t0_us=t0)


def test_quaternions_round_trip():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(20, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rot = quaternion_to_matrix(q)
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-12)
    np.testing.assert_allclose(quaternion_to_matrix(matrix_to_quaternion(rot)), rot, atol=1e-12)


def test_camera_names_and_map():
    assert model_camera_name("camera_front_wide_120fov") == model_camera_name("front_wide") == "front_wide_120fov"
    with pytest.raises(ValueError, match="rear_left"):
        model_camera_name("rear_left")
    assert CameraMap().resolve(MODEL_CAMERA_IDS) == MODEL_CAMERA_IDS
    mapped = CameraMap.parse(["*=camera_front", "front_tele=camera_tele"])
    assert mapped.resolve(["camera_front", "camera_tele"]) == ("camera_front",) * 3 + ("camera_tele",)
    with pytest.raises(ValueError, match=r"needs camera_cross_left_120fov.*--camera-map"):
        CameraMap().resolve(["camera_front"])
    for bad in ("front_wide", "rear_left=cam", "front_wide=a,front_wide=b"):
        with pytest.raises(ValueError, match="--camera-map"):
            CameraMap.parse([bad])


def test_images_decode_and_name_the_problem():
    frame = np.random.default_rng(0).integers(0, 255, (3, 9, 16), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode(frame, "PNG")), frame.transpose(1, 2, 0))
    assert decode_base64_image("data:image/jpeg;base64," + b64(encode(frame, "JPEG"))).shape == (9, 16, 3)
    for mode in ("L", "RGBA", "P"):  # converted to RGB as Pillow converts them
        buffer = io.BytesIO()
        converted = Image.fromarray(frame.transpose(1, 2, 0)).convert(mode)
        converted.save(buffer, format="PNG")
        np.testing.assert_array_equal(decode_image(buffer.getvalue()), np.asarray(converted.convert("RGB")))
    for text, message in [("@@@", "not valid base64"), (b64(b"hello"), "not a decodable"),
                          ("data:text/plain;base64,aGk=", "expected image"), (b64(encode(frame, "GIF")), "GIF")]:
        with pytest.raises(ImageError, match=rf"images\[7\]: .*{message}"):
            decode_base64_image(text, name="images[7]")


def test_metrics_render_prometheus_text():
    metrics = Metrics(buckets=(0.1, 1.0))
    metrics.inc("alpamayo_http_requests_total", path="/v1/infer", status="200")
    metrics.observe("alpamayo_stage_seconds", 0.5, source="http", stage="generate")
    metrics.gauge("alpamayo_ready", lambda: 1.0)
    text = metrics.render()
    assert 'alpamayo_http_requests_total{path="/v1/infer",status="200"} 1' in text
    assert 'alpamayo_stage_seconds_bucket{source="http",stage="generate",le="0.1"} 0' in text
    assert 'alpamayo_stage_seconds_bucket{source="http",stage="generate",le="+Inf"} 1' in text
    assert 'alpamayo_stage_seconds_count{source="http",stage="generate"} 1' in text
    assert "# TYPE alpamayo_ready gauge\nalpamayo_ready 1" in text
    with pytest.raises(KeyError):
        metrics.inc("alpamayo_http_requests_total", path="/v1/infer")


def test_request_settings_override_the_defaults():
    from alpamayo_jax.config import tiny
    from alpamayo_jax.inference.inference_config import InferenceConfig
    from alpamayo_jax.serving.nim import RequestError, request_settings

    config = tiny()
    defaults = InferenceConfig.from_model(config, num_samples=2)
    assert request_settings(defaults, config) == defaults
    changed = request_settings(defaults, config, temperature=0.9, top_k=5, max_generation_length=40)
    assert (changed.num_samples, changed.sampling.temperature, changed.sampling.top_k, changed.max_new_tokens,
            changed.sampling.top_p) == (2, 0.9, 5, 40, defaults.sampling.top_p)
    greedy = InferenceConfig.from_model(config, greedy=True)
    assert not request_settings(greedy, config, num_traj_samples=3).sampling.do_sample
    with pytest.raises(RequestError, match="top_p"):
        request_settings(defaults, config, top_p=0.0)


def test_serve_flags_parse_without_the_extra():
    from alpamayo_jax.serving.command import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", ".", "--warmup-size", "90x160", "--camera-map", "*=camera_front",
                              "--http-port", "0", "--temperature", "0.7"])
    assert (args.host, args.http_port, args.alpasim_port, args.warmup_size) == ("127.0.0.1", 0, 50051, [(90, 160)])
    assert args.alpasim_mode == "alpasim" and args.camera_map == ["*=camera_front"] and args.temperature == 0.7
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", ".", "--warmup-size", "wide"])


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "0"], "temperature must be a finite number > 0"),
    (["--num-samples", "0"], "num_samples must be a whole number >= 1"),
    (["--camera-map", "front_wide"], "--camera-map 'front_wide': expected MODEL_CAMERA=SESSION_CAMERA"),
    (["--mesh", "3by4"], "unknown mesh"),
])
def test_serve_checks_options_before_the_model_loads(monkeypatch, extra, message):
    from alpamayo_jax.inference.pipeline import Pipeline
    from alpamayo_jax.serving.command import add_arguments, main
    from tests.serving_support import TINY

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(Pipeline, "load", refuse)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(TINY / "hf"), "--processor-dir", str(TINY / "vlm"), *extra])
    with pytest.raises(ValueError, match=message):
        main(args)
