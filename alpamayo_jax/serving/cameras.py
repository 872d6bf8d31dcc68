"""The model's cameras as clients name them, and `--camera-map` (pure Python).

The model sees four cameras, in the reference's camera-index order (`processing.clip.CAMERA_NAMES`).
AlpaSim and NIM name them with a `camera_` prefix (`camera_front_wide_120fov`); NIM also accepts
short names without the field of view (`front_wide`). `model_camera_name` accepts all three
spellings and returns the clip's name (`front_wide_120fov`).

An AlpaSim session declares its cameras by logical id. By default the model's cameras must be
among them, under their AlpaSim ids. `CameraMap` names the session camera that stands in for a
model camera instead: `MODEL=SESSION`, MODEL in any spelling above or `*` for every model camera
not named otherwise; one session camera may feed several model cameras (a single-camera test rig,
say).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from alpamayo_jax.processing.clip import CAMERA_NAMES

ID_PREFIX = "camera_"
# AlpaSim / NIM ids of the model's cameras, in the model's order.
MODEL_CAMERA_IDS = tuple(ID_PREFIX + name for name in CAMERA_NAMES)
# NIM's short names: the id without prefix and field of view.
SHORT_NAMES = {name.rsplit("_", 1)[0]: name for name in CAMERA_NAMES}
ANY_CAMERA = "*"


def model_camera_name(name: str) -> str:
    """The clip camera name (`CAMERA_NAMES`) that `name` spells: `camera_front_wide_120fov`,
    `front_wide_120fov` or `front_wide`. Raises ValueError for any other name."""
    bare = name.removeprefix(ID_PREFIX)
    if bare in CAMERA_NAMES:
        return bare
    if bare in SHORT_NAMES:
        return SHORT_NAMES[bare]
    raise ValueError(f"{name!r} is not one of the model's cameras: {', '.join(MODEL_CAMERA_IDS)} "
                     f"(or short: {', '.join(SHORT_NAMES)})")


def model_camera_id(name: str) -> str:
    """`model_camera_name(name)` as an AlpaSim id (`camera_` prefix)."""
    return ID_PREFIX + model_camera_name(name)


@dataclasses.dataclass(frozen=True)
class CameraMap:
    """Which session camera feeds each model camera (see the module docstring). `sources` maps
    model camera ids (or `ANY_CAMERA`) to session camera ids."""

    sources: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, items: Sequence[str] | None) -> CameraMap:
        """From `MODEL=SESSION` strings (`--camera-map`, repeatable; also comma-separated).
        Raises ValueError naming the bad item."""
        sources: dict[str, str] = {}
        for item in items or ():
            for part in item.split(","):
                model, sep, session = (s.strip() for s in part.partition("="))
                if not sep or not model or not session:
                    raise ValueError(f"--camera-map {part!r}: expected MODEL_CAMERA=SESSION_CAMERA, e.g. "
                                     f"camera_front_wide_120fov=camera_front, or '*=camera_front' for all")
                try:
                    key = model if model == ANY_CAMERA else model_camera_id(model)
                except ValueError as error:
                    raise ValueError(f"--camera-map {part!r}: {error}") from None
                if key in sources and sources[key] != session:
                    raise ValueError(f"--camera-map maps {key} twice ({sources[key]} and {session})")
                sources[key] = session
        return cls(tuple(sources.items()))

    def source(self, model_id: str) -> str:
        """The session camera id that feeds model camera `model_id`."""
        sources = dict(self.sources)
        return sources.get(model_id, sources.get(ANY_CAMERA, model_id))

    def resolve(self, declared: Iterable[str]) -> tuple[str, ...]:
        """The session camera of each model camera (model order), given the ids a session
        declared. Raises ValueError naming the missing cameras and the way to map them."""
        declared = sorted(declared)
        sources = tuple(self.source(model_id) for model_id in MODEL_CAMERA_IDS)
        missing = [f"{model_id}" + ("" if source == model_id else f" (mapped to {source})")
                   for model_id, source in zip(MODEL_CAMERA_IDS, sources, strict=True) if source not in declared]
        if missing:
            raise ValueError(
                f"the session declares cameras {declared}, but the model needs {', '.join(missing)}; "
                "serve with --camera-map MODEL_CAMERA=SESSION_CAMERA (repeatable, or '*=SESSION_CAMERA' for "
                "every model camera) to feed the model from other cameras")
        return sources

    def describe(self) -> str:
        if not self.sources:
            return "the session's cameras of the same ids"
        return ", ".join(f"{model}={session}" for model, session in self.sources)
