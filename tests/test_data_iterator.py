"""Batches of clips: the seeded order, its split across processes, background loading and its
errors, the sources (dataset samples, clip files) and placing a batch on a mesh."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from alpamayo_jax.data.iterator import (
    BatchIterator,
    ClipFileSource,
    DatasetSource,
    Sample,
    SampleError,
    place_batch,
)
from alpamayo_jax.data.physical_ai_av import DEFAULT_T0_US, PhysicalAIAVDataset
from alpamayo_jax.processing.clip_file import save_clip
from alpamayo_jax.processing.synthetic import synthetic_clip
from alpamayo_jax.sharding import make_mesh
from alpamayo_jax.training.data import BatchOrder

FIXTURE_DATASET = Path(__file__).parent / "fixtures" / "physical_ai_av" / "dataset"


class FakeSource:
    """n small synthetic clips; loading records the thread and may fail for `broken` indices."""

    def __init__(self, n: int, broken: tuple[int, ...] = ()):
        self.clips = [synthetic_clip(seed=i, image_size=(4, 6)) for i in range(n)]
        self.broken, self.threads = set(broken), set()

    def __len__(self):
        return len(self.clips)

    def name(self, index):
        return f"fake clip #{index}"

    def load(self, index):
        self.threads.add(threading.current_thread().name)
        if index in self.broken:
            raise ValueError("cannot decode")
        return self.clips[index]


def _indices(source: FakeSource, batches) -> list[list[int]]:
    """The source indices of the clips of `batches` (clips are identified by object)."""
    position = {id(clip): i for i, clip in enumerate(source.clips)}
    return [[position[id(clip)] for clip in batch] for batch in batches]


def _flat(lists) -> list:
    return list(itertools.chain.from_iterable(lists))


def _take(iterator, n):
    out = []
    for batch in iterator:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_order_is_batch_order_and_deterministic():
    source = FakeSource(10)
    iterator = BatchIterator(source, batch_size=3, seed=5, process_index=0, process_count=1, num_workers=2)
    order = BatchOrder(10, 3, 5)
    assert [iterator.global_batch(k) for k in range(9)] == [order(k) for k in range(9)]  # three epochs
    first = _indices(source, _take(iterator, 7))
    again = _indices(source, _take(BatchIterator(source, batch_size=3, seed=5, process_index=0, process_count=1), 7))
    assert first == again == [order(k) for k in range(7)]
    other = _indices(source, _take(BatchIterator(source, batch_size=3, seed=6, process_index=0, process_count=1), 7))
    assert other != first
    assert any(name.startswith("clip-loader") for name in source.threads)


def test_resuming_at_a_batch_continues_the_same_order():
    source = FakeSource(8)
    full = _indices(source, _take(BatchIterator(source, batch_size=2, seed=1, process_index=0, process_count=1), 9))
    resumed = _indices(source, _take(BatchIterator(source, batch_size=2, seed=1, start_batch=4,
                                                   process_index=0, process_count=1), 5))
    assert resumed == full[4:]


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_contiguous_shards_of_each_global_batch(process_count):
    source = FakeSource(13)
    iterators = [BatchIterator(source, batch_size=8, seed=3, process_index=p, process_count=process_count,
                               num_workers=0) for p in range(process_count)]
    single = BatchIterator(source, batch_size=8, seed=3, process_index=0, process_count=1, num_workers=0)
    for k in range(5):
        shards = [it.local_batch(k) for it in iterators]
        assert all(len(shard) == 8 // process_count for shard in shards)
        assert _flat(shards) == single.global_batch(k)  # process-major rows of the global batch
    batches = [_indices(source, _take(it, 3)) for it in iterators]
    for k in range(3):
        assert _flat(batches[p][k] for p in range(process_count)) == single.global_batch(k)


def test_evaluation_order_serves_every_sample_once():
    source = FakeSource(7)
    iterator = BatchIterator(source, batch_size=3, shuffle=False, drop_remainder=False, num_epochs=1,
                             process_index=0, process_count=1)
    assert len(iterator) == 3
    assert _indices(source, list(iterator)) == [[0, 1, 2], [3, 4, 5], [6]]
    shards = [BatchIterator(source, batch_size=4, shuffle=True, seed=2, drop_remainder=False, num_epochs=1,
                            process_index=p, process_count=2) for p in range(2)]
    seen = _flat(_flat(_indices(source, list(it))) for it in shards)
    assert sorted(seen) == list(range(7))


def test_a_broken_sample_raises_with_its_name_and_is_never_dropped():
    source = FakeSource(6, broken=(4,))
    for workers in (0, 3):
        iterator = BatchIterator(source, batch_size=2, shuffle=False, num_epochs=1, process_index=0,
                                 process_count=1, num_workers=workers)
        served = []
        with pytest.raises(SampleError, match=r"batch 2: fake clip #4: cannot decode") as caught:
            for batch in iterator:
                served.append(batch)  # noqa: PERF402 (the loop ends in the error)
        assert isinstance(caught.value.__cause__, ValueError)
        assert _indices(source, served) == [[0, 1], [2, 3]]  # everything before it, nothing after


def test_stopping_early_releases_the_workers():
    source = FakeSource(5)
    iterator = BatchIterator(source, batch_size=2, seed=0, process_index=0, process_count=1, num_workers=2)
    batches = iter(iterator)
    next(batches)
    batches.close()  # shuts the pool down without waiting for the prefetched batches
    for _ in range(100):
        if not any(t.name.startswith("clip-loader") for t in threading.enumerate()):
            break
        time.sleep(0.05)
    assert not any(t.name.startswith("clip-loader") for t in threading.enumerate())


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 3, "process_count": 2}, "multiple of process_count"),
    ({"batch_size": 20}, "cannot fill one batch"),
    ({"batch_size": 2, "process_index": 1}, "process_index"),
    ({"batch_size": 2, "num_epochs": 0}, "num_epochs"),
])
def test_argument_checks(kwargs, match):
    options = {"process_index": 0, "process_count": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        BatchIterator(FakeSource(5), **options)


def test_infinite_iterator_has_no_length():
    with pytest.raises(TypeError):
        len(BatchIterator(FakeSource(4), batch_size=2, process_index=0, process_count=1))


def test_default_processes_are_jax_processes():
    iterator = BatchIterator(FakeSource(4), batch_size=2)
    assert (iterator.process_index, iterator.process_count) == (jax.process_index(), jax.process_count())


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def test_clip_file_source(tmp_path):
    clips = [synthetic_clip(seed=i, image_size=(4, 6), with_future=True) for i in range(3)]
    for i, clip in enumerate(clips):
        save_clip(tmp_path / f"clip_{i}.npz", clip)
    source = ClipFileSource(tmp_path)
    assert len(source) == 3 and source.name(0).endswith("clip_0.npz")
    (batch,) = list(BatchIterator(source, batch_size=3, shuffle=False, num_epochs=1, process_index=0,
                                  process_count=1))
    for ours, clip in zip(batch, clips, strict=True):
        assert np.array_equal(ours.ego_future_xyz, clip.ego_future_xyz)
    (tmp_path / "clip_1.npz").write_bytes(b"garbage")
    with pytest.raises(SampleError, match=r"clip_1\.npz"):
        list(BatchIterator(ClipFileSource(tmp_path), batch_size=3, shuffle=False, num_epochs=1,
                           process_index=0, process_count=1))
    with pytest.raises(FileNotFoundError):
        ClipFileSource(tmp_path / "empty")


@pytest.fixture(scope="module")
def dataset():
    return PhysicalAIAVDataset(FIXTURE_DATASET)


def test_dataset_source_t0_choices(dataset):
    ids = dataset.clip_ids()
    assert DatasetSource(dataset).samples == [Sample(c, DEFAULT_T0_US) for c in ids]
    assert DatasetSource(dataset, t0=4_000_000, chunks=[0]).samples == [Sample(c, 4_000_000) for c in ids[:2]]
    first = DatasetSource(dataset, t0="first_event").samples
    assert first == [Sample(c, int(dataset.event_t0s_us(c)[0])) for c in ids]
    every = DatasetSource(dataset, t0="all_events").samples
    assert every == [Sample(c, int(t)) for c in ids for t in dataset.event_t0s_us(c)]
    assert len(every) > len(first)
    with pytest.raises(ValueError, match="t0 must be"):
        DatasetSource(dataset, t0="sometimes")


def test_dataset_batches_decode_in_background(dataset):
    source = DatasetSource(dataset, t0="first_event")
    iterator = BatchIterator(source, batch_size=2, seed=0, drop_remainder=False, num_epochs=1, process_index=0,
                             process_count=1, num_workers=2)
    batches = list(iterator)
    assert [len(b) for b in batches] == [2, 1]
    for k, batch in enumerate(batches):
        for clip, index in zip(batch, iterator.local_batch(k), strict=True):
            sample = source.samples[index]
            expected = dataset.read(sample.clip_id, sample.t0_us).clip
            assert np.array_equal(np.asarray(clip.camera_frames), np.asarray(expected.camera_frames))
            assert np.array_equal(clip.ego_future_xyz, expected.ego_future_xyz)


def test_a_broken_dataset_clip_names_its_id(tmp_path):
    import shutil

    root = Path(shutil.copytree(FIXTURE_DATASET, tmp_path / "dataset"))
    (root / "camera/camera_cross_right_120fov/camera_cross_right_120fov.chunk_0001.zip").write_bytes(b"broken")
    dataset = PhysicalAIAVDataset(root)
    broken = dataset.clip_ids(chunks=[1])[0]
    iterator = BatchIterator(DatasetSource(dataset), batch_size=3, shuffle=False, num_epochs=1, process_index=0,
                             process_count=1, num_workers=3)
    with pytest.raises(SampleError, match=f"clip {broken} at t0_us={DEFAULT_T0_US}: .*corrupt zip"):
        list(iterator)


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------


def test_place_batch_on_a_mesh():
    mesh = make_mesh("single")
    local = {"xyz": np.arange(24, dtype=np.float32).reshape(4, 2, 3), "ids": np.arange(4)}
    placed = place_batch(local, mesh)
    assert placed["xyz"].shape == (4 * jax.process_count(), 2, 3)
    assert placed["xyz"].sharding.spec == jax.sharding.PartitionSpec("data", None, None)
    assert np.array_equal(np.asarray(placed["xyz"]), local["xyz"])
    assert np.array_equal(np.asarray(placed["ids"]), local["ids"])
    with pytest.raises(ValueError, match="leading batch axis"):
        place_batch({"scalar": np.float32(1.0)}, mesh)
