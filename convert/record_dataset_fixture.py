"""Records the reference's PhysicalAI-AV clip loader on a synthetic dataset: the fixture of the
reader's parity test (`tests/test_physical_ai_av.py`, `tests/fixtures/physical_ai_av/`).

Writes a small synthetic dataset with this project's writer (`alpamayo_jax.data.synthetic_dataset`)
into OUT/dataset, opens it with the reference's local dataset interface
(`alpamayo_r1.data.pai_utils.PhysicalAIAVDatasetLocalInterface`, the one its training uses), runs the
reference's `load_physical_aiavdataset` on a list of (clip, t0, cameras) samples, and saves what it
returns to OUT/reference.npz (`<sample>.<key>` arrays) and OUT/reference.json (the samples, the
versions, the command). Every sample is loaded twice; the two loads must agree bit for bit.

Needs the reference source (`alpamayo_r1`, NVlabs/alpamayo) on PYTHONPATH, torch, einops, colorlog
and the devkit; never run by the tests. Nothing touches the network (HF_HUB_OFFLINE is set and
sockets refuse to connect). Run from the repository root:

    PYTHONPATH=/path/to/alpamayo/src:. python convert/record_dataset_fixture.py --out tests/fixtures/physical_ai_av
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alpamayo_reference.recording import reference_commit, refuse_network, write_record

refuse_network()

import numpy as np

from alpamayo_jax.data.synthetic_dataset import write_synthetic_dataset

NUM_CLIPS, SEED, CLIPS_PER_CHUNK = 3, 7, 2
KEYS = ("image_frames", "camera_indices", "ego_history_xyz", "ego_history_rot", "ego_future_xyz", "ego_future_rot",
        "relative_timestamps", "absolute_timestamps")


def samples(clip_ids: list[str], avdi) -> list[dict]:
    """The recorded samples: the default keyframe of every clip, the first usable event of each
    clip (the reference's `use_default_keyframe=False` t0), a t0 off the 100 ms grid, and a camera
    subset given out of index order."""
    cam = avdi.features.CAMERA
    chosen = [{"clip_id": c, "t0_us": 5_100_000} for c in clip_ids]
    chosen += [{"clip_id": c, "t0_us": int(avdi.get_clip_key_frame(c))} for c in clip_ids]
    chosen.append({"clip_id": clip_ids[1], "t0_us": 3_456_789})
    chosen.append({"clip_id": clip_ids[2], "t0_us": 4_321_987,
                   "camera_features": [cam.CAMERA_FRONT_TELE_30FOV, cam.CAMERA_CROSS_LEFT_120FOV]})
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="fixture directory (dataset/ and reference.*)")
    parser.add_argument("--reference-commit", help="NVlabs/alpamayo commit of the reference source "
                                                   "(default: asked of git where the source is a checkout)")
    args = parser.parse_args()

    import torch
    from alpamayo_r1.data.pai_utils import PhysicalAIAVDatasetLocalInterface
    from alpamayo_r1.load_physical_aiavdataset import load_physical_aiavdataset

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = write_synthetic_dataset(args.out / "dataset", num_clips=NUM_CLIPS, seed=SEED,
                                      clips_per_chunk=CLIPS_PER_CHUNK, force=True)
    avdi = PhysicalAIAVDatasetLocalInterface(local_dir=str(dataset.root))
    chosen = samples(list(dataset.clip_ids), avdi)
    arrays: dict[str, np.ndarray] = {}
    for i, sample in enumerate(chosen):
        loads = [load_physical_aiavdataset(sample["clip_id"], t0_us=sample["t0_us"], avdi=avdi,
                                           camera_features=sample.get("camera_features")) for _ in range(2)]
        for key in KEYS:
            first, second = (np.asarray(load[key]) for load in loads)
            if not np.array_equal(first, second):
                raise RuntimeError(f"sample {i}: {key} differs between two loads")
            arrays[f"{i}.{key}"] = first
        sample["cameras"] = [name.removeprefix("camera_") for name in sample.pop("camera_features", None) or []]
    np.savez_compressed(args.out / "reference.npz", **arrays)

    root = Path(sys.modules["alpamayo_r1"].__path__[0]).parents[1]
    write_record(args.out, {
        "samples": chosen,
        "dataset": {"num_clips": NUM_CLIPS, "seed": SEED, "clips_per_chunk": CLIPS_PER_CHUNK,
                    "clip_ids": list(dataset.clip_ids), "chunks": list(dataset.chunks)},
        "keys": list(KEYS),
    }, packages=("torch", "physical_ai_av", "av", "numpy", "scipy", "pandas", "pyarrow", "einops"),
        commit=args.reference_commit or reference_commit(root),
        command="PYTHONPATH=<alpamayo>/src:. python convert/record_dataset_fixture.py")
    print(f"recorded {len(chosen)} samples of {NUM_CLIPS} clips into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
