"""Synthetic driving scenes with matching ego motion and a one-sentence Chain-of-Causation, for
training the embedded demo model (numpy only).

Five kinds of scene, each a road seen by the four cameras over the four frames and an ego drive
that does what the scene asks, explained by a short sentence:

    cruise        a straight, empty road; constant speed
    lead_braking  a car ahead with its brake lights on, the gap closing; the ego brakes
    stop_line     a stop line across the road ahead; the ego brakes to stop at it
    curve_left    the road bends left; the ego follows it
    curve_right   the road bends right; the ego follows it

`driving_scene(kind, seed)` gives one training `Clip`: frames, history, the ground-truth future
and the explanation as its Chain-of-Causation (`clip.cot`); `driving_scenes(num_clips, seed)` a
balanced, shuffled set. The pictures are ray cast onto the
ground plane from each camera (`CAMERA_VIEWS`: yaw and field of view, 1.6 m above the road): lane
markings (dashed between lanes, solid at the edges), grass beyond the road, a stop line, and the
lead car as a box with a rear window and brake lights. Everything is in the t0 ego frame
(x forward, y left); the ego drives along the centre of its lane.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from alpamayo_jax.data.synthetic_dataset import CAMERA_HEIGHT, CAMERA_VIEWS
from alpamayo_jax.processing.clip import CAMERA_NAMES, FRAME_TIMESTAMPS, HISTORY_DT, Clip
from alpamayo_jax.processing.synthetic import arc_poses

EXPLANATIONS = {
    "cruise": "Keep the lane at a steady speed: the road ahead is clear.",
    "lead_braking": "Slow down: the vehicle ahead is braking.",
    "stop_line": "Stop: there is a stop line ahead.",
    "curve_left": "Follow the road as it curves to the left.",
    "curve_right": "Follow the road as it curves to the right.",
}
KINDS = tuple(EXPLANATIONS)

LANE_WIDTH = 3.5  # metres; the ego lane is centred on the drive, one more lane on each side
ROAD_HALF_WIDTH = 1.5 * LANE_WIDTH
CAR_HALF_WIDTH, CAR_HEIGHT = 0.9, 1.5
SUPERSAMPLING = 3  # rays per pixel along each axis, averaged


@dataclasses.dataclass(frozen=True)
class Scene:
    """What the pictures and the drive are made of."""

    kind: str
    speed: float  # m/s at t0 and before
    curvature: float  # 1/m of the road (and of the drive), > 0 to the left
    deceleration: float  # m/s^2 from t0 on (0: none)
    stop_at: float | None  # metres from t0: where the drive stops (stop line), or None
    lead_gap: float | None  # metres from the ego at t0 to the lead car's rear, or None
    lead_deceleration: float  # m/s^2, the lead car's braking (from 1 s before t0)


def _scene(kind: str, rng: np.random.Generator) -> Scene:
    speed = rng.uniform(7.0, 13.0)
    if kind == "cruise":
        return Scene(kind, speed, 0.0, 0.0, None, None, 0.0)
    if kind == "lead_braking":
        return Scene(kind, speed, 0.0, rng.uniform(2.5, 3.5), None, rng.uniform(10.0, 16.0), 4.0)
    if kind == "stop_line":
        distance = speed * rng.uniform(1.6, 2.6)  # braking ends within the 6.4 s horizon
        return Scene(kind, speed, 0.0, speed**2 / (2 * distance), distance, None, 0.0)
    if kind in ("curve_left", "curve_right"):
        curvature = rng.uniform(0.02, 0.04) * (1 if kind == "curve_left" else -1)
        return Scene(kind, speed, curvature, 0.0, None, None, 0.0)
    raise AssertionError(kind)


def _distance(scene: Scene, t: np.ndarray) -> np.ndarray:
    """Signed distance driven from t0 at times t (s): constant speed before t0, then braking at
    `deceleration` down to a floor (a standstill at the stop line, walking pace behind a car)."""
    t = np.asarray(t, np.float64)
    if scene.deceleration == 0:
        return scene.speed * t
    floor = 0.0 if scene.stop_at is not None else 2.0
    braking = (scene.speed - floor) / scene.deceleration  # seconds until the floor speed
    during = np.minimum(np.maximum(t, 0.0), braking)
    distance = scene.speed * during - scene.deceleration * during**2 / 2 + floor * np.maximum(t - braking, 0.0)
    return np.where(t < 0, scene.speed * t, distance)


def _lead_position(scene: Scene, t: np.ndarray) -> np.ndarray:
    """x of the lead car's rear (t0 frame) at times t <= 0: it brakes from t = -1 s."""
    braking = np.clip(np.asarray(t, np.float64) + 1.0, 0.0, None)  # seconds of braking so far
    return scene.lead_gap + scene.speed * t - scene.lead_deceleration * braking**2 / 2 + scene.lead_deceleration / 2


def _road(scene: Scene, gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lateral offset from the lane centre, > 0 left; distance along the road) of ground points."""
    if scene.curvature == 0:
        return gy, gx
    radius = 1.0 / scene.curvature
    distance = np.hypot(gx, gy - radius)
    angle = np.arctan2(gx, np.sign(radius) * (radius - gy))
    return np.sign(radius) * (abs(radius) - distance), abs(radius) * angle


def _render(scene: Scene, camera: str, t: float, pose: tuple[float, float, float], height: int, width: int
            ) -> np.ndarray:
    """(3, H, W) uint8: the view of `camera` from the ego at `pose` (x, y, yaw) at time t."""
    yaw_deg, fov_deg = CAMERA_VIEWS[camera]
    rows, cols = height * SUPERSAMPLING, width * SUPERSAMPLING
    focal = (cols / 2) / np.tan(np.radians(fov_deg) / 2)
    right = ((np.arange(cols) + 0.5 - cols / 2) / focal)[None, :]
    up = (-(np.arange(rows) + 0.5 - rows / 2) / focal)[:, None]
    x0, y0, ego_yaw = pose
    heading = ego_yaw + np.radians(yaw_deg) - np.arctan(right)  # (1, W) ground direction of each column
    stretch = np.sqrt(1 + right**2)  # horizontal distance per unit of camera depth
    ground = up < 0
    reach = np.where(ground, CAMERA_HEIGHT * stretch / np.where(ground, -up, 1.0), np.inf)  # (H, W)
    gx, gy = x0 + reach * np.cos(heading), y0 + reach * np.sin(heading)
    offset, along = _road(scene, np.where(ground, gx, 0.0), np.where(ground, gy, 0.0))

    image = np.empty((rows, cols, 3))
    image[:] = np.array([125.0, 165.0, 225.0]) + 40.0 * np.clip(up, 0, 1)[..., None] * np.array([-1.0, -0.5, 0.2])
    on_road = ground & (np.abs(offset) < ROAD_HALF_WIDTH + 0.3)
    image[ground & ~on_road] = (70.0, 115.0, 60.0)
    image[on_road] = (85.0, 85.0, 90.0)
    line = 0.12
    edges = np.abs(np.abs(offset) - ROAD_HALF_WIDTH) < line
    dashes = (np.abs(np.abs(offset) - LANE_WIDTH / 2) < line) & (np.mod(along, 6.0) < 3.0)
    markings = ground & (edges | dashes)
    if scene.stop_at is not None:
        markings |= ground & (np.abs(along - scene.stop_at - 0.6) < 0.6) & (np.abs(offset) < ROAD_HALF_WIDTH)
    image[markings] = (235.0, 235.0, 230.0)

    if scene.lead_gap is not None:  # the rear face of the lead car, a plane across the straight road
        lead_x = float(_lead_position(scene, np.array(t)))
        forward = np.cos(heading)
        hit = np.where(forward > 1e-6, (lead_x - x0) / np.where(forward > 1e-6, forward, 1.0), np.inf)  # (1, W)
        hit_y = y0 + hit * np.sin(heading)
        hit_z = CAMERA_HEIGHT + up * hit / stretch
        car = (hit < reach) & (np.abs(hit_y) < CAR_HALF_WIDTH) & (hit_z > 0) & (hit_z < CAR_HEIGHT)
        image[car] = (150.0, 25.0, 25.0)
        image[car & (hit_z > 1.05)] = (45.0, 45.0, 60.0)  # rear window
        lights = car & (hit_z > 0.75) & (hit_z < 0.95) & (np.abs(hit_y) > CAR_HALF_WIDTH - 0.35)
        image[lights] = (255.0, 70.0, 50.0)  # brake lights: on

    haze = np.exp(-np.where(ground, reach, 80.0) / 60.0)[..., None]
    image = haze * image + (1 - haze) * np.array([175.0, 180.0, 190.0])
    image = image.reshape(height, SUPERSAMPLING, width, SUPERSAMPLING, 3).mean(axis=(1, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def driving_scene(kind: str, seed: int, *, image_size: tuple[int, int] = (48, 64)) -> Clip:
    """One scene of `kind` (`KINDS`), drawn from `seed`: 4 cameras x 4 frames of `image_size`,
    the 16-pose history, the 64-pose ground-truth future and the explanation (`cot`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")
    scene = _scene(kind, np.random.default_rng([seed, KINDS.index(kind)]))
    history_t = np.arange(-15, 1) * HISTORY_DT
    future_t = np.arange(1, 65) * HISTORY_DT
    history_xyz, history_rot = arc_poses(_distance(scene, history_t), scene.curvature)
    future_xyz, future_rot = arc_poses(_distance(scene, future_t), scene.curvature)
    frame_xyz, frame_rot = arc_poses(_distance(scene, FRAME_TIMESTAMPS), scene.curvature)
    height, width = image_size
    frames = np.empty((len(CAMERA_NAMES), len(FRAME_TIMESTAMPS), 3, height, width), np.uint8)
    for f, t in enumerate(FRAME_TIMESTAMPS):
        pose = (float(frame_xyz[f, 0]), float(frame_xyz[f, 1]), float(np.arctan2(frame_rot[f, 1, 0], frame_rot[f, 0, 0])))
        for c, camera in enumerate(CAMERA_NAMES):
            frames[c, f] = _render(scene, camera, float(t), pose, height, width)
    return Clip.create(frames, history_xyz, history_rot, timestamps=FRAME_TIMESTAMPS, camera_names=CAMERA_NAMES,
                       ego_future_xyz=future_xyz, ego_future_rot=future_rot, cot=EXPLANATIONS[kind])


def driving_scenes(num_clips: int, seed: int, *, image_size: tuple[int, int] = (48, 64)
                   ) -> list[tuple[str, Clip, str]]:
    """`num_clips` scenes, the kinds in turn (balanced), in a seeded shuffled order:
    (name, clip, explanation), names `<kind>_<number>`."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    order = np.random.default_rng(seed).permutation(num_clips)
    scenes = []
    for number in order.tolist():
        kind = KINDS[number % len(KINDS)]
        scenes.append((f"{kind}_{number:04d}", driving_scene(kind, seed * 100_003 + number, image_size=image_size)))
    return scenes
