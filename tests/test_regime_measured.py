"""``benchmarks/regime_measured.py``: a cell sets what the map models, the measured side of a
cell on synthetic runs with known answers, and (slow) a 2-seed, 2-round sweep end to end."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlora_jax.config import load_config
from tests import compile_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import regime_map  # noqa: E402
import regime_measured  # noqa: E402


@pytest.mark.parametrize("name", sorted(regime_measured.CELLS))
def test_a_cell_sets_the_system_the_map_models(name):
    point = regime_measured.CELLS[name]
    cfg = load_config(preset="tiny", overrides=regime_measured.overrides(point))
    system, clients, payload = regime_map.cell(point)
    assert cfg.system == system and cfg.data.num_clients == clients and payload == 1.0
    assert (cfg.system.cell_radius_m == point.get("cell_radius_m", 500.0)
            and cfg.data.num_clients == point.get("num_clients", 16))


def test_a_cell_outside_the_system_is_refused():
    with pytest.raises(ValueError, match="cell setting must be a field of wireless.SystemConfig"):
        regime_measured.overrides({"payload": 4.0})


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
    side = regime_measured.measured(tmp_path)
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
