"""Open-loop evaluation: results for every clip of a dataset, then the reference's metrics.

    data (a PhysicalAI-AV root or a directory of .npz clips) -> `open_source`
        -> `run_clips` where a clip has no result yet      (resumable; seed re-set per clip)
        -> <out_dir>/<clip name>.json                       (as `alpamayo-jax batch` writes them)
        -> `score_results`: `trajectory_metrics` against each clip's ground truth
        -> <out_dir>/metrics.json, metrics.csv, summary.png

A clip's name is its file's stem, or `<clip id>@<t0 in microseconds>` for a dataset sample.
Inference re-sets the seed for every clip, as the reference's evaluation does per clip: each clip
samples from the same key, whatever its batch, so results do not depend on the batch size or the
mesh (greedy results are equal across meshes to float rounding). Only `xyz` (samples, W, 3) and
`rotation` (samples, W, 3, 3) of a result are read when scoring, so results written elsewhere can
be scored too (`score_only`). A clip that cannot be read, run or scored is reported in
`failed` with the reason and counted, never dropped silently.

`metrics.json`:

    {"clips": {"<name>": {"min_ade": ..., "min_ade/by_t=0.5": ..., "ade": ..., "corner_distance": ...,
                          "fde": ..., ...}},
     "mean": {<metric>: mean over the scored clips}, "num_clips": scored, "num_failed": failed,
     "failed": {"<name>": "why"}, "settings": {...}}

`metrics.csv` has one row per scored clip (`clip`, then the metrics) and a last row `mean`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from alpamayo_jax.data.iterator import ClipFileSource, DatasetSource, Source
from alpamayo_jax.data.physical_ai_av import is_dataset_root
from alpamayo_jax.evaluation.metrics import best_sample_errors, trajectory_metrics
from alpamayo_jax.io.atomic import write_atomically
from alpamayo_jax.processing.clip import Clip

METRICS_FILE = "metrics.json"
METRICS_CSV = "metrics.csv"
SUMMARY_PLOT = "summary.png"


def open_source(data: str | os.PathLike, clips: Sequence[str] | None = None, *, t0="keyframe") -> Source:
    """The samples to evaluate: a PhysicalAI-AV root (its clips at `t0`: "keyframe" (5.1 s),
    "first_event", "all_events" or microseconds) or a directory of `.npz` clips. `clips` picks
    some by name: clip file stems, or dataset clip ids (optionally `<clip id>@<t0 us>`). Unknown
    names raise."""
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no dataset root or clip directory there")
    if is_dataset_root(data):
        if clips is None:
            return DatasetSource(data, t0=t0)
        ids = list(dict.fromkeys(name.split("@", 1)[0] for name in clips))
        source = DatasetSource(data, clip_ids=ids, t0=t0)
        wanted = [name for name in clips if "@" in name]
        if wanted:  # particular (clip, t0) samples
            stems = [source.stem(i) for i in range(len(source))]
            missing = sorted(set(wanted) - set(stems))
            if missing:
                raise ValueError(f"{data}: no samples {missing} at t0={t0!r}")
            keep = set(wanted) | {name for name in clips if "@" not in name}
            source.samples = [s for s, stem in zip(source.samples, stems, strict=True)
                              if stem in keep or stem.split("@", 1)[0] in keep]
        return source
    source = ClipFileSource(data)
    if clips is not None:
        by_stem = {path.stem: path for path in source.paths}
        missing = [name for name in clips if name not in by_stem]
        if missing:
            raise ValueError(f"{data} holds no clips named {missing}")
        source = ClipFileSource([by_stem[name] for name in clips])
    return source


def read_clip_list(value: str) -> list[str]:
    """`--clips`: a text file with one name per line (blank lines and `#` comments ignored), or
    names separated by commas."""
    path = Path(value)
    if path.is_file():
        names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    else:
        names = [name.strip() for name in value.split(",")]
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"--clips {value}: no clip names")
    return names


@dataclasses.dataclass
class Scores:
    clips: dict[str, dict[str, float]]  # name -> metric -> value
    failed: dict[str, str]  # name -> why it was not scored
    best_errors: dict[str, np.ndarray]  # name -> (W,) XY error of its best sample over the horizon

    @property
    def mean(self) -> dict[str, float]:
        if not self.clips:
            return {}
        keys = next(iter(self.clips.values())).keys()
        return {key: float(np.mean([values[key] for values in self.clips.values()])) for key in keys}


def _read_result(path: Path, waypoints: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        record = json.loads(path.read_text())
        xyz = np.asarray(record["xyz"], np.float32)
        rotation = np.asarray(record["rotation"], np.float32)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"result {path} is unreadable ({type(error).__name__}: {error})") from None
    if xyz.ndim != 3 or xyz.shape[1:] != (waypoints, 3) or xyz.shape[0] < 1:
        raise ValueError(f"result {path}: xyz must be (samples, {waypoints}, 3), got {xyz.shape}")
    if rotation.shape != (*xyz.shape[:2], 3, 3):
        raise ValueError(f"result {path}: rotation must be {(*xyz.shape[:2], 3, 3)}, got {rotation.shape}")
    if not (np.isfinite(xyz).all() and np.isfinite(rotation).all()):
        raise ValueError(f"result {path} holds non-finite values")
    return xyz, rotation


def score_results(source: Source, out_dir: str | os.PathLike, *, skip: Sequence[str] = (),
                  on_clip: Callable[[str, dict | None], None] | None = None) -> Scores:
    """Scores `out_dir/<name>.json` of every sample of `source` (but those in `skip`, already
    failed) against its ground truth. `on_clip(name, metrics or None)` after each clip."""
    out_dir = Path(out_dir)
    scores = Scores({}, {}, {})
    for index in range(len(source)):
        name = source.stem(index)
        if name in skip:
            continue
        try:
            clip: Clip = source.load(index)
            if not clip.has_ground_truth:
                raise ValueError(f"{source.name(index)} has no ground-truth future to score against")
            xyz, rotation = _read_result(out_dir / f"{name}.json", clip.ego_future_xyz.shape[0])
            values = trajectory_metrics(xyz[None], rotation[None], clip.ego_future_xyz[None],
                                        clip.ego_future_rot[None])
        except (OSError, ValueError) as error:
            message = str(error)
            scores.failed[name] = message if name in message else f"{name}: {message}"
            if on_clip:
                on_clip(name, None)
            continue
        scores.clips[name] = {key: float(value[0]) for key, value in values.items() if key != "sample_ade"}
        scores.best_errors[name] = np.asarray(best_sample_errors(xyz[None, None], clip.ego_future_xyz[None]))[0, 0]
        if on_clip:
            on_clip(name, scores.clips[name])
    return scores


def write_scores(out_dir: str | os.PathLike, scores: Scores, settings: dict, *, failed: dict[str, str]) -> dict:
    """metrics.json, metrics.csv and summary.png in `out_dir`; returns the metrics.json content.
    `failed` (clips that could not be run) is merged with the clips that could not be scored."""
    from alpamayo_jax.evaluation.plots import plot_summary, save_figure

    out_dir = Path(out_dir)
    all_failed = {**failed, **scores.failed}
    report = {"clips": scores.clips, "mean": scores.mean, "num_clips": len(scores.clips),
              "num_failed": len(all_failed), "failed": all_failed, "settings": settings}
    write_atomically(out_dir / METRICS_FILE,
                     lambda file: file.write((json.dumps(report, indent=2, allow_nan=False) + "\n").encode()))
    keys = list(scores.mean)
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["clip", *keys])
    for name, values in scores.clips.items():
        writer.writerow([name, *(repr(values[key]) for key in keys)])
    if scores.clips:
        writer.writerow(["mean", *(repr(scores.mean[key]) for key in keys)])
    write_atomically(out_dir / METRICS_CSV, lambda file: file.write(table.getvalue().encode()))
    if scores.clips:
        names = list(scores.clips)
        figure = plot_summary(np.array([scores.clips[n]["min_ade"] for n in names]),
                              np.stack([scores.best_errors[n] for n in names]),
                              title=f"{len(names)} clips, mean minADE {scores.mean['min_ade']:.3f} m")
        save_figure(figure, out_dir / SUMMARY_PLOT)
    return report


def evaluate(
    source: Source,
    out_dir: str | os.PathLike,
    *,
    pipeline=None,  # `Pipeline`; None scores the results already in out_dir
    settings=None,  # `InferenceConfig` (with the pipeline)
    seed: int = 42,
    batch_size: int | None = None,
    plots: bool = False,
    on_clip: Callable[[str, dict | None], None] | None = None,
    provenance: dict | None = None,
) -> dict:
    """Runs the pipeline on the clips of `source` without a result in `out_dir` (if a pipeline
    is given), scores every clip and writes the report files (module docstring). Returns the
    content of metrics.json."""
    from alpamayo_jax.inference.batch import run_clips
    from alpamayo_jax.inference.sampling import seed_key

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    run_settings = {"seed": seed, "score_only": pipeline is None}
    if pipeline is not None:
        from alpamayo_jax.inference.inference_config import InferenceConfig

        settings = InferenceConfig.from_model(pipeline.config) if settings is None else settings

        def progress(name, status):
            if status == "failed" and on_clip:
                on_clip(name, None)

        summary = run_clips(pipeline, source, out_dir, seed_key(seed), settings, batch_size=batch_size,
                            plots=plots, reseed_per_clip=True, on_clip=progress,
                            provenance={**(provenance or {}), "seed": seed})
        failed = {str(name): why for name, why in summary.failed.items()}
        run_settings["inference"] = settings.to_json()
        run_settings["computed"] = len(summary.written)
        run_settings["reused"] = len(summary.skipped)
    scores = score_results(source, out_dir, skip=tuple(failed), on_clip=on_clip)
    return write_scores(out_dir, scores, {**run_settings, **(provenance or {})}, failed=failed)
