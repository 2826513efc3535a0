"""``fedlora-jax compare``: the protocol's pieces on synthetic runs, the validation/test split, a
tuning stage that never reads the test split, and an end-to-end run."""

import csv
import json
import re

import numpy as np
import pytest

from fedlora_jax import rundir, stats
from fedlora_jax.cli import build_parser, main
from fedlora_jax.commands import compare
from fedlora_jax.commands.compare import Setting
from tests import compile_cache


def _rows(accs, dt=2.0):
    rows = [{"round": 0, "sim_clock_s": 0.0, "eval_accuracy": accs[0]}]
    rows += [{"round": r, "sim_clock_s": dt * r, "eval_accuracy": a, "participants": 4,
              "mean_rank": 2.0, "round_total_s": dt} for r, a in enumerate(accs[1:], 1)]
    return rows


def test_time_to_target_and_accuracy_read_the_evaluations():
    rows = _rows([0.1, 0.3, 0.5, 0.4, 0.7])
    assert compare.time_to_target(rows, 0.5) == 4.0
    assert compare.time_to_target(rows, 0.8) == np.inf
    assert compare.accuracy_at(rows, 5.0) == 0.5 and compare.accuracy_at(rows, 100.0) == 0.7
    rows[2].pop("eval_accuracy")  # not evaluated that round
    assert compare.time_to_target(rows, 0.5) == 8.0
    assert compare.budget_score(rows, 8.0) == pytest.approx((0.1 * 2 + 0.3 * 4 + 0.4 * 2) / 8)
    # rounds 0, 1, 3, 4 evaluated: the trapezoids' area over the 4 rounds
    assert compare.rounds_score(rows, 8.0) == pytest.approx(
        ((0.1 + 0.3) / 2 + (0.3 + 0.4) / 2 * 2 + (0.4 + 0.7) / 2) / 4)


def test_tuning_on_the_budget_picks_the_best_mean_validation_area():
    low, high = Setting(1e-3, None), Setting(1e-2, None)
    trials = {"a": {low: {0: _rows([0.1, 0.2, 0.3]), 1: _rows([0.1, 0.2, 0.3])},
                    high: {0: _rows([0.1, 0.6, 0.2]), 1: _rows([0.1, 0.1, 0.1])}},
              "b": {low: {0: _rows([0.1, 0.5, 0.5])}, high: {0: _rows([0.1, 0.5, 0.5])}}}
    table, chosen = compare.tuning_table(trials, budget=4.0, tune_score="budget")
    # a: low scores (0.1 + 0.2) / 2 = 0.15 on both seeds; high (0.35 + 0.1) / 2 = 0.225
    assert chosen == {"a": high, "b": low}  # b ties: the first setting
    assert [r["validation_score"] for r in table] == ["0.1500", "0.2250", "0.3000", "0.3000"]
    assert [r["chosen"] for r in table] == ["", "yes", "yes", ""]


def _peak_then_collapse(rounds=20, dt=0.4):
    """Two steps' trials on one tuning seed, rounds of ``dt`` s (section 8 of docs/results.md):
    the large step peaks at round 4-6 and falls to the majority class (0.32) after round 6; the
    smaller one rises steadily (linearly, a slow learner) to 0.61."""
    collapse = [0.17, 0.32, 0.45, 0.52, 0.54, 0.54, 0.52] + [0.32] * (rounds - 6)
    stable = list(np.linspace(0.17, 0.61, rounds + 1))
    return {Setting(1.0, None): {0: _rows(collapse, dt)},
            Setting(0.3, None): {0: _rows(stable, dt)}}


def test_the_rounds_score_picks_the_stable_step_over_an_early_peak_that_collapses():
    trials = {"slow": _peak_then_collapse(dt=0.4), "fast": _peak_then_collapse(dt=0.1)}
    budget = 20 * 0.1  # the fast strategy's whole run
    # the budget sees the slow strategy's first 5 rounds, where the large step leads
    assert compare.tuning_table(trials, budget, "budget")[1] == {
        "slow": Setting(1.0, None), "fast": Setting(0.3, None)}
    table, chosen = compare.tuning_table(trials, budget, "rounds")
    assert chosen == {"slow": Setting(0.3, None), "fast": Setting(0.3, None)}
    dense = np.linspace(0, 20, 20001)  # the curves' mean over the rounds, by dense sampling
    for row in table:
        accs = [r["eval_accuracy"] for r in trials[row["strategy"]][Setting(row["client_lr"],
                                                                            None)][0]]
        reference = np.interp(dense, np.arange(21), accs).mean()
        assert float(row["validation_score"]) == pytest.approx(reference, abs=1e-4)


def test_a_budget_score_over_under_a_third_of_a_strategys_rounds_is_warned_about():
    slow, fast = _peak_then_collapse(dt=0.4), _peak_then_collapse(dt=0.1)
    runs = {name: [by_seed[0] for by_seed in trials.values()]
            for name, trials in (("slow", slow), ("fast", fast))}
    lines = []
    found = compare.roundless("tuning", runs, budget=2.0, log=lines.append,
                              coverage=compare.COVERAGE)
    assert found == [{"stage": "tuning", "strategy": "slow", "runs": 2, "of": 2,
                      "rounds_within": 5, "rounds": 20, "round_s": 0.4, "budget_s": 2.0}]
    assert lines == ["compare: warning: slow completes under 33% of its 20 rounds (as few as 5) "
                     "within the tuning budget of 2 s on 2 of its 2 tuning runs, so its tuning "
                     "score sees its start only; --tune-score rounds scores every trial over "
                     "all its rounds."]
    edge = compare.roundless("tuning", runs, budget=2.5, log=lines.append,
                             coverage=compare.COVERAGE)  # 6 of 20 rounds: under a third
    assert [(w["strategy"], w["rounds_within"]) for w in edge] == [("slow", 6)]
    assert compare.roundless("tuning", runs, budget=2.9, log=lines.append,
                             coverage=compare.COVERAGE) == []  # 7 of 20: not under a third
    assert compare.roundless("tuning", runs, budget=2.0, log=lines.append) == []  # rounds score
    assert len(lines) == 2


def _synthetic_runs():
    """Two strategies over 3 seeds; 'fast' reaches 0.6 at 2 s on every seed, 'slow' at 6 s on
    seed 0 and never on the others (censored at the 8 s budget)."""
    return {"fast": {s: _rows([0.1, 0.6, 0.7, 0.7, 0.7]) for s in range(3)},
            "slow": {0: _rows([0.1, 0.2, 0.3, 0.6, 0.6]), 1: _rows([0.1, 0.2, 0.3, 0.4, 0.5]),
                     2: _rows([0.1, 0.1, 0.1, 0.1, 0.1])}}


def test_summary_counts_misses_at_the_budget(tmp_path):
    runs = _synthetic_runs()
    settings = {"fast": Setting(1e-2, 1.0), "slow": Setting(1e-3, None)}
    fast, slow = compare.summarize(runs, settings, target=0.6, budget=8.0)
    assert fast["reached"] == "3/3" and slow["reached"] == "1/3"
    assert fast["time_to_target_s"] == "2 [2, 2]"
    restricted = stats.mean_ci([6.0, 8.0, 8.0])
    assert slow["time_to_target_s"] == str(restricted) and restricted.mean == pytest.approx(22 / 3)
    assert slow["accuracy_at_4s"] == str(stats.mean_ci([0.3, 0.3, 0.1]))
    assert slow["server_lr"] == "-" and fast["participants"] == "4" and fast["round_s"] == "2"
    compare.write_table([fast, slow], tmp_path, "summary", ["header line"])
    with open(tmp_path / "summary.csv") as f:
        assert [r["strategy"] for r in csv.DictReader(f)] == ["fast", "slow"]
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("header line\n") and "| fast | 0.01 | 1.0 | 3/3 |" in md


def test_paired_table_and_strongest_baseline():
    runs = _synthetic_runs()
    (row,) = compare.paired_table(runs, "fast", target=0.6, budget=8.0)
    logs = np.log(np.array([2.0, 2.0, 2.0]) / [6.0, 8.0, 8.0])
    assert row["baseline"] == "slow" and row["fast_faster"] == "1.00" and row["ties"] == "0.00"
    assert row["mean_log_ratio"] == str(stats.mean_ci(logs))
    assert compare.strongest(runs, "fast", 8.0) == {"2s": "slow (0.1667)", "4s": "slow (0.2333)",
                                                    "8s": "slow (0.4000)"}


def test_a_strategy_whose_first_round_outlasts_the_budget_is_warned_about():
    runs = {"slow": [_rows([0.1, 0.5], dt=5.0), _rows([0.1, 0.5], dt=3.0)],
            "fast": [_rows([0.1, 0.5], dt=1.0)], "mixed": [_rows([0.1, 0.5]), _rows([0.1, 0.5], dt=4.0)]}
    lines = []
    found = compare.roundless("tuning", runs, budget=2.5, log=lines.append)
    assert found == [{"stage": "tuning", "strategy": "slow", "runs": 2, "of": 2,
                      "rounds_within": 0, "rounds": 1, "round_s": 3.0, "budget_s": 2.5},
                     {"stage": "tuning", "strategy": "mixed", "runs": 1, "of": 2,
                      "rounds_within": 0, "rounds": 1, "round_s": 4.0, "budget_s": 2.5}]
    assert lines[0] == ("compare: warning: slow's first round takes 3 s or more on 2 of its 2 "
                        "tuning runs, past the tuning budget of 2.5 s: it completes no round "
                        "there, so its result is degenerate; a longer --budget (or more "
                        "--rounds) fixes it.")
    assert compare.roundless("reporting", runs, budget=5.0, log=lines.append) == [] and len(lines) == 2


@pytest.mark.parametrize("show_seeds", [False, True])
def test_the_curve_figure_draws_one_line_and_band_per_strategy(show_seeds):
    runs = _synthetic_runs()
    fig = compare.curve_figure(runs, "sim_clock_s", np.linspace(0, 8, 17), 0.6,
                               show_seeds=show_seeds)
    ax = fig.axes[0]
    labelled = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in labelled] == ["fast (3 seeds)", "slow (3 seeds)"]
    np.testing.assert_allclose(labelled[1].get_ydata(), np.mean(
        [stats.step_value(*compare.curve(r), np.linspace(0, 8, 17)) for r in runs["slow"].values()],
        axis=0))
    assert len(ax.collections) == 2  # one CI band each
    seed_lines = len(ax.get_lines()) - len(labelled) - 1  # minus the target line
    assert seed_lines == (6 if show_seeds else 0)


def _tiny_args(tmp_path, *extra):
    return build_parser().parse_args(
        ["compare", "--preset", "tiny", "--rounds", "1", "--output-dir", str(tmp_path),
         "--strategies", "fedit", "--seeds", "3", "--tune-seeds", "7", "--lr-grid", "0.01",
         *extra])


def _rows_of(examples) -> set[bytes]:
    return {row.tobytes() for row in np.asarray(examples["input_ids"])}


def test_validation_split_is_disjoint_from_the_test_split():
    from fedlora_jax.config import DataConfig
    from fedlora_jax.build import evaluation_split

    heldout = {"input_ids": np.arange(202)[:, None], "labels": np.arange(202) % 7}
    owners = np.arange(202) % 5
    split = {part: evaluation_split(DataConfig(validation_fraction=0.3, evaluate_on=part), 4,
                                    heldout, owners) for part in ("validation", "test")}
    (val, val_owners), (test, test_owners) = split["validation"], split["test"]
    assert len(val["labels"]) == round(0.3 * 202) and len(test["labels"]) == 202 - 61
    assert not set(val["input_ids"][:, 0]) & set(test["input_ids"][:, 0])
    assert set(val["input_ids"][:, 0]) | set(test["input_ids"][:, 0]) == set(range(202))
    np.testing.assert_array_equal(val_owners, val["input_ids"][:, 0] % 5)  # rows stay together
    again, _ = evaluation_split(DataConfig(validation_fraction=0.3, evaluate_on="validation"), 4,
                                heldout, owners)
    np.testing.assert_array_equal(again["input_ids"], val["input_ids"])  # the seed fixes it
    other, _ = evaluation_split(DataConfig(validation_fraction=0.3, evaluate_on="validation"), 5,
                                heldout, owners)
    assert not np.array_equal(other["input_ids"], val["input_ids"])
    assert evaluation_split(DataConfig(), 4, heldout, owners) == (heldout, owners)  # no split


def test_a_seed_fixes_the_world_for_every_strategy_and_setting(tmp_path):
    import jax

    from fedlora_jax.build import build, make_profile

    protocol = compare.plan_protocol(_tiny_args(tmp_path, "--strategies", "fedit,adaptive"))
    a = build(protocol.config("fedit", Setting(0.01, 1.0), 3, "test"))
    b = build(protocol.config("adaptive", Setting(0.1, 1.0), 3, "test"))
    same = lambda x, y: all(jax.tree.leaves(jax.tree.map(np.array_equal, x, y)))
    assert same(a.heldout, b.heldout) and same(a.profile, b.profile)  # data split, network
    assert same(a.engine.pool.order, b.engine.pool.order)  # client split
    sa, sb = a.engine.init(), b.engine.init()
    assert same(sa.trainable, sb.trainable)  # initialization
    assert np.array_equal(jax.random.key_data(sa.key), jax.random.key_data(sb.key))  # sampling
    other = make_profile(protocol.config("fedit", Setting(0.01, 1.0), 4, "test"), 16)
    assert not same(a.profile, other)  # another seed, another world


def test_tuning_never_evaluates_on_the_test_split(tmp_path, monkeypatch):
    from fedlora_jax.engine import FederatedEngine
    from fedlora_jax.build import build

    compile_cache.enable()
    protocol = compare.plan_protocol(_tiny_args(tmp_path))
    evaluated = []
    original = FederatedEngine.evaluate
    monkeypatch.setattr(FederatedEngine, "evaluate", lambda self, state, examples, *a, **k: (
        evaluated.append(_rows_of(examples)) or original(self, state, examples, *a, **k)))
    cfgs = {(s, 7): protocol.config("fedit", s, 7, "validation") for s in protocol.grids["fedit"]}
    compare.run_configs(cfgs, tmp_path / "tuning.jsonl", log=lambda *_: None)
    monkeypatch.setattr(FederatedEngine, "evaluate", original)
    setting = protocol.grids["fedit"][0]
    validation = _rows_of(build(protocol.config("fedit", setting, 7, "validation")).heldout)
    test = _rows_of(build(protocol.config("fedit", setting, 7, "test")).heldout)
    assert len(evaluated) == 2  # rounds 0 and 1 of the one trial
    assert all(rows == validation for rows in evaluated)
    assert not any(rows & test for rows in evaluated)


def test_compare_end_to_end(tmp_path, capsys):
    compile_cache.enable()
    out = tmp_path / "cmp"
    rc = main(["compare", "--preset", "tiny", "--rounds", "2", "--strategies", "fedit,fslora",
               "--reference", "fslora", "--seeds", "3", "--tune-seeds", "7",
               "--lr-grid", "0.005", "--output-dir", str(out)])
    assert rc == 0
    for name in ("metrics.jsonl", "tuning.jsonl", "tuning.md", "summary.csv", "summary.md",
                 "paired.md", "accuracy_vs_clock.png", "accuracy_vs_round.png", "protocol.json"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["strategy"], r["seed"]) for r in rows} == {("fedit", 3), ("fslora", 3)}
    assert all("eval_accuracy" in r for r in rows)  # evaluated every round
    start = {r["strategy"]: r["eval_accuracy"] for r in rows if r["round"] == 0}
    assert start["fedit"] == start["fslora"]  # same model, data split and network
    clock = {r["strategy"]: r["sim_clock_s"] for r in rows if r["round"] == 2}
    assert 0 < clock["fslora"] < clock["fedit"]  # same sampling, smaller sketches
    tuning = [json.loads(line) for line in (out / "tuning.jsonl").read_text().splitlines()]
    assert {r["seed"] for r in tuning} == {7}
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["budget_s"] == pytest.approx(clock["fslora"])  # the shortest run
    assert protocol["tune_score"] == "rounds"  # the default
    assert (out / "tuning.md").read_text().startswith(
        "Validation score (--tune-score rounds): each trial's mean validation accuracy over all "
        "its rounds")
    printed = capsys.readouterr().out
    assert "| fedit | 0.005 | 1.0 |" in printed and "| baseline | fslora_faster |" in printed


def test_compare_records_a_budget_shorter_than_a_round(tmp_path, capsys):
    compile_cache.enable()
    assert main(["compare", "--preset", "tiny", "--rounds", "1", "--strategies", "fedit",
                 "--seeds", "3", "--tune-seeds", "7", "--lr-grid", "0.005", "--budget", "1e-6",
                 "--tune-score", "budget", "--output-dir", str(tmp_path)]) == 0
    first = {stage: [r["sim_clock_s"] for r in map(json.loads, (tmp_path / file).open())
                     if r["round"] == 1][0]
             for stage, file in (("tuning", "tuning.jsonl"), ("reporting", "metrics.jsonl"))}
    protocol = json.loads((tmp_path / "protocol.json").read_text())
    assert protocol["tune_score"] == "budget"
    assert (tmp_path / "tuning.md").read_text().startswith(
        "Validation score (--tune-score budget): each trial's mean validation accuracy over the "
        "first 1e-06 simulated seconds.")
    assert protocol["warnings"] == [{"stage": stage, "strategy": "fedit", "runs": 1, "of": 1,
                                     "rounds_within": 0, "rounds": 1, "round_s": first[stage],
                                     "budget_s": 1e-6} for stage in first]
    printed = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(printed) == 2 and all("fedit's first round takes" in line for line in printed)


def test_compare_reuses_only_runs_of_the_same_settings_and_code(tmp_path, capsys, monkeypatch):
    compile_cache.enable()
    args = ["compare", "--preset", "tiny", "--rounds", "1", "--strategies", "fedit", "--seeds", "3",
            "--tune-seeds", "7", "--lr-grid", "0.005", "--output-dir", str(tmp_path)]
    reused = lambda: capsys.readouterr().out.count("(finished before: reused)")
    assert main(args) == 0 and reused() == 0
    assert main(args) == 0 and reused() == 2  # the tuning run and the reporting run
    assert main([*args, "--set", "federation.participants=3"]) == 0 and reused() == 0  # other settings
    monkeypatch.setattr(rundir, "code_fingerprint", lambda: "other code")
    assert main([*args, "--set", "federation.participants=3"]) == 0 and reused() == 0
    history = rundir.config_history(tmp_path / "fedit" / "seed3")
    assert [entry["code"] for entry in history] == ["other code"]


@pytest.mark.parametrize("args, message", [
    (["--strategies", "adaptive,fedavg"], "Unknown strategy 'fedavg'.*Valid strategies"),
    (["--strategies", "fedit", "--set", "federation.sketch_ratio=0.25"],
     "contradicts strategy 'fedit': FedIT trains and uploads the full rank"),
    (["--seeds", "0,x"], "--seeds takes integers and ranges like 0-19, got 'x'"),
    (["--seeds", "0-3", "--tune-seeds", "3"], "--tune-seeds must be disjoint from --seeds"),
    (["--lr-grid", "0.01,-1"], "positive learning rates"),
    (["--validation-fraction", "1.5"], "data.validation_fraction must be in"),
    (["--tune-score", "area"], "--tune-score must be one of rounds, budget, got 'area'"),
])
def test_compare_rejects_bad_input_before_training(tmp_path, capsys, args, message):
    assert main(["compare", "--preset", "tiny", "--output-dir", str(tmp_path), *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "tuning.jsonl").exists()


def test_seed_lists_take_ranges():
    assert compare._parse_seeds("0,3,5-7", "seeds") == [0, 3, 5, 6, 7]
    with pytest.raises(ValueError, match="distinct"):
        compare._parse_seeds("1,0-2", "seeds")
