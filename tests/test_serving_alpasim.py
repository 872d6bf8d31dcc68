"""`alpamayo-jax serve` as AlpaSim's egodriver, over real gRPC: carla-driver-interface's FakeLoop
(the runtime side of the contract, rendering pinhole cameras) drives the tiny model in closed loop.

One warm server per module; a second egodriver on the same worker serves a `--camera-map`."""

from __future__ import annotations

import math
import pickle
import threading
import zlib

import grpc
import numpy as np
import pytest
from carla_driver_interface.protocol import EgodriverServiceStub, Empty
from carla_driver_interface.testing import FakeCamera

from alpamayo_jax.serving.alpasim import AlpamayoDriver, build_egodriver_server
from alpamayo_jax.serving.cameras import MODEL_CAMERA_IDS, CameraMap
from tests.serving_support import run_loop, running_server, tiny_pipeline

HISTORY_STEPS = 15  # at 0.1 s per step, the first drive with 1.5 s of poses is step 15
# The model's cameras as a vehicle would carry them: cross cameras looking 60 degrees aside.
MODEL_CAMERAS = [FakeCamera(logical_id=camera_id, width=160, height=90, fov_deg=fov, yaw_left_deg=yaw)
                 for camera_id, fov, yaw in zip(MODEL_CAMERA_IDS, (120, 120, 120, 30), (60, 0, -60, 0), strict=True)]
FRONT_ONLY = [FakeCamera(logical_id="camera_front", width=160, height=90)]


@pytest.fixture(scope="module")
def server():
    with running_server(tiny_pipeline()) as server:
        yield server


@pytest.fixture(scope="module")
def mapped_port(server):
    """An egodriver on the same warm worker that feeds every model camera from camera_front."""
    driver = AlpamayoDriver(server.state, CameraMap.parse(["*=camera_front"]))
    grpc_server, port, _ = build_egodriver_server(driver, port=0)
    grpc_server.start()
    yield port
    grpc_server.stop(None)


def debug(response) -> dict:
    return pickle.loads(response.debug_info.unstructured_debug_info)


def finite(trajectory) -> bool:
    return all(math.isfinite(v) for p in trajectory.poses
               for v in (p.pose.vec.x, p.pose.vec.y, p.pose.vec.z, p.pose.quat.x, p.pose.quat.y, p.pose.quat.z,
                         p.pose.quat.w))


def test_closed_loop_holds_then_drives(server):
    result, recorder = run_loop(server.alpasim_port, MODEL_CAMERAS, 30, seed=100, initial_speed_mps=3.0)
    drives = recorder.drives()
    assert result.steps == 30 and len(drives) == 30
    assert all(not isinstance(response, grpc.RpcError) for _, response in drives)
    for step, (request, response) in enumerate(drives):
        info = debug(response)
        assert info["step"] == step and info["seed"] == 100 + step and info["policy_name"] == "alpamayo-jax"
        if step < HISTORY_STEPS:  # hold: an empty plan, never an error
            assert len(response.trajectory.poses) == 0 and info["status"] == "hold"
            assert ("camera frames" if step < 3 else "ego history") in info["hold_reason"]
            continue
        assert info["status"] == "plan", info["hold_reason"]
        poses = response.trajectory.poses
        assert len(poses) == 65 and finite(response.trajectory)  # the ego pose at t0, then 64 waypoints
        assert [p.timestamp_us for p in poses[1:]] == [request.time_now_us + 100_000 * (i + 1) for i in range(64)]
        assert len(response.debug_info.sampled_trajectories) == 1
        assert isinstance(info["reasoning_text"], str) and len(info["cot"]) == 1
        assert np.isfinite(info["samples_xyz"]).all() and np.shape(info["samples_xyz"]) == (1, 64, 3)
        assert {"generate", "flow_matching", "prepare_inputs", "total"} <= set(info["timings"])
        assert info["t0_us"] == request.time_now_us
    assert server.driver.num_sessions == 0 and not server._servicer._sessions  # closed by the loop
    metrics = server.state.metrics
    assert metrics.count("alpamayo_alpasim_drives_total", outcome="plan") >= 30 - HISTORY_STEPS


def test_concurrent_sessions_keep_their_own_frames(server):
    results = {}

    def drive(name, offset):
        results[name] = run_loop(server.alpasim_port, MODEL_CAMERAS, 18, seed=7, initial_lateral_offset_m=offset,
                                 initial_speed_mps=2.0)

    threads = [threading.Thread(target=drive, args=(name, offset)) for name, offset in (("a", 0.0), ("b", 3.0))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    planned = 0
    for name in ("a", "b"):
        _, recorder = results[name]
        sent: dict[str, list[int]] = {}
        sent_before = []  # per drive: the crc of every camera's frames sent so far
        drives_seen = 0
        for method, request, response in recorder.calls:
            if method == "submit_image_observation":
                sent.setdefault(request.camera_image.logical_id, []).append(zlib.crc32(request.camera_image.image_bytes))
            elif method == "drive":
                sent_before.append({camera: list(crcs) for camera, crcs in sent.items()})
                drives_seen += 1
        other = {zlib.crc32(r.camera_image.image_bytes) for r in results["b" if name == "a" else "a"][1].images()}
        for index, (_, response) in enumerate(recorder.drives()):
            info = debug(response)
            if info["status"] != "plan":
                continue
            planned += 1
            for camera, used in info["frames"].items():
                assert used["crc32"] == sent_before[index][camera][-4:], f"session {name}, {camera}"
                assert not set(used["crc32"]) & (other - set(sent_before[index][camera]))
    assert planned == 2 * (18 - HISTORY_STEPS)


def test_get_version_answers(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.alpasim_port}") as channel:
        version = EgodriverServiceStub(channel).get_version(Empty(), timeout=30)
    assert version.version_id.startswith("alpamayo-jax")


def test_other_camera_ids_fail_at_start_session(server):
    with pytest.raises(grpc.RpcError) as raised:
        run_loop(server.alpasim_port, FRONT_ONLY, 1)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = raised.value.details()
    assert "camera_front_wide_120fov" in details and "--camera-map" in details and "camera_front" in details


def test_camera_map_feeds_the_model_and_seeds_replay(mapped_port):
    runs = [run_loop(mapped_port, FRONT_ONLY, HISTORY_STEPS + 2, seed=11)[1] for _ in range(2)]
    plans = []
    for recorder in runs:
        infos = [debug(response) for _, response in recorder.drives()]
        assert [i["status"] for i in infos[HISTORY_STEPS:]] == ["plan", "plan"]
        assert all(frames["source"] == "camera_front" for frames in infos[HISTORY_STEPS]["frames"].values())
        assert [i["seed"] for i in infos[HISTORY_STEPS:]] == [11 + HISTORY_STEPS, 12 + HISTORY_STEPS]
        plans.append([i["samples_xyz"] for i in infos[HISTORY_STEPS:]])
    np.testing.assert_array_equal(plans[0], plans[1])  # same session seed, same inputs: same plans
