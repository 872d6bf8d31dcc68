"""Many clips to one result file each: the pipeline in batches of clips, data parallel on a mesh.

    clips (a directory of .npz, or a text file listing them) -> batches of B clips
        -> `sample_trajectories` -> <out_dir>/<clip name>.json (+ .png)

A batch holds `batch_size` clips (default: the mesh's data axis size, else 1) of equal image sizes;
a short batch is filled up with copies of its last clip, whose results are dropped, so every batch
compiles to the same program. A clip that cannot be read is reported and skipped; the others run.
Existing result files are kept (a rerun resumes) unless `overwrite`. Batch k samples with
`fold_in(key, k)`, so sampled results depend on which clips share a batch (each result file names
its batch: number, clips, size); greedy ones do not (up to float rounding). With
`reseed_per_clip`, every clip samples from `key` itself instead (one key per clip,
`sample_from_inputs`): a clip's result is then the same whatever its batch, as when the seed is
re-set before each clip.

Clips come as `.npz` paths or from any `alpamayo_jax.data.iterator.Source` (e.g. a PhysicalAI-AV
dataset), whose `stem(i)` names the result files.
Under `jax.distributed`, every process runs every batch and process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import Pipeline, TrajectorySamples, sample_trajectories
from alpamayo_jax.io.atomic import write_atomically
from alpamayo_jax.processing.clip import Clip, ClipError
from alpamayo_jax.processing.clip_file import load_clip


@dataclasses.dataclass
class BatchSummary:
    """What happened to each clip; clips are named as given (a path, or a source's stem)."""

    written: list[Path] = dataclasses.field(default_factory=list)  # result files written
    skipped: list[Path | str] = dataclasses.field(default_factory=list)  # clips whose result existed
    failed: dict[Path | str, str] = dataclasses.field(default_factory=dict)  # clip -> why it was not run


@dataclasses.dataclass(frozen=True)
class _Item:
    label: Path | str  # how the summary and `on_clip` name the clip
    stem: str  # result file name
    load: Callable[[], Clip]


def _items(clips) -> list[_Item]:
    if hasattr(clips, "load") and hasattr(clips, "stem"):  # a data source
        return [_Item(clips.stem(i), clips.stem(i), functools.partial(clips.load, i)) for i in range(len(clips))]
    return [_Item(Path(p), Path(p).stem, functools.partial(load_clip, Path(p))) for p in clips]


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
    clips,  # Sequence of .npz paths, or an `alpamayo_jax.data.iterator.Source`
    out_dir: str | os.PathLike,
    key: jax.Array,
    settings: InferenceConfig | None = None,
    *,
    batch_size: int | None = None,
    overwrite: bool = False,
    plots: bool = False,
    reseed_per_clip: bool = False,
    on_clip: Callable[[Path | str, str], None] | None = None,
    provenance: dict | None = None,
) -> BatchSummary:
    """Runs every clip and writes `out_dir/<clip name>.json` (with `plots`, also the bird's-eye
    view `<clip name>.png` and the input frames `<clip name>.cameras.png`).

    `settings` default to the checkpoint's (`InferenceConfig.from_model`); the flow noise is drawn
    per batch from `key` (per clip with `reseed_per_clip`). `provenance` (e.g. model and seed) is
    recorded in every result file. `on_clip(clip, status)` is called once per clip with status
    "written", "skipped" or "failed". A clip that cannot be loaded (`ClipError`, `OSError`, or
    another `ValueError` of its reader) is reported, never dropped silently. Returns what
    happened to each clip."""
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
    for item in _items(clips):
        if not overwrite and (out_dir / f"{item.stem}.json").is_file():
            summary.skipped.append(item.label)
            if on_clip:
                on_clip(item.label, "skipped")
        else:
            pending.append(item)

    batch_number = 0
    for start in range(0, len(pending), batch_size):
        loaded: dict[tuple, list[tuple[_Item, Clip]]] = {}  # image sizes -> clips
        for item in pending[start:start + batch_size]:
            try:
                clip = item.load()
            except (ClipError, OSError, ValueError) as error:
                message = str(error)  # clip errors name their file; say which clip once
                summary.failed[item.label] = message if str(item.label) in message else f"{item.label}: {message}"
                if on_clip:
                    on_clip(item.label, "failed")
                continue
            loaded.setdefault(_image_sizes(clip), []).append((item, clip))
        for group in loaded.values():
            clips_in_batch = [clip for _, clip in group]
            clips_in_batch += [clips_in_batch[-1]] * (batch_size - len(clips_in_batch))  # fill-up, dropped
            batch_key = (jnp.stack([key] * batch_size) if reseed_per_clip
                         else jax.random.fold_in(key, batch_number))
            samples = sample_trajectories(pipeline, clips_in_batch, batch_key, settings)
            # What a sampled result depends on, so that it can be reproduced.
            batch = {"number": batch_number, "clips": [item.stem for item, _ in group], "size": batch_size,
                     "key": "the run's key for every clip" if reseed_per_clip else "fold_in(key, number)"}
            batch_number += 1
            for index, (item, clip) in enumerate(group):
                result = out_dir / f"{item.stem}.json"
                if writer:
                    write_result(result, result_record(samples, index, settings=settings, **(provenance or {}),
                                                       batch=batch))
                    if plots:
                        from alpamayo_jax.evaluation.plots import plot_bird_eye_view, plot_camera_mosaic, save_figure

                        figure = plot_bird_eye_view(clip.ego_history_xyz, samples.xyz[index],
                                                    ground_truth_xyz=clip.ego_future_xyz, title=item.stem)
                        save_figure(figure, result.with_suffix(".png"))
                        save_figure(plot_camera_mosaic(clip, title=item.stem), out_dir / f"{item.stem}.cameras.png")
                summary.written.append(result)
                if on_clip:
                    on_clip(item.label, "written")
    return summary
