"""``fedlora-jax compare``: time to target, the table over seeds, plots, and an end-to-end run."""

import csv
import json
import re

import numpy as np
import pytest

from fedlora_jax.cli import main
from fedlora_jax.commands.compare import accuracy_at, summarize, time_to_target, write_table


def _rows(accs, dt=2.0):
    rows = [{"round": 0, "eval_accuracy": accs[0]}]
    rows += [{"round": r, "sim_clock_s": dt * r, "eval_accuracy": a}
             for r, a in enumerate(accs[1:], 1)]
    return rows


def test_time_to_target_is_the_first_evaluation_at_or_above_it():
    rows = _rows([0.1, 0.3, 0.5, 0.4, 0.7])
    assert time_to_target(rows, 0.5) == (4.0, 2)
    assert time_to_target(rows, 0.8) is None
    assert accuracy_at(rows, 5.0) == 0.5 and np.isnan(accuracy_at(rows[1:], 1.0))
    rows[2].pop("eval_accuracy")  # not evaluated that round
    assert time_to_target(rows, 0.5) == (8.0, 4)


def test_summary_reports_mean_and_spread_over_seeds_that_reached(tmp_path):
    runs = {"a": {0: _rows([0.1, 0.6, 0.7], dt=1.0), 1: _rows([0.1, 0.2, 0.6], dt=3.0)},
            "b": {0: _rows([0.1, 0.2, 0.3]), 1: _rows([0.1, 0.2, 0.3])}}
    table = summarize(runs, 0.6)
    a, b = table
    assert a["reached"] == "2/2" and b["reached"] == "0/2"
    assert a["time_to_target_s"] == f"{np.mean([1.0, 6.0]):.4g} ± {np.std([1.0, 6.0]):.2g}"
    assert a["rounds_to_target"].startswith("1.5 ±") and b["time_to_target_s"] == "-"
    budget = "accuracy_at_2s"  # the shortest run: 2 rounds of 1 s
    assert a[budget] == f"{np.mean([0.7, 0.1]):.4g} ± {np.std([0.7, 0.1]):.2g}"
    assert b[budget] == "0.2 ± 0"
    write_table(table, 0.6, tmp_path)
    with open(tmp_path / "time_to_target.csv") as f:
        assert [r["strategy"] for r in csv.DictReader(f)] == ["a", "b"]
    md = (tmp_path / "time_to_target.md").read_text()
    assert "Target held-out accuracy: 0.6000" in md and "| a | 2/2 |" in md


def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--preset", "tiny", "--rounds", "2", "--strategies", "fedit,fslora",
               "--seeds", "3", "--output-dir", str(out)])
    assert rc == 0
    for name in ("metrics.jsonl", "time_to_target.csv", "time_to_target.md",
                 "accuracy_vs_clock.png", "accuracy_vs_round.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["strategy"], r["seed"]) for r in rows} == {("fedit", 3), ("fslora", 3)}
    assert all("eval_accuracy" in r for r in rows)  # evaluated every round
    start = {(r["strategy"], r["seed"]): r["eval_accuracy"] for r in rows if r["round"] == 0}
    assert start[("fedit", 3)] == start[("fslora", 3)]  # same model, data split and network
    clock = {(r["strategy"], r["seed"]): r["sim_clock_s"] for r in rows if r["round"] == 2}
    assert all(t > 0 for t in clock.values())
    assert clock[("fslora", 3)] < clock[("fedit", 3)]  # same sampling, smaller sketches
    assert "| fedit |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--strategies", "adaptive,fedavg"], "Unknown strategy 'fedavg'.*Valid strategies"),
    (["--strategies", "fedit", "--set", "federation.sketch_ratio=0.25"],
     "contradicts strategy 'fedit': FedIT trains and uploads the full rank"),
    (["--seeds", "0,x"], "--seeds must be a comma-separated list"),
])
def test_compare_rejects_bad_input_before_training(tmp_path, capsys, args, message):
    assert main(["compare", "--preset", "tiny", "--output-dir", str(tmp_path), *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "metrics.jsonl").exists()
