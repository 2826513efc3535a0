"""The run summary's plan section, and the default run's strategy."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fedlora_jax import cli, plan_report, strategies
from fedlora_jax.config import RunConfig, load_config
from tests import compile_cache


@pytest.fixture(scope="module", autouse=True)
def _cache():
    compile_cache.enable()


def test_the_default_is_adaptive_and_every_baseline_one_flag_away():
    # ``adaptive`` learns the embedded task stably (docs/results.md, sections 4-5)
    assert RunConfig().strategy == load_config().strategy == "adaptive"
    for name in strategies.STRATEGIES:
        assert load_config(overrides=[f"strategy={name}"]).strategy == name
    assert load_config(overrides=["strategy=fixed", "federation.sketch_ratio=0.25"]
                       ).federation.sketch_ratio == 0.25
    with pytest.raises(ValueError, match="contradicts strategy 'adaptive'"):
        load_config(overrides=["federation.sketch_ratio=0.25"])
    # the presets for tests and the papers' settings keep ``fixed``
    assert load_config(preset="tiny").strategy == "fixed"


@pytest.mark.slow
def test_the_default_run_writes_adaptive_and_prints_its_plan(tmp_path, capsys):
    """``fedlora-jax run`` with no options but two rounds (the pilot: no solve yet): MiniLM on the
    builtin data, ``adaptive`` in config.json, the pilot's uniform plan in the summary."""
    assert cli.main(["run", "--rounds", "2", "--quiet", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["strategy"] == "adaptive"
    assert "plan (in use from round 1)" in out and "expected participants  5.00 of 10" in out
    assert "k_n (rank 8: clients)  8: 10" in out


def test_simulated_round_s_averages_the_rounds_since_the_plan():
    clock = [0.0, 1.0, 3.0, 6.0, 10.0]  # rounds 1-4 took 1, 2, 3, 4 s
    history = [{"round": r, "sim_clock_s": c} for r, c in enumerate(clock)]
    assert plan_report.simulated_round_s(history, 3) == (3.5, 2)
    assert plan_report.simulated_round_s(history[::-1], 1) == (2.5, 4)  # row order does not matter


def test_last_planned_is_the_strategys_last_due_round():
    adaptive = strategies.get_strategy("adaptive")  # pilot rounds 1-2, solves at 3, 8, 13, 18
    assert [plan_report.last_planned(adaptive, n) for n in (1, 2, 3, 7, 8, 20)] == [1, 1, 3, 3, 8, 18]
    assert plan_report.last_planned(strategies.get_strategy("fixed"), 20) == 1


def test_adaptive_run_writes_adaptive_and_prints_its_plan(tmp_path, capsys):
    """``adaptive`` on the tiny preset, every client at q = 1 (the pilot's uniform plan):
    participation is certain, so the solver's predicted round time must equal the engine's
    simulated clock (an independent implementation of the same time model)."""
    code = cli.main(["run", "--preset", "tiny", "--strategy", "adaptive", "--rounds", "2",
                     "--quiet", "--set",
                     "federation.participants=16", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert json.loads((tmp_path / "config.json").read_text())["strategy"] == "adaptive"
    assert "plan (in use from round 1)" in out and "expected participants  16.00 of 16" in out
    assert "k_n (rank 4: clients)  4: 16" in out
    predicted, simulated = map(float, re.search(
        r"round time\s+predicted (\S+) s, simulated (\S+) s \(mean of 2 rounds\)", out).groups())
    np.testing.assert_allclose(predicted, simulated, rtol=1e-3)
    assert re.search(r"held-out accuracy\s+\d\.\d{4} at round 2 \(best", out)
