"""The notebooks run top to bottom (nbclient, a fresh kernel) at their small default settings and
produce their figures; all four are in the default run (about 20-60 s each on a 2-core CPU)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests import compile_cache

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

CASES = [
    pytest.param("sketch_ratio", ["sketch_ratio.png"]),
    pytest.param("sampling_probability", ["sampling_probability.png"]),
    pytest.param("bandwidth", ["bandwidth_round_times.png", "bandwidth_allocation.png"]),
    pytest.param("wallclock_comparison", ["wallclock_comparison.png"]),
]


def test_every_notebook_is_tested():
    assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} == {c.values[0] for c in CASES}


@pytest.mark.parametrize("name, figures", CASES)
def test_notebook_runs_and_plots(name, figures, tmp_path, monkeypatch):
    compile_cache.enable()
    monkeypatch.setenv("FEDLORA_NOTEBOOK_OUT", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    for figure in figures:
        assert (tmp_path / name / figure).stat().st_size > 10_000, figure
    shown = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
             if "image/png" in o.get("data", {})]
    assert len(shown) == len(figures)
