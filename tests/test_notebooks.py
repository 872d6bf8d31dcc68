"""The notebooks run top to bottom on the tiny model (their code cells, in order, in one namespace)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, capsys):
    monkeypatch.chdir(path.parents[1])  # notebooks refer to the repository's fixtures
    namespace: dict = {"__name__": "__main__"}
    for index, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}[cell {index}]", "exec"), namespace)
    print(capsys.readouterr().out)


def test_there_is_a_notebook():
    assert NOTEBOOKS, f"no notebooks in {Path(__file__).parents[1] / 'notebooks'}"  # else nothing above runs
