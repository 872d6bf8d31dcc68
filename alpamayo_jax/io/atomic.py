"""Atomic writes: a file or a directory appears complete at its path, or not at all.

Both helpers write next to the target (same directory, so on the same file system) and rename the
result into place with `os.replace`, which is atomic on POSIX: readers see the old content or the
new one, never a partial write, and a failed or interrupted write leaves the target as it was.
These are the project's only atomic writers; everything that must not leave a half-written result
(clips, recorded inputs, result records, bundles) goes through them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Writes `path` through a temporary file in the same directory, renamed over `path` once
    complete, so that readers never see a partial file and a failed write leaves `path` as it was.

    `write(file)` writes the content to the binary file it is given; it is flushed and fsynced
    before the rename."""
    path = Path(path)
    # A unique name opened exclusively ("x"), so that the file gets the umask's permissions
    # rather than tempfile's private 0600.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory next to `out_dir`; on success it becomes `out_dir`, on any
    error it is removed. An existing `out_dir` raises FileExistsError unless `force`, checked
    before any work is done."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} already exists; pass force=True (--force) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, retired / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
