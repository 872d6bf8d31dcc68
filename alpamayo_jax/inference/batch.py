"""Many clips to one result file each: the pipeline in batches of clips, data parallel on a mesh.

    clips (a directory of .npz, or a text file listing them) -> batches of B clips
        -> `sample_trajectories` -> <out_dir>/<clip name>.json (+ .png)

A batch holds `batch_size` clips (default: the mesh's data axis size, else 1) of equal image sizes;
a short batch is filled up with copies of its last clip, whose results are dropped, so every batch
compiles to the same program. A clip that cannot be read is reported and skipped; the others run.
Existing result files are kept (a rerun resumes) unless `overwrite`. Batch k samples with
`fold_in(key, k)`, so sampled results depend on which clips share a batch (each result file names
its batch: number, clips, size); greedy ones do not (up to float rounding).
Under `jax.distributed`, every process runs every batch and process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import Pipeline, TrajectorySamples, sample_trajectories
from alpamayo_jax.plot import plot_trajectories
from alpamayo_jax.io.atomic import write_atomically
from alpamayo_jax.processing.clip import Clip, ClipError
from alpamayo_jax.processing.clip_file import load_clip


@dataclasses.dataclass
class BatchSummary:
    written: list[Path] = dataclasses.field(default_factory=list)  # result files written
    skipped: list[Path] = dataclasses.field(default_factory=list)  # clips whose result existed
    failed: dict[Path, str] = dataclasses.field(default_factory=dict)  # clip -> why it was not run (names it)


def clip_paths(source: str | os.PathLike) -> list[Path]:
    """The clips of a directory (its `*.npz`, sorted) or of a text file listing one path per
    line (relative to the list's directory; blank lines and `#` comments ignored). Raises if a
    listed clip is missing, none are found, or two clips share a file name (their results would)."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(source.glob("*.npz"))
    elif source.is_file():
        lines = [line.split("#", 1)[0].strip() for line in source.read_text().splitlines()]
        paths = [source.parent / line for line in lines if line]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{source} lists clips that do not exist: {missing}")
    else:
        raise FileNotFoundError(f"no clip directory or clip list at {source}")
    if not paths:
        raise FileNotFoundError(f"{source} holds no clips (.npz)")
    stems = [p.stem for p in paths]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise ValueError(f"{source}: several clips named {repeated}; result files are named after clips")
    return paths


def result_record(samples: TrajectorySamples, clip: int, *, settings: InferenceConfig, **provenance) -> dict:
    """The JSON-ready result of clip `clip` of a run: per sample xyz (W, 3), rotation (W, 3, 3),
    actions (W, 2), generated token ids and their own count (padding excluded), Chain-of-Causation
    text; the run's timings and settings, and `provenance` (model, seed, batch, ...) as given."""
    return {
        "xyz": samples.xyz[clip].tolist(),
        "rotation": samples.rotation[clip].tolist(),
        "actions": samples.actions[clip].tolist(),
        "generated_token_ids": samples.generated_token_ids[clip],
        "num_generated_tokens": samples.num_generated_tokens[clip].tolist(),
        "cot": samples.cot[clip],
        "timings": samples.timings,
        "settings": settings.to_json(),
        **provenance,
    }


def write_result(path: str | os.PathLike, record: dict) -> None:
    """Writes a result record as JSON, atomically."""
    write_atomically(path, lambda file: file.write((json.dumps(record) + "\n").encode()))


def _image_sizes(clip: Clip) -> tuple:
    return tuple(tuple(camera.shape) for camera in clip.camera_frames)


def run_clips(
    pipeline: Pipeline,
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    key: jax.Array,
    settings: InferenceConfig | None = None,
    *,
    batch_size: int | None = None,
    overwrite: bool = False,
    plots: bool = False,
    on_clip: Callable[[Path, str], None] | None = None,
    provenance: dict | None = None,
) -> BatchSummary:
    """Runs every clip in `paths` and writes `out_dir/<clip name>.json` (and `.png` with `plots`).

    `settings` default to the checkpoint's (`InferenceConfig.from_model`); the flow noise is drawn
    per batch from `key`. `provenance` (e.g. model and seed) is recorded in every result file.
    `on_clip(path, status)` is called once per clip with status "written", "skipped" or "failed".
    Returns what happened to each clip."""
    settings = InferenceConfig.from_model(pipeline.config) if settings is None else settings
    data = 1 if pipeline.mesh is None else pipeline.mesh.shape["data"]
    batch_size = data if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = jax.process_index() == 0
    summary = BatchSummary()
    pending = []
    for path in map(Path, paths):
        if not overwrite and (out_dir / f"{path.stem}.json").is_file():
            summary.skipped.append(path)
            if on_clip:
                on_clip(path, "skipped")
        else:
            pending.append(path)

    batch_number = 0
    for start in range(0, len(pending), batch_size):
        loaded: dict[tuple, list[tuple[Path, Clip]]] = {}  # image sizes -> clips
        for path in pending[start:start + batch_size]:
            try:
                clip = load_clip(path)
            except (ClipError, OSError) as error:
                message = str(error)  # clip errors name their file; say which file once
                summary.failed[path] = message if str(path) in message else f"{path}: {message}"
                if on_clip:
                    on_clip(path, "failed")
                continue
            loaded.setdefault(_image_sizes(clip), []).append((path, clip))
        for group in loaded.values():
            clips = [clip for _, clip in group]
            clips += [clips[-1]] * (batch_size - len(clips))  # fill-up copies, results dropped
            samples = sample_trajectories(pipeline, clips, jax.random.fold_in(key, batch_number), settings)
            # What a sampled result depends on, so that it can be reproduced.
            batch = {"number": batch_number, "clips": [path.stem for path, _ in group], "size": batch_size}
            batch_number += 1
            for index, (path, clip) in enumerate(group):
                result = out_dir / f"{path.stem}.json"
                if writer:
                    write_result(result, result_record(samples, index, settings=settings, **(provenance or {}),
                                                       batch=batch))
                    if plots:
                        plot_trajectories(result.with_suffix(".png"), clip.ego_history_xyz, samples.xyz[index],
                                          title=path.stem)
                summary.written.append(result)
                if on_clip:
                    on_clip(path, "written")
    return summary
