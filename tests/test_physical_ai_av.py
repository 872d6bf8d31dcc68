"""The PhysicalAI-AV reader against the reference's clip loader, and the synthetic dataset writer.

`tests/fixtures/physical_ai_av/` holds a synthetic dataset and what the reference's
`load_physical_aiavdataset` returned on it (README there). The reader must give the same frames
(bit for bit), poses (1e-6) and frame times (exactly). The writer's output must be readable by the
devkit's own dataset interface, offline. Neither the reference nor torch runs here.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from alpamayo_jax.data import physical_ai_av as pai
from alpamayo_jax.data.physical_ai_av import (
    CAMERA_INDEX,
    DEFAULT_T0_US,
    DatasetError,
    PhysicalAIAVDataset,
    read_clip,
    seconds_to_us,
)
from alpamayo_jax.data.synthetic_dataset import add_arguments, main, write_synthetic_dataset
from alpamayo_jax.processing.clip import CAMERA_NAMES, validate_clip

FIXTURE = Path(__file__).parent / "fixtures" / "physical_ai_av"
RECORD = json.loads((FIXTURE / "reference.json").read_text())
SAMPLES = RECORD["samples"]
CLIP_IDS = RECORD["dataset"]["clip_ids"]


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE / "reference.npz") as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture(scope="module")
def dataset():
    return PhysicalAIAVDataset(FIXTURE / "dataset")


@pytest.fixture
def dataset_copy(tmp_path):
    """A writable copy of the fixture dataset, for breaking it."""
    return Path(shutil.copytree(FIXTURE / "dataset", tmp_path / "dataset"))


def _refuse(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.fixture
def offline(monkeypatch):
    """Hugging Face offline mode, and sockets that refuse to connect."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)


@pytest.fixture
def no_hub(offline, monkeypatch):
    """`offline`, and every Hugging Face Hub client refuses to be created or to download."""
    import huggingface_hub

    for name in ("HfApi", "HfFileSystem"):
        monkeypatch.setattr(getattr(huggingface_hub, name), "__init__", _refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _refuse)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", _refuse)


def _max_error(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---------------------------------------------------------------------------------------------
# Parity with the reference's loader
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_reader_matches_reference_loader(dataset, reference, i):
    spec = SAMPLES[i]
    sample = dataset.read(spec["clip_id"], spec["t0_us"], cameras=spec["cameras"] or CAMERA_NAMES)
    clip = sample.clip
    ref = {key: reference[f"{i}.{key}"] for key in RECORD["keys"]}

    frames = np.asarray(clip.camera_frames)
    assert frames.shape == ref["image_frames"].shape and frames.dtype == np.uint8
    assert np.array_equal(frames, ref["image_frames"]), (
        f"frames differ in {(frames != ref['image_frames']).sum()} values")
    assert sample.camera_indices == tuple(ref["camera_indices"].tolist())
    assert [CAMERA_INDEX[name] for name in clip.camera_names] == ref["camera_indices"].tolist()
    for ours, key in ((clip.ego_history_xyz, "ego_history_xyz"), (clip.ego_history_rot, "ego_history_rot"),
                      (clip.ego_future_xyz, "ego_future_xyz"), (clip.ego_future_rot, "ego_future_rot")):
        theirs = ref[key][0, 0]
        assert ours.dtype == np.float32 and ours.shape == theirs.shape, key
        error = _max_error(ours, theirs)
        assert error <= 1e-6, f"{key}: max abs error {error:.3g}"
    assert np.array_equal(sample.frame_timestamps_us, ref["absolute_timestamps"]), "absolute timestamps"
    assert np.array_equal(sample.relative_timestamps, ref["relative_timestamps"]), "relative timestamps"
    # The clip's own frame times: the earliest camera's per slot, relative to t0.
    expected = (ref["absolute_timestamps"].min(axis=0) - spec["t0_us"]) / 1e6
    assert np.array_equal(clip.timestamps, expected)


def test_sample_is_a_valid_clip_with_ground_truth(dataset):
    sample = dataset.read(CLIP_IDS[0])
    clip = sample.clip
    assert sample.t0_us == DEFAULT_T0_US and sample.clip_id == CLIP_IDS[0]
    assert clip.has_ground_truth and clip.camera_names == CAMERA_NAMES
    assert clip.ego_history_xyz.shape == (16, 3) and clip.ego_future_rot.shape == (64, 3, 3)
    assert np.array_equal(clip.ego_history_xyz[-1], np.zeros(3, np.float32))
    np.testing.assert_allclose(clip.ego_history_rot[-1], np.eye(3), atol=1e-6)
    validate_clip(clip)
    # One (C, F, H, W, 3) array that preprocessing reads in place (`image.aligned_host_array`).
    assert isinstance(clip.camera_frames, np.ndarray) and clip.camera_frames.ctypes.data % 64 == 0
    assert clip.camera_frames.transpose(0, 1, 3, 4, 2).flags.c_contiguous
    assert np.array_equal(np.asarray(read_clip(FIXTURE / "dataset", CLIP_IDS[0]).camera_frames),
                          np.asarray(clip.camera_frames))



def test_cameras_of_different_sizes_stay_per_camera():
    """One aligned array only when every camera has the same size; otherwise the decoded
    cameras as they are, which `Clip.create` takes per camera."""
    rng = np.random.default_rng(3)
    same = [rng.integers(0, 256, (4, 16, 24, 3), dtype=np.uint8) for _ in range(2)]
    stacked = pai._camera_array(same)
    assert stacked.shape == (2, 4, 16, 24, 3) and stacked.ctypes.data % 64 == 0 and not stacked.flags.writeable
    np.testing.assert_array_equal(stacked, np.stack(same))
    mixed = [same[0], rng.integers(0, 256, (4, 8, 12, 3), dtype=np.uint8)]
    assert pai._camera_array(mixed) is mixed

def test_frames_are_the_latest_at_or_before_each_time(dataset):
    """Every frame is the video's frame of the last timestamp at or before t0 - 0.3 ... t0, as a
    plain sequential decode of the whole video gives it."""
    import av
    import pandas as pd

    clip_id, t0 = CLIP_IDS[1], 3_456_789
    sample = dataset.read(clip_id, t0, cameras=["front_wide_120fov"])
    feature = "camera_front_wide_120fov"
    archive = zipfile.ZipFile(FIXTURE / "dataset" / dataset.features.get_chunk_feature_filename(0, feature))
    stamps = pd.read_parquet(io.BytesIO(archive.read(f"{clip_id}.{feature}.timestamps.parquet")))["timestamp"]
    with av.open(io.BytesIO(archive.read(f"{clip_id}.{feature}.mp4"))) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == len(stamps)
    wanted = t0 + 100_000 * np.arange(-3, 1)
    index = np.searchsorted(stamps.to_numpy(), wanted, side="right") - 1
    assert np.array_equal(sample.frame_timestamps_us[0], stamps.to_numpy()[index])
    assert (sample.frame_timestamps_us[0] <= wanted).all() and (wanted - sample.frame_timestamps_us[0] < 34_000).all()
    for f, i in enumerate(index):
        assert np.array_equal(sample.clip.camera_frames[0][f], decoded[i].transpose(2, 0, 1)), f"frame {f}"


def test_reading_never_touches_the_network(no_hub):
    dataset = PhysicalAIAVDataset(FIXTURE / "dataset")
    sample = dataset.read(CLIP_IDS[2], 4_000_000)
    assert sample.clip.has_ground_truth


def test_modules_import_without_loading_the_devkit():
    code = ("import sys, alpamayo_jax.data.physical_ai_av, alpamayo_jax.data.synthetic_dataset, "
            "alpamayo_jax.data.iterator; "
            "loaded = [m for m in ('physical_ai_av', 'av', 'pandas', 'pyarrow', 'huggingface_hub') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_devkit_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "physical_ai_av", None)
    with pytest.raises(ImportError, match=r"pip install 'alpamayo-jax\[data\]'"):
        PhysicalAIAVDataset(FIXTURE / "dataset")


# ---------------------------------------------------------------------------------------------
# Clip index: ids, chunks, events
# ---------------------------------------------------------------------------------------------


def test_clip_index_events_and_chunks(dataset):
    assert dataset.clip_ids() == CLIP_IDS
    assert dataset.clip_ids(chunks=[1]) == CLIP_IDS[2:]
    assert [dataset.chunk(c) for c in CLIP_IDS] == RECORD["dataset"]["chunks"]
    for clip_id in CLIP_IDS:
        raw = np.asarray(dataset.clip_index.at[clip_id, "event_t0s"])
        usable = dataset.event_t0s_us(clip_id)
        end = int(dataset.clip_index.at[clip_id, "end_timestamp"])
        assert usable.tolist() == [t for t in raw.tolist() if t >= 1_600_000 and t + 6_400_000 <= end]
    # The recorded "first event" samples are the reference's keyframes.
    assert [s["t0_us"] for s in SAMPLES[3:6]] == [int(dataset.event_t0s_us(c)[0]) for c in CLIP_IDS]
    assert seconds_to_us(5.1) == DEFAULT_T0_US


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_missing_root_and_metadata(tmp_path, dataset_copy):
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        PhysicalAIAVDataset(tmp_path / "nowhere")
    (dataset_copy / "features.csv").unlink()
    with pytest.raises(FileNotFoundError, match="features.csv"):
        PhysicalAIAVDataset(dataset_copy)


@pytest.mark.parametrize("clip_id, t0, match", [
    ("00000000-0000-4000-8000-000000000000", DEFAULT_T0_US, "unknown clip id"),
    (CLIP_IDS[0], 1_600_000, "too early"),
    (CLIP_IDS[0], 5.1, "integer number of microseconds"),
    (CLIP_IDS[0], 6_000_000, "out of range: the sample needs egomotion"),  # the future runs past the clip
])
def test_bad_clip_or_t0(dataset, clip_id, t0, match):
    with pytest.raises(DatasetError, match=match):
        dataset.read(clip_id, t0)


def test_t0_just_after_the_history_span_is_accepted(dataset):
    assert dataset.read(CLIP_IDS[0], 1_600_001).clip.has_ground_truth


def test_unknown_camera_name(dataset):
    with pytest.raises(DatasetError, match="unknown camera"):
        dataset.read(CLIP_IDS[0], cameras=["rear_tele_30fov"])


def test_missing_camera(dataset_copy):
    (dataset_copy / "camera/camera_front_tele_30fov/camera_front_tele_30fov.chunk_0000.zip").unlink()
    dataset = PhysicalAIAVDataset(dataset_copy)
    with pytest.raises(DatasetError, match=f"{CLIP_IDS[0]}: camera_front_tele_30fov chunk file not found"):
        dataset.read(CLIP_IDS[0])
    dataset.read(CLIP_IDS[2])  # chunk 1 still has it

    features = (dataset_copy / "features.csv").read_text().splitlines()
    (dataset_copy / "features.csv").write_text("\n".join(line for line in features if "cross_left" not in line))
    with pytest.raises(DatasetError, match="the dataset has no camera 'camera_cross_left_120fov'"):
        PhysicalAIAVDataset(dataset_copy).read(CLIP_IDS[2])


def test_camera_absent_for_one_clip(dataset_copy):
    import pandas as pd

    presence = pd.read_parquet(dataset_copy / "metadata/feature_presence.parquet")
    presence.loc[CLIP_IDS[1], "camera_cross_right_120fov"] = False
    presence.to_parquet(dataset_copy / "metadata/feature_presence.parquet")
    with pytest.raises(DatasetError, match=f"{CLIP_IDS[1]}: the clip has no camera_cross_right_120fov"):
        PhysicalAIAVDataset(dataset_copy).read(CLIP_IDS[1])


def test_corrupt_or_incomplete_zip(dataset_copy):
    video_zip = dataset_copy / "camera/camera_front_wide_120fov/camera_front_wide_120fov.chunk_0000.zip"
    video_zip.write_bytes(b"not a zip" * 100)
    with pytest.raises(DatasetError, match="corrupt zip"):
        PhysicalAIAVDataset(dataset_copy).read(CLIP_IDS[0])

    ego_zip = dataset_copy / "labels/egomotion/egomotion.chunk_0001.zip"
    data = bytearray(ego_zip.read_bytes())
    data[len(data) // 3:len(data) // 3 + 64] = b"\xff" * 64  # damage a member's bytes: a CRC error
    ego_zip.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"{CLIP_IDS[2]}: cannot read .*egomotion"):
        PhysicalAIAVDataset(dataset_copy).read(CLIP_IDS[2])

    with zipfile.ZipFile(ego_zip, "w") as archive:  # a zip without the clip's member
        archive.writestr("other.egomotion.parquet", b"")
    with pytest.raises(DatasetError, match=f"has no {CLIP_IDS[2]}.egomotion.parquet"):
        PhysicalAIAVDataset(dataset_copy).read(CLIP_IDS[2])


def test_corrupt_video_inside_a_valid_zip(dataset_copy):
    path = dataset_copy / "camera/camera_cross_left_120fov/camera_cross_left_120fov.chunk_0001.zip"
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    video = next(name for name in members if name.endswith(".mp4"))
    members[video] = members[video][:200]  # truncated
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(DatasetError, match=f"{CLIP_IDS[2]}: cannot decode camera cross_left_120fov"):
        PhysicalAIAVDataset(dataset_copy).read(CLIP_IDS[2])


# ---------------------------------------------------------------------------------------------
# The synthetic writer
# ---------------------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writer_layout_and_reproducibility(tmp_path):
    first = write_synthetic_dataset(tmp_path / "a", num_clips=2, seed=3, clips_per_chunk=1, first_chunk=98,
                                    cameras=["front_wide_120fov", "cross_left_120fov"])
    write_synthetic_dataset(tmp_path / "b", num_clips=2, seed=3, clips_per_chunk=1, first_chunk=98,
                            cameras=["front_wide_120fov", "cross_left_120fov"])
    files = _files(first.root)
    assert files == _files(tmp_path / "b"), "the same arguments must write the same bytes"
    assert first.chunks == (98, 99)
    assert sorted(files) == sorted([
        "clip_index.parquet", "features.csv", "metadata/data_collection.parquet",
        "metadata/feature_presence.parquet",
        *(f"camera/camera_{cam}/camera_{cam}.chunk_{c:04d}.zip" for cam in ("cross_left_120fov", "front_wide_120fov")
          for c in (98, 99)),
        *(f"labels/egomotion/egomotion.chunk_{c:04d}.zip" for c in (98, 99)),
    ])
    archive = zipfile.ZipFile(first.root / "camera/camera_front_wide_120fov/camera_front_wide_120fov.chunk_0099.zip")
    clip_id = first.clip_ids[1]
    assert sorted(archive.namelist()) == [f"{clip_id}.camera_front_wide_120fov.mp4",
                                          f"{clip_id}.camera_front_wide_120fov.timestamps.parquet"]
    # Clip k does not depend on how many clips are written.
    one = write_synthetic_dataset(tmp_path / "c", num_clips=1, seed=3)
    assert one.clip_ids == first.clip_ids[:1]
    with pytest.raises(FileExistsError):
        write_synthetic_dataset(tmp_path / "c", num_clips=1, seed=3)


def test_devkit_interface_reads_the_synthetic_dataset(tmp_path, dataset, offline):
    """The devkit's own dataset interface, offline, over a hub-cache view of the fixture root."""
    import pandas as pd
    from physical_ai_av import PhysicalAIAVDatasetInterface

    revision = "0" * 40
    snapshot = tmp_path / "datasets--nvidia--PhysicalAI-Autonomous-Vehicles" / "snapshots" / revision
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to((FIXTURE / "dataset").resolve())
    avdi = PhysicalAIAVDatasetInterface(revision=revision, cache_dir=tmp_path)
    assert avdi.clip_index.index.tolist() == CLIP_IDS
    assert avdi.features.CAMERA.ALL == {f"camera_{name}" for name in CAMERA_NAMES}
    assert avdi.chunk_feature_presence.all().all()

    clip_id = CLIP_IDS[1]
    egomotion = avdi.get_clip_feature(clip_id, avdi.features.LABELS.EGOMOTION)
    with zipfile.ZipFile(FIXTURE / "dataset/labels/egomotion/egomotion.chunk_0000.zip") as archive:
        table = pd.read_parquet(io.BytesIO(archive.read(f"{clip_id}.egomotion.parquet")))
    knots = table["timestamp"].to_numpy()[5:-5:37]
    pose = egomotion(knots).pose
    np.testing.assert_allclose(pose.translation, table[["x", "y", "z"]].to_numpy()[5:-5:37], atol=1e-9)
    rows = table[["qx", "qy", "qz", "qw"]].to_numpy()[5:-5:37]
    assert np.abs(np.abs((pose.rotation.as_quat() * rows).sum(axis=1)) - 1).max() < 1e-9

    camera = avdi.get_clip_feature(clip_id, avdi.features.CAMERA.CAMERA_FRONT_TELE_30FOV)
    wanted = DEFAULT_T0_US + 100_000 * np.arange(-3, 1)
    frames, stamps = camera.decode_images_from_timestamps(wanted)
    ours = dataset.read(clip_id, DEFAULT_T0_US, cameras=["front_tele_30fov"])
    assert np.array_equal(frames.transpose(0, 3, 1, 2), ours.clip.camera_frames[0])
    assert np.array_equal(stamps, ours.frame_timestamps_us[0])


def test_synthetic_drive_is_plausible(dataset):
    """Speeds of a car, a turning drive, pitch from the road grade, and pictures that change."""
    clip = dataset.read(CLIP_IDS[0]).clip
    path = np.concatenate([clip.ego_history_xyz, clip.ego_future_xyz])
    speed = np.linalg.norm(np.diff(path, axis=0), axis=1) / 0.1
    assert 2.0 < speed.min() and speed.max() < 25.0
    heading = np.degrees(np.arctan2(clip.ego_future_rot[-1, 1, 0], clip.ego_future_rot[-1, 0, 0]))
    assert abs(heading) > 1.0
    frames = np.asarray(clip.camera_frames, np.float64)
    assert np.abs(np.diff(frames, axis=1)).mean() > 1.0  # the scene moves between frames
    assert np.abs(frames[0] - frames[1]).mean() > 5.0  # cameras see different things


def test_make_dataset_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "ds"), "--clips", "1", "--seed", "5", "--image-size", "16x24"])
    assert main(args) == 0
    assert "wrote 1 synthetic clip(s)" in capsys.readouterr().out
    sample = PhysicalAIAVDataset(tmp_path / "ds").read(PhysicalAIAVDataset(tmp_path / "ds").clip_ids()[0])
    assert np.asarray(sample.clip.camera_frames).shape == (4, 4, 3, 16, 24)
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--image-size", "big"])


def test_writer_argument_checks(tmp_path):
    for kwargs, match in (({"num_clips": 0}, "num_clips"), ({"image_size": (31, 48)}, "even"),
                          ({"cameras": ["left"]}, "cameras"), ({"duration_s": 6.0}, "duration_s")):
        with pytest.raises(ValueError, match=match):
            write_synthetic_dataset(tmp_path / "x", **{"num_clips": 1, "seed": 0, **kwargs})
    assert not (tmp_path / "x").exists()


def test_module_constants_agree():
    assert pai.CAMERA_NAMES == CAMERA_NAMES
    assert sorted(CAMERA_NAMES, key=CAMERA_INDEX.__getitem__) == list(CAMERA_NAMES)
