"""AlpaSim's egodriver: the policy side of `egodriver.EgodriverService`, on carla-driver-interface.

carla-driver-interface's servicer keeps each session (declared cameras, frame history, ego poses)
and turns the plan, given in the rig frame, into the runtime's local frame. `AlpamayoDriver` (its
`BaseDriver`) makes model inputs of a session as AlpaSim's own Alpamayo driver does:

* the last 4 frames of each of the model's cameras: the session cameras of the same ids
  (`camera_cross_left_120fov`, `camera_front_wide_120fov`, `camera_cross_right_120fov`,
  `camera_front_tele_30fov`), or those `--camera-map` names (`alpamayo_jax.serving.cameras`); a
  session that has none of them fails `start_session` (FAILED_PRECONDITION) with a message naming
  the missing cameras and the flag;
* t0 = the newest of those frames; the 16-pose ego history at t0 - 1.5 s ... t0, 0.1 s apart,
  interpolated from the egomotion observations and put in the rig frame at t0
  (`alpamayo_jax.serving.poses.ego_history`);
* a run with seed = session seed + step (the zero-based count of the session's drive calls),
  modulo 2**32, so a session replays exactly;
* the plan: the first sample's x, y and heading, every 0.1 s from time_now + 0.1 s, rig frame.

Until every model camera has 4 frames and the poses cover 1.5 s, `drive` answers an empty plan
("hold"), never an error. The frames are expected at 10 Hz (AlpaSim's Alpamayo camera rate);
others are used as they come, with a warning.

`AlpamayoServicer` extends the package's servicer: a hold is an empty trajectory (as AlpaSim's
driver answers it, where the package would send the current pose alone), and in alpasim mode the
pickled debug dict gains `status` ("plan" / "hold"), `hold_reason`, `seed`, `step`, the first
sample's Chain-of-Causation text (`reasoning_text`, AlpaSim's key) and every sample's (`cot`),
every sample's rig-frame waypoints (`samples_xyz`), per-stage `timings`, `t0_us` and the `frames`
used (per model camera: source camera, timestamps, CRC-32 of the encoded bytes). Every sample also
goes in `DebugInfo.sampled_trajectories`. In carla mode the debug message carries scalars only.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
import zlib
from concurrent import futures

import numpy as np

from alpamayo_jax.processing.clip import CAMERA_NAMES, FRAME_DT, Clip
from alpamayo_jax.serving.cameras import MODEL_CAMERA_IDS, CameraMap
from alpamayo_jax.serving.dependencies import require
from alpamayo_jax.serving.images import decode_image
from alpamayo_jax.serving.poses import HistoryUnavailable, ego_history
from alpamayo_jax.serving.state import ServingState
from alpamayo_jax.serving.worker import ServerStopping

require("carla_driver_interface", "grpc")
import grpc
from carla_driver_interface.driver import BaseDriver, DriveContext, DriveResult, SessionState
from carla_driver_interface.geometry import Pose, Trajectory
from carla_driver_interface.protocol import (
    add_CarlaVehicleServiceServicer_to_server,
    add_EgodriverServiceServicer_to_server,
    channel_options,
)
from carla_driver_interface.server import UNIX_SCHEMES
from carla_driver_interface.service import SERVICE_MODES, EgodriverServicer

logger = logging.getLogger(__name__)

NUM_FRAMES = 4
NUM_HISTORY = 16
STEP_US = 100_000  # history spacing and plan spacing (10 Hz)
SEED_MODULUS = 2**32


class _Session:
    """What the driver keeps per session: the session camera feeding each model camera, and the
    frames it decoded (so that each frame is decoded once)."""

    def __init__(self, sources: tuple[str, ...]):
        self.sources = sources
        self.decoded: dict[tuple, np.ndarray] = {}
        self.lock = threading.Lock()
        self.warned_rate = False


class AlpamayoDriver(BaseDriver):
    """The model as an AlpaSim policy (module docstring). Runs its jobs on `state.worker`."""

    name = "alpamayo-jax"
    frame_history_length = NUM_FRAMES

    def __init__(self, state: ServingState, camera_map: CameraMap | None = None):
        self.state = state
        self.camera_map = camera_map or CameraMap()
        self._sessions: dict[str, _Session] = {}
        self._debug: dict[tuple[str, int], dict] = {}
        self._lock = threading.Lock()
        state.metrics.gauge("alpamayo_alpasim_sessions", lambda: float(len(self._sessions)))

    # -- sessions ------------------------------------------------------------------------------

    def on_session_start(self, session: SessionState) -> None:
        sources = self.camera_map.resolve(session.cameras)  # ValueError -> FAILED_PRECONDITION
        with self._lock:
            self._sessions[session.uuid] = _Session(sources)
        logger.info("session %s: model cameras from %s", session.uuid,
                    ", ".join(f"{m}={s}" for m, s in zip(MODEL_CAMERA_IDS, sources, strict=True)))

    def on_session_close(self, session: SessionState) -> None:
        with self._lock:
            self._sessions.pop(session.uuid, None)
            for key in [k for k in self._debug if k[0] == session.uuid]:
                del self._debug[key]

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def pop_debug(self, uuid: str, time_now_us: int) -> dict | None:
        """The extra debug information of one drive (for `AlpamayoServicer`), once."""
        with self._lock:
            return self._debug.pop((uuid, int(time_now_us)), None)

    # -- drive ---------------------------------------------------------------------------------

    def drive(self, ctx: DriveContext) -> DriveResult:
        session = ctx.session
        step = session.drive_count  # this drive's zero-based index (counted after it returns)
        seed = (session.seed + step) % SEED_MODULUS
        state = self._sessions.get(session.uuid)
        if state is None:  # started before the driver knew it: cannot happen through the servicer
            raise RuntimeError(f"session {session.uuid} was not started on this driver")
        with session.lock:
            histories = {source: list(session.frame_history.get(source, ())) for source in set(state.sources)}
            times = list(session.ego_trajectory.timestamps_us)
            poses = list(session.ego_trajectory.poses)
        info = {"status": "hold", "hold_reason": None, "seed": seed, "step": step}
        start = time.perf_counter()

        short = [f"{model_id} ({source}) {len(histories[source])}"
                 for model_id, source in zip(MODEL_CAMERA_IDS, state.sources, strict=True)
                 if len(histories[source]) < NUM_FRAMES]
        if short:
            return self._hold(ctx, info, f"camera frames: {', '.join(short)} of {NUM_FRAMES} received")
        frames = {source: histories[source][-NUM_FRAMES:] for source in histories}
        t0_us = max(frames[source][-1].timestamp_us for source in state.sources)
        try:
            xyz, rot = ego_history(times, [p.position for p in poses], [p.quat_xyzw for p in poses], t0_us,
                                   num_poses=NUM_HISTORY, dt_us=STEP_US)
        except HistoryUnavailable as why:
            return self._hold(ctx, info, str(why))
        history_done = time.perf_counter()

        images = self._decode(state, frames)
        self._check_rate(session.uuid, state, frames)
        clip = Clip.create([images[source] for source in state.sources], xyz, rot, camera_names=CAMERA_NAMES)
        decoded = time.perf_counter()
        inputs = self.state.pipeline.prepare(clip)
        prepared = time.perf_counter()
        try:
            samples = self.state.worker.run(inputs, seed=seed, source="alpasim")
        except ServerStopping as why:
            return self._hold(ctx, info, str(why))

        timings = {"ego_history": round(history_done - start, 4), "decode_images": round(decoded - history_done, 4),
                   "prepare_inputs": round(prepared - decoded, 4), **samples.timings,
                   "total": round(time.perf_counter() - start, 4)}
        for stage in ("ego_history", "decode_images", "prepare_inputs", "total"):
            self.state.metrics.observe("alpamayo_stage_seconds", timings[stage], source="alpasim", stage=stage)
        plans = [self._plan(ctx.time_now_us, samples.xyz[0, s], samples.rotation[0, s])
                 for s in range(samples.xyz.shape[1])]
        info.update(
            status="plan",
            reasoning_text=samples.cot[0][0],
            cot=list(samples.cot[0]),
            samples_xyz=samples.xyz[0].tolist(),
            num_generated_tokens=samples.num_generated_tokens[0].tolist(),
            timings=timings,
            t0_us=int(t0_us),
            frames={model_id: {"source": source,
                               "timestamps_us": [int(f.timestamp_us) for f in frames[source]],
                               "crc32": [zlib.crc32(f.image_bytes) for f in frames[source]]}
                    for model_id, source in zip(MODEL_CAMERA_IDS, state.sources, strict=True)},
        )
        self._remember(ctx, info)
        scalars = {"seed": float(seed), "step": float(step), "planned": 1.0,
                   **{f"seconds_{stage}": float(seconds) for stage, seconds in timings.items()}}
        return DriveResult(trajectory_in_rig=plans[0], sampled_trajectories_in_rig=plans, debug_scalars=scalars)

    def _hold(self, ctx: DriveContext, info: dict, reason: str) -> DriveResult:
        info["hold_reason"] = reason
        self._remember(ctx, info)
        logger.debug("session %s step %d: hold (%s)", ctx.session.uuid, info["step"], reason)
        return DriveResult(trajectory_in_rig=Trajectory.empty(),
                           debug_scalars={"seed": float(info["seed"]), "step": float(info["step"]), "planned": 0.0})

    def _remember(self, ctx: DriveContext, info: dict) -> None:
        with self._lock:
            if ctx.session.uuid in self._sessions:
                self._debug[(ctx.session.uuid, int(ctx.time_now_us))] = info

    @staticmethod
    def _plan(time_now_us: int, xyz: np.ndarray, rot: np.ndarray) -> Trajectory:
        """(W, 3) rig-frame waypoints and (W, 3, 3) rotations -> a plan every STEP_US from now."""
        yaw = np.arctan2(rot[:, 1, 0], rot[:, 0, 0])
        return Trajectory([int(time_now_us) + (i + 1) * STEP_US for i in range(len(xyz))],
                          [Pose.from_xyz_yaw(float(x), float(y), float(z), float(a))
                           for (x, y, z), a in zip(xyz, yaw, strict=True)])

    @staticmethod
    def _decode(state: _Session, frames: dict) -> dict[str, list[np.ndarray]]:
        """The frames of each source camera as (H, W, 3) uint8, each frame decoded once."""
        with state.lock:
            keep = {}
            images = {}
            for source, chosen in frames.items():
                images[source] = []
                for frame in chosen:
                    key = (source, frame.frame_start_us, frame.frame_end_us, len(frame.image_bytes))
                    array = state.decoded.get(key)
                    if array is None:
                        name = f"{source} frame at {frame.timestamp_us} us"
                        array = decode_image(frame.image_bytes, name=name)
                    keep[key] = array
                    images[source].append(array)
            state.decoded = keep
        return images

    @staticmethod
    def _check_rate(uuid: str, state: _Session, frames: dict) -> None:
        if state.warned_rate:
            return
        for source, chosen in frames.items():
            gaps = np.diff([f.timestamp_us for f in chosen]) / 1e6
            if len(gaps) and not np.allclose(gaps, FRAME_DT, atol=FRAME_DT / 2):
                logger.warning("session %s: camera %s frames are %s s apart; the model expects %g s (10 Hz)",
                               uuid, source, gaps.round(3).tolist(), FRAME_DT)
                state.warned_rate = True
                return


class AlpamayoServicer(EgodriverServicer):
    """The package's servicer with empty holds and the driver's debug information (module
    docstring)."""

    def __init__(self, driver: AlpamayoDriver, mode: str = "alpasim"):
        super().__init__(driver, mode)
        self.policy = driver
        self.mode = mode

    def drive(self, request, context):
        metrics = self.policy.state.metrics
        try:
            response = super().drive(request, context)
        except Exception:
            metrics.inc("alpamayo_alpasim_drives_total", outcome="error")
            raise
        info = self.policy.pop_debug(request.session_uuid, request.time_now_us)
        if info is None:
            metrics.inc("alpamayo_alpasim_drives_total", outcome="error")
            return response
        if info["status"] == "hold":
            response.trajectory.Clear()
        if self.mode == "alpasim":
            payload = pickle.loads(response.debug_info.unstructured_debug_info)  # our own builtins-only dict
            payload.update(info)
            response.debug_info.unstructured_debug_info = pickle.dumps(payload)
        metrics.inc("alpamayo_alpasim_drives_total", outcome=info["status"])
        return response

    def close_all_sessions(self) -> int:
        """Closes every open session (at shutdown), as close_session would; returns how many."""
        with self._sessions_lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            logger.info("closing session %s after %d drives (server stopping)", session.uuid, session.drive_count)
            self.policy.on_session_close(session)
        return len(sessions)


def build_egodriver_server(driver: AlpamayoDriver, *, host: str = "127.0.0.1", port: int = 50051,
                           mode: str = "alpasim", max_workers: int = 8) -> tuple[grpc.Server, int, AlpamayoServicer]:
    """A gRPC server (not started) for `driver` on host:port (port 0: any free port), and the
    port it bound. Serves egodriver.EgodriverService and the package's CarlaVehicleService."""
    if mode not in SERVICE_MODES:
        raise ValueError(f"unknown egodriver mode {mode!r}: expected one of {SERVICE_MODES}")
    # No SO_REUSEPORT: a port already in use must fail here, not be shared silently.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="egodriver"),
                         options=[*channel_options(), ("grpc.so_reuseport", 0)])
    servicer = AlpamayoServicer(driver, mode)
    add_EgodriverServiceServicer_to_server(servicer, server)
    add_CarlaVehicleServiceServicer_to_server(servicer, server)
    if host.startswith(UNIX_SCHEMES):
        address = host
    else:
        address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind the egodriver server to {address} (in use?)")
    return server, 0 if host.startswith(UNIX_SCHEMES) else bound, servicer

