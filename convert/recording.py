"""What the fixture recorders (`record_*_fixture.py`) share: no network while NVIDIA's code runs,
and the record of what produced a fixture (versions, reference commit, command)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def _refuse(*args, **kwargs):
    raise OSError("network access is disabled while recording the fixture")


def refuse_network() -> None:
    """Hugging Face offline, and every socket connection an error: a recording reads only local files."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    socket.socket.connect = _refuse  # type: ignore[method-assign]
    socket.create_connection = _refuse  # type: ignore[assignment]


def reference_commit(tree: str | Path) -> str:
    """The git commit of NVIDIA's source tree, or "unknown" where it is no checkout."""
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=False,
                            capture_output=True, text=True)
    return commit.stdout.strip() or "unknown"


def write_record(out: Path, record: dict, *, packages: tuple[str, ...], commit: str, command: str) -> None:
    """OUT/reference.json: `record` with the versions of Python and `packages`, the reference's
    commit and the command (`command` followed by this process's arguments)."""
    versions = {"python": platform.python_version(), **{name: metadata.version(name) for name in packages},
                "alpamayo_reference_commit": commit}
    record = {**record, "versions": {**versions, **record.get("versions", {})},
              "command": command + " " + " ".join(sys.argv[1:])}
    (out / "reference.json").write_text(json.dumps(record, indent=1) + "\n")
