"""The package's layering and its declared dependencies, read from the source (no imports run).

Layers, bottom up: `nn/` (shared layers) and `models/` (pure modules, no loops) know nothing of
`inference/` (what loops or samples) or `io/` (files); `sharding.py` (the placement table) knows
nothing of `io/`. Every runtime dependency that `pyproject.toml` declares is imported by the
library itself, and the library never imports torch or transformers."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "alpamayo_jax"

# distribution name -> the module it installs
IMPORT_NAMES = {"orbax-checkpoint": "orbax.checkpoint", "pillow": "PIL", "jinja2": "jinja2", "ml_dtypes": "ml_dtypes"}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, at any depth (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def library_files(*parts: str) -> list[Path]:
    base = PACKAGE.joinpath(*parts)
    return [base] if base.suffix == ".py" else sorted(base.rglob("*.py"))


@pytest.mark.parametrize("layer, forbidden", [
    ("models", ("alpamayo_jax.inference", "alpamayo_jax.io")),
    ("nn", ("alpamayo_jax.inference", "alpamayo_jax.io", "alpamayo_jax.models")),
    ("sharding.py", ("alpamayo_jax.io",)),
])
def test_lower_layers_do_not_import_higher_ones(layer, forbidden):
    files = library_files(layer)
    assert files
    offending = {f"{path.relative_to(ROOT)} imports {name}" for path in files for name in imported_modules(path)
                 if name.startswith(forbidden)}
    assert not offending, sorted(offending)


def test_every_runtime_dependency_is_used_and_no_reference_framework_is():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    distributions = [re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].strip() for requirement in declared]
    imported = set().union(*(imported_modules(path) for path in library_files("")))
    top_level = {name.split(".")[0] for name in imported}
    unused = [d for d in distributions
              if not any(n == IMPORT_NAMES.get(d, d) or n.startswith(IMPORT_NAMES.get(d, d) + ".") for n in imported)]
    assert not unused, f"declared in pyproject.toml but never imported by alpamayo_jax/: {unused}"
    assert not top_level & {"torch", "transformers"}, "alpamayo_jax/ must stay pure JAX"
