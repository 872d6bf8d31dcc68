"""Batches of clips for training and evaluation: a seeded order, background decoding, one shard
per process.

A source is an indexed list of samples that can each be loaded as a `Clip`:
`DatasetSource` — (clip id, t0) samples of a local PhysicalAI-AV root
(`alpamayo_jax.data.physical_ai_av`), at the default keyframe t0 = 5.1 s, at each clip's first
usable event (the reference's `use_default_keyframe=False`), at every usable event, or at one
given t0; `ClipFileSource` — `.npz` clip files (`alpamayo_jax.processing.clip_file`).

`BatchIterator` serves lists of clips. The order is the training data's (`training.data.BatchOrder`):
epoch e is the permutation seeded by (seed, e) (or the source order without shuffling), cut into
global batches of `batch_size`; batch k of the run is a pure function of (seed, k), so a run
resumed at `start_batch` sees the batches an uninterrupted one would. Each of `process_count`
processes takes its contiguous slice of every global batch (batch_size / process_count samples,
in order), so that the rows of a global batch are process-major, as
`jax.make_array_from_process_local_data` lays them out (`place_batch`). Samples are loaded by a
pool of threads (decoding releases the GIL), a few batches ahead, and served in order. A sample
that fails to load raises `SampleError` naming it (its clip id and t0, or its file) when its
batch is reached; nothing is skipped silently.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from alpamayo_jax.data.physical_ai_av import DEFAULT_T0_US, PhysicalAIAVDataset
from alpamayo_jax.processing.clip import Clip
from alpamayo_jax.processing.clip_file import load_clip
from alpamayo_jax.training.data import BatchOrder

T0Mode = Literal["keyframe", "first_event", "all_events"]


class SampleError(RuntimeError):
    """A sample that could not be loaded; the message names it, the cause is chained."""


class Source(Protocol):
    """Samples that can be loaded by index, from any thread."""

    def __len__(self) -> int: ...

    def name(self, index: int) -> str:
        """How errors and logs name sample `index`."""
        ...

    def stem(self, index: int) -> str:
        """A file-name-safe name of sample `index`, unique in the source (names its results)."""
        ...

    def load(self, index: int) -> Clip: ...


@dataclasses.dataclass(frozen=True)
class Sample:
    """One (clip id, t0) of a dataset; t0 in microseconds on the clip's clock."""

    clip_id: str
    t0_us: int


class DatasetSource:
    """(clip id, t0) samples of a local PhysicalAI-AV root.

    `clip_ids` (default: `dataset.clip_ids(chunks)`, which like the reference keeps only clips
    with a usable event when the clip index lists events) in that order; `t0` picks the samples:
    "keyframe", one per clip at `DEFAULT_T0_US` (5.1 s, the reference's default keyframe);
    "first_event", one per clip at its first usable event (the reference's keyframe when it is
    told not to use the default one; clips without one are an error); "all_events", one per
    usable event, clip by clip; or an integer, one per clip at that t0 (microseconds).
    `read_options` go to `PhysicalAIAVDataset.read` (cameras, counts)."""

    def __init__(
        self,
        dataset: PhysicalAIAVDataset | str | os.PathLike,
        *,
        clip_ids: Sequence[str] | None = None,
        chunks: Sequence[int] | None = None,
        t0: T0Mode | int = "keyframe",
        **read_options,
    ):
        self.dataset = dataset if isinstance(dataset, PhysicalAIAVDataset) else PhysicalAIAVDataset(dataset)
        ids = list(self.dataset.clip_ids(chunks) if clip_ids is None else clip_ids)
        self.read_options = read_options
        if isinstance(t0, (int, np.integer)) and not isinstance(t0, bool):
            self.samples = [Sample(clip_id, int(t0)) for clip_id in ids]
        elif t0 == "keyframe":
            self.samples = [Sample(clip_id, DEFAULT_T0_US) for clip_id in ids]
        elif t0 in ("first_event", "all_events"):
            self.samples = []
            for clip_id in ids:
                events = self.dataset.event_t0s_us(clip_id)
                if len(events) == 0:
                    raise ValueError(f"clip {clip_id} has no usable event t0 in its clip index (t0={t0!r})")
                chosen = events[:1] if t0 == "first_event" else events
                self.samples.extend(Sample(clip_id, int(event)) for event in chosen)
        else:
            raise ValueError(f"t0 must be 'keyframe', 'first_event', 'all_events' or microseconds, got {t0!r}")

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        sample = self.samples[index]
        return f"clip {sample.clip_id} at t0_us={sample.t0_us}"

    def stem(self, index: int) -> str:
        """`<clip id>@<t0 in microseconds>`."""
        sample = self.samples[index]
        return f"{sample.clip_id}@{sample.t0_us}"

    def load(self, index: int) -> Clip:
        sample = self.samples[index]
        return self.dataset.read(sample.clip_id, sample.t0_us, **self.read_options).clip


class ClipFileSource:
    """`.npz` clip files: a directory's `*.npz` in name order, or the given paths in their order.
    `load_options` go to `load_clip` (counts)."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], **load_options):
        if isinstance(paths, (str, os.PathLike)):
            directory = Path(paths)
            if not directory.is_dir():
                raise FileNotFoundError(f"clip directory not found: {directory}")
            self.paths = sorted(directory.glob("*.npz"))
            if not self.paths:
                raise FileNotFoundError(f"no .npz clip files in {directory}")
        else:
            self.paths = [Path(path) for path in paths]
        stems = [path.stem for path in self.paths]
        repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
        if repeated:
            raise ValueError(f"several clip files named {repeated}; samples are named after their files")
        self.load_options = load_options

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return str(self.paths[index])

    def stem(self, index: int) -> str:
        """The file's stem (file names must then be unique: checked at construction)."""
        return self.paths[index].stem

    def load(self, index: int) -> Clip:
        return load_clip(self.paths[index], **self.load_options)


class BatchIterator:
    """Lists of clips in a seeded order (see the module docstring).

    `batch_size` is the global batch (all processes together), a multiple of `process_count`;
    each iteration yields this process's batch_size / process_count clips. `shuffle=False`
    keeps the source order. `drop_remainder` drops an epoch's last, incomplete global batch
    (training; then the order is exactly `BatchOrder`'s); without it the last batch is short
    and may leave some processes fewer or no clips (evaluation: every sample once per epoch).
    `num_epochs=None` runs forever. `process_index` / `process_count` default to JAX's.
    `num_workers` threads load up to `prefetch` batches ahead (0 workers: load in the calling
    thread)."""

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
        start_batch: int = 0,
        num_workers: int = 4,
        prefetch: int = 2,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size must be a positive multiple of process_count ({process_count}), "
                             f"got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
        num_samples = len(source)
        if num_samples == 0:
            raise ValueError("the source has no samples")
        if drop_remainder and num_samples < batch_size:
            raise ValueError(f"{num_samples} sample(s) cannot fill one batch of {batch_size}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        if start_batch < 0 or num_workers < 0 or prefetch < 1:
            raise ValueError("start_batch >= 0, num_workers >= 0 and prefetch >= 1 are required")
        self.source, self.batch_size, self.seed, self.shuffle = source, batch_size, seed, shuffle
        self.drop_remainder, self.num_epochs, self.start_batch = drop_remainder, num_epochs, start_batch
        self.num_workers, self.prefetch = num_workers, prefetch
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        self.batches_per_epoch = (num_samples // batch_size if drop_remainder
                                  else -(-num_samples // batch_size))
        # The epoch permutations: BatchOrder with one batch per epoch serves epoch e's whole order.
        self._epoch_order = BatchOrder(num_samples, num_samples, seed, shuffle=shuffle)
        self._cached_epoch: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """Batches this iterator yields (from `start_batch`); only for a finite `num_epochs`."""
        if self.num_epochs is None:
            raise TypeError("an iterator with num_epochs=None has no length")
        return max(0, self.num_epochs * self.batches_per_epoch - self.start_batch)

    def global_batch(self, k: int) -> list[int]:
        """Sample indices of global batch k of the run, all processes' rows in order."""
        epoch, j = divmod(k, self.batches_per_epoch)
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            self._cached_epoch = (epoch, self._epoch_order(epoch))
        order = self._cached_epoch[1]
        return order[j * self.batch_size:(j + 1) * self.batch_size]

    def local_batch(self, k: int) -> list[int]:
        """This process's sample indices of global batch k: its contiguous slice."""
        start = self.process_index * self.local_batch_size
        return self.global_batch(k)[start:start + self.local_batch_size]

    def __iter__(self) -> Iterator[list[Clip]]:
        stop = None if self.num_epochs is None else self.num_epochs * self.batches_per_epoch
        ks = iter(range(self.start_batch, stop)) if stop is not None else itertools.count(self.start_batch)
        if self.num_workers == 0:
            for k in ks:
                yield [self._load(k, i) for i in self.local_batch(k)]
            return
        pool = concurrent.futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix="clip-loader")
        pending: collections.deque = collections.deque()
        try:
            for k in ks:
                pending.append((k, [pool.submit(self._load, k, i) for i in self.local_batch(k)]))
                if len(pending) > self.prefetch:
                    yield _results(*pending.popleft())
            while pending:
                yield _results(*pending.popleft())
        finally:
            for _, futures in pending:
                for future in futures:
                    future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def _load(self, k: int, index: int) -> Clip:
        try:
            return self.source.load(index)
        except Exception as error:
            raise SampleError(f"batch {k}: {self.source.name(index)}: {error}") from error


def _results(k: int, futures: list[concurrent.futures.Future]) -> list[Clip]:
    return [future.result() for future in futures]


def place_batch(tree, mesh, *, logical_axis: str = "batch"):
    """Host-local arrays -> global `jax.Array`s on `mesh`, split along their leading axis.

    Every leaf of `tree` (numpy arrays with a leading batch axis: this process's rows of the global
    batch, e.g. the collated `local_batch`) becomes one global array whose leading dimension is
    placed by `logical_axis` through the sharding table (`sharding.LOGICAL_RULES`: batch -> data),
    the other dimensions replicated; each process contributes its own rows
    (`jax.make_array_from_process_local_data`), so the global leading dimension is the sum over
    processes."""
    import jax
    from jax.sharding import NamedSharding

    from alpamayo_jax.sharding import partition_spec

    def place(leaf):
        local = np.asarray(leaf)
        if local.ndim == 0:
            raise ValueError("place_batch: every leaf needs a leading batch axis, got a scalar")
        spec = partition_spec((logical_axis,) + (None,) * (local.ndim - 1))
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)

    return jax.tree.map(place, tree)
