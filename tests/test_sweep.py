"""``fedlora-jax sweep``: one run per grid point, one table and plot, resumable (only with the
same settings), strict keys."""

import csv
import json

import pytest

from fedlora_jax.cli import main
from fedlora_jax.commands.sweep import parse_grid, point_seed, points
from tests import compile_cache

# Two points of one shape: the sweep packs them into one program (the tiny preset's 16 clients).
GRID = ["--grid", "clients=16", "--grid", "sketch_ratio=0.5,1", "--rounds", "1",
        "--set", "federation.participants=4", "--set", "eval_every=1"]


def test_grid_parsing_and_seeds():
    grid = parse_grid(["clients=1e2,1e6", "bandwidth=1e6,2e7", "strategy=fixed"])
    assert grid == {"clients": [100, 10**6], "bandwidth": [1e6, 2e7], "strategy": ["fixed"]}
    pts = points(grid)
    assert len(pts) == 4 and pts[0] == {"clients": 100, "bandwidth": 1e6, "strategy": "fixed"}
    seeds = [point_seed(p, 0) for p in pts]
    assert len(set(seeds)) == 4  # each point its own seed ...
    alone = points({"clients": [10**6], "bandwidth": [2e7], "strategy": ["fixed"]})[0]
    assert point_seed(pts[3], 0) == point_seed(alone, 0)  # ... fixed by its values


def test_sweep_writes_one_table_and_resumes(tmp_path, capsys):
    compile_cache.enable()
    out = tmp_path / "sweep"
    assert main(["sweep", *GRID, "--output-dir", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["clients"], r["sketch_ratio"]) for r in rows] == [(16, 0.5), (16, 1.0)]
    assert all(r["rounds"] == 1 and 0 <= r["final_eval_accuracy"] <= 1 for r in rows)
    assert rows[0]["seed"] != rows[1]["seed"]
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["sketch_ratio"]) for r in table] == [0.5, 1.0]
    assert (out / "sweep.png").stat().st_size > 0
    # Resume: finished points are read back, not rerun (a marked result survives the rerun).
    first = out / "points" / rows[0]["point"] / "result.json"
    marked = {**rows[0], "final_eval_accuracy": -1.0}
    first.write_text(json.dumps(marked))
    capsys.readouterr()
    assert main(["sweep", *GRID, "--output-dir", str(out)]) == 0
    assert capsys.readouterr().out.count("(done, skipped)") == 2
    assert json.loads((out / "sweep.json").read_text())[0]["final_eval_accuracy"] == -1.0
    # Other settings: every point runs again.
    assert main(["sweep", *GRID, "--rounds", "2", "--output-dir", str(out)]) == 0
    assert "(done, skipped)" not in capsys.readouterr().out
    assert [r["rounds"] for r in json.loads((out / "sweep.json").read_text())] == [2, 2]


@pytest.mark.parametrize("grid, message", [
    ("client=100", "Unknown grid key 'client'. Did you mean 'clients'?"),
    ("sketch_ration=0.5", "Did you mean 'sketch_ratio'?"),
    ("clients=1.5", "clients: '1.5' is not an integer"),
    ("clients", "must look like KEY=V1,V2"),
    ("strategy=adaptve", "Did you mean 'adaptive'?"),
    ("sketch_ratio=0.5,2", "sketch_ratio must be in"),
])
def test_bad_grid_fails_before_any_run(tmp_path, capsys, grid, message):
    out = tmp_path / "bad"
    assert main(["sweep", "--grid", grid, "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
