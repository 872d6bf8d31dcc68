"""The persistent compilation cache: compiled programs kept on disk, so that a new process loads
them instead of compiling them again.

    setup_compilation_cache()          # ALPAMAYO_JAX_CACHE_DIR, else JAX's own setting, else the default
    setup_compilation_cache("off")     # no persistent cache
    setup_compilation_cache("/fast/disk/xla")

The command line calls `setup_compilation_cache(args.compilation_cache)` before anything
compiles (`--compilation-cache DIR|off`); a library user calls it explicitly, once, before the
first compilation (importing alpamayo_jax changes no JAX setting). Where the cache lives, first
match wins:

1. the argument (the `--compilation-cache` flag): a directory, or "off" / "" for none;
2. the `ALPAMAYO_JAX_CACHE_DIR` environment variable, the same values;
3. a directory JAX was already given (`JAX_COMPILATION_CACHE_DIR`, `jax_compilation_cache_dir`);
4. `$XDG_CACHE_HOME/alpamayo-jax/xla`, by default `~/.cache/alpamayo-jax/xla` (created private
   to the user; if it cannot be created, the run goes on without a cache, with a warning).

Every program is written, however small or quick to compile (both of JAX's thresholds are set
to zero), so the tiny model's programs are cached as well as the 10B model's. Entries are keyed
by the program, its shapes and shardings, the compile options, the devices and the jax/jaxlib
versions: a cache directory can be shared by models, shapes and versions, and a stale entry is
never used. `count_compilations` tells what a block of code compiled and what it loaded.

Several processes may share one directory. JAX (0.10.2) writes an entry in place, not through a
temporary file and a rename, and skips keys that exist: two processes compiling the same program
write the same key, and a process reading an entry that another is still writing, or one left
truncated by a killed writer, gets a warning from JAX ("Error reading persistent compilation
cache entry") and compiles that program itself. Results are never affected; delete the
directory to drop a truncated entry. The cache is trusted code: do not point it at a directory
others can write to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax

ENV_VAR = "ALPAMAYO_JAX_CACHE_DIR"
OFF = "off"

# jax.monitoring events (jax/_src/dispatch.py and compiler.py of jax 0.10.2). The backend event
# brackets every compilation request that reached XLA, answered from the persistent cache or not.
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"  # loaded from the persistent cache
_CACHE_WRITE = "/jax/compilation_cache/cache_misses"  # compiled and written to it


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/alpamayo-jax/xla`, or `~/.cache/alpamayo-jax/xla`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "alpamayo-jax" / "xla"


def _is_off(value: str) -> bool:
    return value.strip().lower() in ("", OFF)


def _resolve(setting: str | os.PathLike | None) -> tuple[Path | None, bool]:
    """(directory or None for off, whether it was asked for rather than the default)."""
    for value in (setting, os.environ.get(ENV_VAR)):
        if value is not None:
            return (None, True) if _is_off(os.fspath(value)) else (Path(value).expanduser(), True)
    configured = jax.config.jax_compilation_cache_dir
    return (Path(configured).expanduser(), True) if configured else (default_cache_dir(), False)


def resolve_cache_dir(setting: str | os.PathLike | None = None) -> Path | None:
    """The directory `setup_compilation_cache(setting)` would use (precedence in the module
    docstring), or None for no cache. Creates nothing."""
    return _resolve(setting)[0]


def setup_compilation_cache(setting: str | os.PathLike | None = None) -> Path | None:
    """Turns JAX's persistent compilation cache on in the directory `resolve_cache_dir(setting)`,
    or off; returns the directory, or None when off. Call it before the first compilation; called
    later, it applies to the programs compiled from then on.

    Raises OSError when a directory that was asked for (argument, environment variable, JAX's
    setting) cannot be created or written; the default one falls back to no cache, with a
    warning."""
    path, explicit = _resolve(setting)
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True, **({} if explicit else {"mode": 0o700}))
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(f"{path} is not writable")
        except OSError as error:
            if explicit:
                raise OSError(f"compilation cache directory {path}: {error}") from None
            warnings.warn(f"no persistent compilation cache: cannot use {path} ({error}); set {ENV_VAR} to "
                          f"another directory, or to '{OFF}'", stacklevel=2)
            path = None
    jax.config.update("jax_compilation_cache_dir", None if path is None else str(path))
    if path is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # every size, no platform override
    # JAX decides once per process whether the cache is used, at the first compilation: start
    # that decision over, so that a call after a compilation still takes effect.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    return path


@dataclasses.dataclass
class CompilationCount:
    """What XLA was asked for while `count_compilations` was active: each program by name, and
    whether it came from the persistent cache."""

    programs: list[tuple[str, bool]] = dataclasses.field(default_factory=list)  # (name, from cache)
    cache_writes: int = 0  # programs compiled and written to the persistent cache
    seconds: float = 0.0  # compiling or loading them

    @property
    def compiled(self) -> list[str]:
        """The programs XLA compiled (not found in the persistent cache)."""
        return [name for name, hit in self.programs if not hit]

    @property
    def loaded(self) -> list[str]:
        """The programs loaded from the persistent cache."""
        return [name for name, hit in self.programs if hit]


@contextlib.contextmanager
def count_compilations() -> Iterator[CompilationCount]:
    """Counts the XLA compilations of the block (`jax.monitoring` events, all threads): every
    program that was not already compiled in this process, compiled or loaded from the persistent
    cache. Programs this process already holds in memory are not counted."""
    count = CompilationCount()
    lock = threading.Lock()
    pending_hits = [0]

    def on_event(event: str, **_) -> None:
        with lock:
            if event == _CACHE_HIT:
                pending_hits[0] += 1
            elif event == _CACHE_WRITE:
                count.cache_writes += 1

    def on_duration(event: str, seconds: float, *, fun_name: str = "?", **_) -> None:
        if event != _BACKEND_COMPILE:
            return
        with lock:  # the hit of a request is recorded inside its backend bracket, before it closes
            hit = pending_hits[0] > 0
            pending_hits[0] -= hit
            count.programs.append((fun_name, hit))
            count.seconds += seconds

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_listener(on_event)
        jax.monitoring.unregister_event_duration_listener(on_duration)
