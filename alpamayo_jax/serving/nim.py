"""NIM's `POST /v1/infer` in trajectory mode: the request, its checks, and the response.

The request follows the Alpamayo 1.5 NIM's API 1.0.0 (NVIDIA's NIM documentation: the `/v1/infer`
API reference and "Sampling Control"):

    images                  base64 strings or data:image/...;base64 URLs (JPEG, PNG, WebP, BMP, any
                            size, one size per camera), camera-major, each camera's frames oldest
                            first. Without camera_order: 16 images, 4 cameras x 4 frames in the order
                            cross_left, front_wide, cross_right, front_tele; any other count is a 422.
    camera_order            camera names in the images' order (full `camera_front_wide_120fov`,
                            `front_wide_120fov` or NIM's short `front_wide`);
    num_frames_per_camera   default 4. This model takes its 4 cameras x 4 frames: other layouts
                            (NIM's reduced ones) are a 422 naming the field.
    egomotion               16 poses, 0.1 s apart, oldest first, ending at t0, in the ego frame at
                            t0 (x forward, y left, z up, metres), in NIM's form: an object
                            {"ego_history_xyz": 16 x [x, y, z], "ego_history_rot": 16 quaternions
                            [w, x, y, z] or 16 3 x 3 rotation matrices}; or as 16 rows, each
                            [x, y, z, qx, qy, qz, qw] or {"x", "y", "z", "qx", "qy", "qz", "qw"}
                            (quaternion last, scalar last). A quaternion is the pose's orientation
                            in that frame (unit length). The last position must be the origin.
    num_traj_samples        1 ... 32 (NIM's range);
    temperature, top_p, top_k, seed, max_generation_length
                            per-request sampling; each defaults to the server's (`serve` flags).
    mode                    "trajectory" only; "answer" / "both", `question` and `nav_text` are
                            NIM fields this model does not serve: 422, naming them.

Any other field is a 422. NIM's documentation of API 1.0.0 that this module could be checked
against stops short of the response schema, so the response is this server's own: it carries, per sample, the trajectory (64 x [x, y, z] in the
t0 ego frame, waypoints t0 + 0.1 ... t0 + 6.4 s), its rotations (64 x 3 x 3) and Chain-of-Causation
text, plus the actions, generated token ids, seed, settings, per-stage timings and `warnings`
(non-fatal input caveats).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any, Literal

import numpy as np

from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import TrajectorySamples
from alpamayo_jax.processing.clip import CAMERA_NAMES, FRAME_TIMESTAMPS, Clip, ClipError
from alpamayo_jax.serving.cameras import model_camera_name
from alpamayo_jax.serving.dependencies import require
from alpamayo_jax.serving.images import ImageError, decode_base64_image
from alpamayo_jax.serving.poses import QUATERNION_TOLERANCE, check_unit_quaternions, quaternion_to_matrix

require("pydantic")
from pydantic import BaseModel, ConfigDict, Field

NUM_FRAMES = len(FRAME_TIMESTAMPS)
NUM_HISTORY = 16
MAX_SEED = 2**32 - 1  # JAX keeps 32 bits of an integer seed
MAX_TRAJ_SAMPLES = 32  # NIM's documented range
NIM_EGOMOTION_KEYS = ("ego_history_xyz", "ego_history_rot")
MAX_GENERATION_LENGTH = 4096
POSE_KEYS = ("x", "y", "z", "qx", "qy", "qz", "qw")
UNSUPPORTED = {  # NIM fields of other modes, which this model does not serve
    "question": "visual question answering is not served: Alpamayo-R1 only predicts trajectories",
    "nav_text": "navigation text is not served: Alpamayo-R1's prompt takes no route instruction",
}
# A last egomotion rotation this far from the identity (max entry of |R - I|) is legal but suggests
# rows relative to the t0 position only, not to the full t0 pose.
LAST_ROTATION_WARNING = 1e-2


class InferRequest(BaseModel):
    """The request body (module docstring). Strict JSON types; no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    images: list[str] = Field(min_length=1, description="base64 images or data URLs, camera-major, oldest "
                                                        "frame first")
    mode: Literal["trajectory", "answer", "both"] = "trajectory"
    camera_order: list[str] | None = None
    num_frames_per_camera: int | None = Field(None, ge=1)
    egomotion: dict[str, Any] | list[Any] | None = Field(
        None, description="16 poses, t0 ego frame, oldest first: {ego_history_xyz, ego_history_rot} or rows "
                          "[x, y, z, qx, qy, qz, qw]")
    num_traj_samples: int | None = Field(None, ge=1, le=MAX_TRAJ_SAMPLES)
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    max_generation_length: int | None = Field(None, ge=1, le=MAX_GENERATION_LENGTH)
    question: str | None = None
    nav_text: str | None = None


class RequestError(ValueError):
    """A request the server cannot run: (location, message) pairs, the location a path into the
    body (`("egomotion", 3)`)."""

    def __init__(self, *errors: tuple[tuple, str]):
        self.errors = errors
        super().__init__("; ".join(f"{format_location(loc)}: {message}" for loc, message in errors))


def format_location(loc) -> str:
    """("egomotion", 3, "qw") -> "egomotion[3].qw"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


@dataclasses.dataclass(frozen=True)
class TrajectoryRequest:
    """A checked request: the clip, the run's settings and seed, and caveats for the response."""

    clip: Clip
    settings: InferenceConfig
    seed: int
    warnings: tuple[str, ...]


def parse_request(request: InferRequest, *, config: AlpamayoConfig, defaults: InferenceConfig,
                  default_seed: int) -> TrajectoryRequest:
    """The clip, settings and seed of `request`; raises `RequestError` naming every problem found
    before the images are decoded, else the first one."""
    unsupported = [((name,), f"{why} (a NIM field of its answer modes)")
                   for name, why in UNSUPPORTED.items() if getattr(request, name) is not None]
    if request.mode != "trajectory":
        unsupported.insert(0, (("mode",), (f"only mode 'trajectory' is served, got {request.mode!r} (Alpamayo-R1 "
                                          "answers no questions)")))
    if unsupported:
        raise RequestError(*unsupported)
    names, num_frames = _layout(request)
    if request.egomotion is None:
        raise RequestError((("egomotion",), f"required: {NUM_HISTORY} ego poses (trajectory mode)"))
    xyz, rot = _egomotion(request.egomotion)
    settings = request_settings(defaults, config, num_traj_samples=request.num_traj_samples,
                                temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                                max_generation_length=request.max_generation_length)
    cameras = []
    for c, name in enumerate(names):
        first = c * num_frames
        frames = [_decode(request.images[first + f], first + f) for f in range(num_frames)]
        sizes = sorted({frame.shape[:2] for frame in frames})  # (H, W)
        if len(sizes) > 1:
            raise RequestError((("images",), (f"images[{first}..{first + num_frames - 1}] ({name}): the frames of "
                                            f"one camera must have one size, got {sizes}")))
        cameras.append(frames)
    try:
        clip = Clip.create(cameras, xyz, rot, camera_names=names)
    except ClipError as error:
        message = str(error)
        field = ("egomotion",) if message.startswith("ego_history") else (
            ("images",) if message.startswith("camera_frames") else ())
        raise RequestError((field, message)) from None
    warnings = []
    deviation = float(np.abs(rot[-1] - np.eye(3)).max())
    if deviation > LAST_ROTATION_WARNING:
        warnings.append(f"egomotion[{NUM_HISTORY - 1}]: the t0 pose's rotation is not the identity (max |R - I| = "
                        f"{deviation:.3g}); rows should be relative to the full t0 pose")
    seed = default_seed if request.seed is None else request.seed
    return TrajectoryRequest(clip, settings, seed, tuple(warnings))


def request_settings(defaults: InferenceConfig, config: AlpamayoConfig, *, num_traj_samples=None,
                     temperature=None, top_p=None, top_k=None, max_generation_length=None) -> InferenceConfig:
    """The server's defaults with a request's values in their place; raises `RequestError`."""
    try:
        if temperature is None and top_p is None and top_k is None:  # keeps greedy defaults greedy
            return dataclasses.replace(
                defaults,
                num_samples=defaults.num_samples if num_traj_samples is None else num_traj_samples,
                max_new_tokens=defaults.max_new_tokens if max_generation_length is None else max_generation_length)
        sampling = defaults.sampling
        return InferenceConfig.from_model(
            config,
            num_samples=num_traj_samples or defaults.num_samples,
            temperature=sampling.temperature if temperature is None else temperature,
            top_p=(sampling.top_p if sampling.top_p is not None else 1.0) if top_p is None else top_p,
            top_k=(sampling.top_k or 0) if top_k is None else top_k,
            max_new_tokens=max_generation_length or defaults.max_new_tokens,
            num_flow_steps=defaults.num_flow_steps,
        )
    except ValueError as error:
        raise RequestError(((), str(error))) from None


def _layout(request: InferRequest) -> tuple[tuple[str, ...], int]:
    """The cameras (clip names, in image order) and frames per camera of the images."""
    count = len(request.images)
    expected_layout = (f"{len(CAMERA_NAMES)} cameras x {NUM_FRAMES} frames: {', '.join(CAMERA_NAMES)}, each "
                       "camera's frames oldest first")
    if request.camera_order is None:
        if request.num_frames_per_camera not in (None, NUM_FRAMES):
            raise RequestError((("num_frames_per_camera",), (f"this model takes {NUM_FRAMES} frames per camera, "
                                                            f"got {request.num_frames_per_camera}")))
        if count != len(CAMERA_NAMES) * NUM_FRAMES:
            raise RequestError((("images",), (f"expected {len(CAMERA_NAMES) * NUM_FRAMES} images ({expected_layout}) "
                                            f"without camera_order, got {count}; for another order, declare "
                                            "camera_order and num_frames_per_camera")))
        return CAMERA_NAMES, NUM_FRAMES
    errors = []
    names = []
    for index, name in enumerate(request.camera_order):
        try:
            names.append(model_camera_name(name))
        except ValueError as error:
            errors.append((("camera_order", index), str(error)))
    if errors:
        raise RequestError(*errors)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RequestError((("camera_order",), f"cameras named more than once: {repeated}"))
    missing = [n for n in CAMERA_NAMES if n not in names]
    if missing:
        raise RequestError((("camera_order",), (f"this model needs all of its cameras ({expected_layout}); "
                                               f"missing {missing}")))
    if request.num_frames_per_camera not in (None, NUM_FRAMES):
        raise RequestError((("num_frames_per_camera",), (f"this model takes {NUM_FRAMES} frames per camera "
                                                        f"(t0 - 0.3 s ... t0), got {request.num_frames_per_camera}")))
    if count != len(names) * NUM_FRAMES:
        raise RequestError((("images",), (f"camera_order names {len(names)} cameras x {NUM_FRAMES} frames = "
                                        f"{len(names) * NUM_FRAMES} images, got {count}")))
    return tuple(names), NUM_FRAMES


def _decode(text: str, index: int) -> np.ndarray:
    try:
        return decode_base64_image(text, name=f"images[{index}]")
    except ImageError as error:
        raise RequestError((("images", index), str(error).removeprefix(f"images[{index}]: "))) from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _egomotion(value: dict | list) -> tuple[np.ndarray, np.ndarray]:
    """(T, 3) float32 positions and (T, 3, 3) float32 rotations of the egomotion (either form)."""
    if isinstance(value, dict):
        return _nim_egomotion(value)
    rows = value
    if len(rows) != NUM_HISTORY:
        raise RequestError((("egomotion",), (f"expected {NUM_HISTORY} poses (t0 - 1.5 s ... t0, 0.1 s apart, oldest "
                                            f"first), got {len(rows)}")))
    values = np.empty((NUM_HISTORY, len(POSE_KEYS)), np.float64)
    row_format = (f"a list of {len(POSE_KEYS)} numbers [{', '.join(POSE_KEYS)}] or an object with exactly the "
                  f"keys {', '.join(POSE_KEYS)}")
    for index, row in enumerate(rows):
        if isinstance(row, dict):
            unknown = sorted(set(row) - set(POSE_KEYS))
            missing = [key for key in POSE_KEYS if key not in row]
            if unknown or missing:
                problem = f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}"
                raise RequestError((("egomotion", index), f"{problem}; expected {row_format}"))
            row = [row[key] for key in POSE_KEYS]
        elif not isinstance(row, list) or len(row) != len(POSE_KEYS):
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise RequestError((("egomotion", index), f"expected {row_format}, got {got}"))
        for key, value in zip(POSE_KEYS, row, strict=True):
            if not _number(value):
                raise RequestError((("egomotion", index, key), f"expected a number, got {type(value).__name__}"))
            if not math.isfinite(value):
                raise RequestError((("egomotion", index, key), f"expected a finite number, got {value}"))
        values[index] = row
    try:
        quaternions = check_unit_quaternions(values[:, 3:], name="egomotion")
    except ValueError as error:
        message = str(error)
        index = int(message.split("[", 1)[1].split("]", 1)[0])
        raise RequestError((("egomotion", index), message.split(": ", 1)[1])) from None
    return values[:, :3].astype(np.float32), quaternion_to_matrix(quaternions).astype(np.float32)


def _numbers(value, shape: tuple[int, ...], loc: tuple) -> np.ndarray | None:
    """`value` as a float64 array of `shape` if it is nested lists of finite JSON numbers of that
    shape; None if its shape differs; raises `RequestError` at the first non-number."""
    if not shape:
        if not _number(value):
            raise RequestError((loc, f"expected a number, got {type(value).__name__}"))
        if not math.isfinite(value):
            raise RequestError((loc, f"expected a finite number, got {value}"))
        return np.float64(value)
    if not isinstance(value, list) or len(value) != shape[0]:
        return None
    items = [_numbers(item, shape[1:], (*loc, index)) for index, item in enumerate(value)]
    return None if any(item is None for item in items) else np.asarray(items, np.float64)


def _nim_egomotion(value: dict) -> tuple[np.ndarray, np.ndarray]:
    """NIM's egomotion object: 16 positions, and 16 quaternions (w, x, y, z) or 3 x 3 matrices."""
    unknown = sorted(set(value) - set(NIM_EGOMOTION_KEYS))
    missing = [key for key in NIM_EGOMOTION_KEYS if key not in value]
    if unknown or missing:
        problem = f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}"
        raise RequestError((("egomotion",), f"{problem}; expected an object with exactly the keys "
                                            f"{', '.join(NIM_EGOMOTION_KEYS)}"))
    xyz = _numbers(value["ego_history_xyz"], (NUM_HISTORY, 3), ("egomotion", "ego_history_xyz"))
    if xyz is None:
        raise RequestError((("egomotion", "ego_history_xyz"), f"expected {NUM_HISTORY} positions [x, y, z] "
                                                              "(t0 - 1.5 s ... t0, oldest first)"))
    loc = ("egomotion", "ego_history_rot")
    quaternions = _numbers(value["ego_history_rot"], (NUM_HISTORY, 4), loc)
    if quaternions is not None:
        norms = np.linalg.norm(quaternions, axis=1)
        bad = np.abs(norms - 1.0) > QUATERNION_TOLERANCE
        if bad.any():
            first = int(np.argmax(bad))
            raise RequestError(((*loc, first), f"[w, x, y, z] must be a unit quaternion (|q| = 1 within "
                                               f"{QUATERNION_TOLERANCE}), got |q| = {norms[first]:.6g}"))
        xyzw = quaternions[:, [1, 2, 3, 0]] / norms[:, None]
        return xyz.astype(np.float32), quaternion_to_matrix(xyzw).astype(np.float32)
    matrices = _numbers(value["ego_history_rot"], (NUM_HISTORY, 3, 3), loc)
    if matrices is None:
        raise RequestError((loc, f"expected {NUM_HISTORY} quaternions [w, x, y, z] or {NUM_HISTORY} 3 x 3 rotation "
                                 "matrices"))
    return xyz.astype(np.float32), matrices.astype(np.float32)  # checked as rotations by Clip.create


def response_body(samples: TrajectorySamples, *, model: str, seed: int, settings: InferenceConfig,
                  warnings: tuple[str, ...] = (), timings: dict | None = None) -> dict:
    """The JSON body answering one request (clip 0 of `samples`)."""
    return {
        "id": f"infer-{uuid.uuid4().hex}",
        "object": "alpamayo.trajectory",
        "created": int(time.time()),
        "model": model,
        "mode": "trajectory",
        "num_traj_samples": int(samples.xyz.shape[1]),
        "trajectories": samples.xyz[0].tolist(),
        "rotations": samples.rotation[0].tolist(),
        "reasoning": list(samples.cot[0]),
        "actions": samples.actions[0].tolist(),
        "generated_token_ids": samples.generated_token_ids[0],
        "num_generated_tokens": samples.num_generated_tokens[0].tolist(),
        "seed": seed,
        "settings": settings.to_json(),
        "timings": timings if timings is not None else samples.timings,
        "warnings": list(warnings),
    }
