"""``benchmarks/regime_measured.py``: a cell sets what the map models, the MiniLM mode runs
section 6's reporting configs with only the cell changed, the measured side of a cell on
synthetic runs with known answers, and (slow) a 2-seed, 2-round sweep end to end, tuned and not."""

import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlora_jax import config as config_lib
from fedlora_jax.cli import build_parser
from fedlora_jax.commands import compare
from fedlora_jax.config import load_config
from tests import compile_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import regime_map  # noqa: E402
import regime_measured  # noqa: E402


@pytest.mark.parametrize("preset,clients", [("tiny", 16), ("default", 10)])
@pytest.mark.parametrize("name", sorted(regime_measured.CELLS))
def test_a_cell_sets_the_system_the_map_models(name, preset, clients):
    point = regime_measured.CELLS[name]
    cfg = load_config(preset=preset, overrides=regime_measured.overrides(point, clients))
    system, n, payload = regime_map.cell(point, clients)
    assert cfg.system == system and cfg.data.num_clients == n and payload == 1.0
    assert (cfg.system.cell_radius_m == point.get("cell_radius_m", 500.0)
            and cfg.system.bandwidth_hz == point.get("bandwidth_hz", 10e6)
            and cfg.data.num_clients == point.get("num_clients", clients))


@pytest.mark.parametrize("score,expected", [(None, "budget"), ("rounds", "rounds")])
def test_a_tiny_cell_is_tuned_with_the_given_score(score, expected):
    """``--tune-score`` reaches compare; without it the tiny cells keep section 3's score."""
    mode = regime_measured.MODES["tiny"]
    argv = regime_measured.compare_argv(mode, regime_measured.CELLS["radius_2000m"], Path("x"),
                                        num_clients=16, seeds="0-1", rounds=2,
                                        lr_grid=mode.lr_grid, tune_score=score)
    assert build_parser().parse_args(argv).tune_score == expected


def test_a_cell_outside_the_system_is_refused():
    with pytest.raises(ValueError, match="cell setting must be a field of wireless.SystemConfig"):
        regime_measured.overrides({"payload": 4.0}, 16)


RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "protocol_minilm"
# docs/results/regenerate.sh's MINILM protocol (section 6), its strategies narrowed to the mode's
SECTION_6 = ["compare", "--rounds", "20", "--seeds", "0-4", "--tune-seeds", "1000",
             "--strategies", "adaptive,fedit,hetlora", "--set", "eval_every=2", "--set",
             "checkpoint_every=0", "--lr-grid", "1.5e-3,5e-3,1.5e-2,4.5e-2"]


def _reporting_configs(argv: list[str], chosen: dict) -> dict:
    """Every reporting run's config of a compare command line at the chosen settings, without
    its output folder: ``(strategy, seed) -> config tree``."""
    protocol = compare.plan_protocol(build_parser().parse_args([*argv, "--output-dir", "x"]))
    trees = {}
    for name in protocol.names:
        for seed in protocol.seeds:
            tree = config_lib.to_dict(protocol.config(name, chosen[name], seed, "test"))
            trees[name, seed] = {k: v for k, v in tree.items() if k != "output_dir"}
    return trees


@pytest.mark.parametrize("name", ["preset", "bandwidth_1e9"])
def test_a_minilm_cell_runs_section_6s_reporting_configs_with_only_the_cell_changed(name):
    mode = regime_measured.MODES["minilm"]
    chosen, target = regime_measured.tuned_settings(RESULTS / "protocol.json",
                                                    ["adaptive", "fedit", "hetlora"])
    protocol = json.loads((RESULTS / "protocol.json").read_text())
    assert target == protocol["target"] and chosen["fedit"].client_lr == 0.005
    argv = regime_measured.compare_argv(mode, regime_measured.CELLS[name], Path("x"),
                                        num_clients=10, seeds=mode.seeds, rounds=mode.rounds,
                                        lr_grid=mode.lr_grid)
    assert "--lr-grid" not in argv  # not tuned at the cell
    cell = _reporting_configs(argv[:-2], chosen)
    section_6 = _reporting_configs(SECTION_6, chosen)
    assert cell.keys() == section_6.keys() and len(cell) == 15
    for key, tree in section_6.items():
        if name == "bandwidth_1e9":
            assert cell[key]["system"]["bandwidth_hz"] == 1e9 != tree["system"]["bandwidth_hz"]
            tree = {**tree, "system": {**tree["system"], "bandwidth_hz": 1e9}}
        assert cell[key] == tree


def test_untuned_settings_must_hold_every_strategy(tmp_path):
    (tmp_path / "protocol.json").write_text(json.dumps(
        {"target": 0.5, "chosen": {"adaptive": {"client_lr": 0.01, "server_lr": 1.0}}}))
    with pytest.raises(ValueError, match=r"chosen settings of \['fedit'\]"):
        regime_measured.tuned_settings(tmp_path / "protocol.json", ["adaptive", "fedit"])


def test_the_minilm_maps_estimates_are_those_adaptive_logged_in_section_6():
    with gzip.open(RESULTS / "metrics.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    runs = {}
    for row in rows:
        runs.setdefault(row["strategy"], {}).setdefault(row["seed"], []).append(row)
    g2, signal = regime_measured.estimates(runs["adaptive"])
    mode = regime_measured.MODES["minilm"]
    assert mode.g2 == pytest.approx(g2, abs=0.005) and mode.signal == pytest.approx(signal,
                                                                                  abs=0.0005)


def _rows(accs, **logged):
    """A run evaluated every round (2 simulated seconds each); ``logged`` adds per-round keys."""
    rows = [{"round": 0, "sim_clock_s": 0.0, "eval_accuracy": accs[0]}]
    return rows + [{"round": r, "sim_clock_s": 2.0 * r, "eval_accuracy": a, "participants": 4,
                    "mean_rank": 4.0, "round_total_s": 2.0, **logged}
                   for r, a in enumerate(accs[1:], 1)]


def test_measured_side_of_a_cell_on_known_runs(tmp_path):
    # target 0.6, budget 8 s: times to target per seed (a miss counts as 8)
    hit_at = {"adaptive": (2, 4), "fedit": (4, None), "fslora": (8, 2), "hetlora": (2, 2)}
    curves = {2: [0.1, 0.6, 0.7, 0.7, 0.7], 4: [0.1, 0.2, 0.6, 0.7, 0.7],
              8: [0.1, 0.2, 0.3, 0.4, 0.6], None: [0.1, 0.2, 0.3, 0.4, 0.5]}
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for name, hits in hit_at.items():
            for seed, hit in enumerate(hits):
                logged = ({"expected_participants": 6.0, "est_g2_mean": 0.5,
                           "est_signal": 0.1 + 0.2 * seed} if name == "adaptive" else {})
                f.writelines(json.dumps({"strategy": name, "seed": seed, **row}) + "\n"
                             for row in _rows(curves[hit], **logged))
    (tmp_path / "protocol.json").write_text(json.dumps(
        {"target": 0.6, "budget_s": 8.0,
         "chosen": {n: {"client_lr": 0.01, "server_lr": 1.0} for n in hit_at}}))
    side = regime_measured.measured(tmp_path, ("fedit", "fslora", "hetlora"))
    # restricted means: fedit 6, fslora 5, hetlora 2: the best baseline is HetLoRA
    assert side["best_baseline"] == "hetlora"
    assert side["reached"] == {"adaptive": 2, "fedit": 1, "fslora": 2, "hetlora": 2}
    # adaptive / hetlora per seed: 2/2 (a tie), 4/2: geometric mean sqrt(2)
    assert side["ratio"]["mean"] == pytest.approx(math.sqrt(2))
    assert side["ratio"]["low"] <= side["ratio"]["mean"] <= side["ratio"]["high"]
    assert side["faster"] == 0.0 and side["ties"] == 0.5
    # adaptive / fedit: 2/4 and 4/8, faster on both seeds, the same ratio (a point interval)
    assert side["ratios"]["fedit"] == {"ratio": {"mean": 0.5, "low": 0.5, "high": 0.5},
                                       "faster": 1.0, "ties": 0.0}
    assert side["ratios"]["fslora"]["ratio"]["mean"] == pytest.approx(math.sqrt(2 / 8 * 4 / 2))
    assert side["plans"]["adaptive"] == {"participants": 4.0, "expected_participants": 6.0,
                                         "mean_rank": 4.0, "round_total_s": 2.0}
    assert "expected_participants" not in side["plans"]["fedit"]
    # rounds to 0.6 per seed: adaptive 1, 2; fedit 2, never; fslora 4, 1; hetlora 1, 1
    assert side["rounds_to_target"] == {"adaptive": 1.5, "fedit": None, "fslora": 2.5,
                                        "hetlora": 1.0}
    assert side["adaptive_estimates"] == {"g2": 0.5, "signal": pytest.approx(0.2)}
    line = regime_measured.table([{"cell": "c", "predicted": 2.0, "predicted_own_estimates": 1.5,
                                   "measured": side}]).splitlines()[-1]
    assert line.startswith("| c | 2.00 (1.50) | hetlora | 1.414 [") and line.endswith(
        "| 0.00 (0.50) | 6, 4, 2 | 4, 2 | 1.5, 1 |")


@pytest.mark.slow  # 16 runs of 4 strategies: a minute or more of compiling on 2 cores
def test_a_two_seed_sweep_writes_rows_that_match_compare(tmp_path, monkeypatch):
    """The prediction is the map's (stubbed here: the solver's compile takes minutes); the
    measured ratio must be the one compare's own paired table reports for the best baseline."""
    compile_cache.enable()
    told = []

    def fake_prediction(model, system, clients, payload, draws, g2, signal):
        told.append((system.cell_radius_m, clients, payload, g2, signal))
        return np.array([1.5, 3.0, 2.0])[:draws]

    monkeypatch.setattr(regime_map, "predicted_speedups", fake_prediction)
    out, runs = tmp_path / "out", tmp_path / "runs"
    regime_measured.main(["--out", str(out), "--runs", str(runs), "--cells", "radius_2000m",
                          "--seeds", "0-1", "--rounds", "2", "--lr-grid", "0.01"])
    (row,) = json.loads((out / "measured.json").read_text())["cells"]
    assert row["cell"] == "radius_2000m" and row["predicted"] == 2.0  # median of 3 draws
    side = row["measured"]
    assert told[0] == (2000.0, 16, 1.0, regime_map.G2, regime_map.SIGNAL)
    assert told[1][3:] == (side["adaptive_estimates"]["g2"], side["adaptive_estimates"]["signal"])
    metrics = [json.loads(line) for line in (runs / "radius_2000m" / "metrics.jsonl").open()]
    assert {(r["strategy"], r["seed"]) for r in metrics} == {
        (s, seed) for s in ("adaptive", "fedit", "fslora", "hetlora") for seed in (0, 1)}
    paired = (runs / "radius_2000m" / "paired.md").read_text()
    best = side["best_baseline"]
    ratio = regime_measured.stats.Interval(**side["ratio"])
    assert f"| {best} | {side['faster']:.2f} | {side['ties']:.2f} | {ratio} |" in paired
    assert (out / "measured.png").stat().st_size > 0
    assert (out / "measured" / "radius_2000m" / "metrics.jsonl.gz").stat().st_size > 0


@pytest.mark.slow  # 4 runs of 2 strategies
def test_an_untuned_sweep_runs_the_given_settings_and_target(tmp_path, monkeypatch):
    """The MiniLM mode's path on the tiny preset: no tuning run, every reporting run at the
    strategy's given learning rate, the given target, compare's paired table."""
    compile_cache.enable()
    tuned = tmp_path / "protocol.json"
    tuned.write_text(json.dumps({"target": 0.3, "chosen": {
        "adaptive": {"client_lr": 0.03, "server_lr": 1.0},
        "fedit": {"client_lr": 0.01, "server_lr": 1.0}}}))
    mode = regime_measured.MODES["tiny"]
    monkeypatch.setitem(regime_measured.MODES, "tiny", regime_measured.Mode(
        **{**vars(mode), "baselines": ("fedit",), "lr_grid": None, "tuned_at": str(tuned)}))
    monkeypatch.setattr(regime_map, "predicted_speedups",
                        lambda *args: np.array([2.0, 1.0, 3.0]))  # the solver's compile: minutes
    out, runs = tmp_path / "out", tmp_path / "runs"
    regime_measured.main(["--out", str(out), "--runs", str(runs), "--cells", "radius_2000m",
                          "--seeds", "0-1", "--rounds", "2"])
    (row,) = json.loads((out / "measured.json").read_text())["cells"]
    assert row["tuned_at"] == str(tuned) and row["predicted"] == 2.0
    assert row["measured"]["target"] == 0.3 and row["measured"]["best_baseline"] == "fedit"
    assert row["measured"]["chosen_client_lr"] == {"adaptive": 0.03, "fedit": 0.01}
    assert not (runs / "radius_2000m" / "tuning").exists()
    metrics = [json.loads(line) for line in (runs / "radius_2000m" / "metrics.jsonl").open()]
    assert {(r["strategy"], r["seed"], r["client_lr"]) for r in metrics} == {
        (s, seed, lr) for s, lr in (("adaptive", 0.03), ("fedit", 0.01)) for seed in (0, 1)}
    side = row["measured"]
    ratio = regime_measured.stats.Interval(**side["ratio"])
    assert (f"| fedit | {side['faster']:.2f} | {side['ties']:.2f} | {ratio} |"
            in (runs / "radius_2000m" / "paired.md").read_text())
    assert sorted(p.name for p in (out / "measured" / "radius_2000m").iterdir()) == [
        "metrics.jsonl.gz", "paired.md", "protocol.json", "summary.md"]
