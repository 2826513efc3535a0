"""Measured points on the regime map: the protocol of ``fedlora-jax compare`` run at a few cells
of ``benchmarks/regime_map.py``'s maps, set beside the speedup the solver predicts there.

    python benchmarks/regime_measured.py --out docs/results/regime_map [--cells preset,radius_2000m]

Each cell is a system setting of the tiny preset (the run ``regime_map.py`` models). At each cell
``fedlora-jax compare`` tunes every strategy's client learning rate on the validation split and
runs ``adaptive``, FedIT, FSLoRA and HetLoRA on paired seeds; the measured speedup is the paired
time-to-target ratio ``adaptive / best baseline`` (the baseline with the shortest restricted mean
time, misses censored at the budget) with its 95% bootstrap CI and the share of seeds where
``adaptive`` is faster. The predicted speedup is ``regime_map.predicted_speedups`` at the cell
(median over its network draws), with the map's estimates (``G_n^2``, ``|g|^2``) and again with
the estimates ``adaptive`` itself logged in the cell (median over seeds of the last round's).

Cells run in one process, so compiled programs are shared between cells of one client count;
with ``JAX_COMPILATION_CACHE_DIR`` set, across processes too. Finished runs are reused (compare's
rule), so an interrupted sweep continues. Writes ``OUT/measured.json`` (one row per cell),
``OUT/measured.png`` (predicted against measured) and ``OUT/measured/CELL/`` (compare's tables,
``protocol.json`` and ``metrics.jsonl.gz``); the runs themselves go to ``--runs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

import regime_map
from fedlora_jax import stats, wireless
from fedlora_jax.cli import build_parser
from fedlora_jax.commands import compare
from fedlora_jax.fields import require

CELLS = {  # name: the cell's settings over the tiny preset's (10 MHz, sigma 0.5, 500 m, 16)
    "preset": {},
    "radius_100m": {"cell_radius_m": 100.0},
    "radius_2000m": {"cell_radius_m": 2000.0},
    "bandwidth_1e8": {"bandwidth_hz": 1e8},
    "clients_64": {"num_clients": 64},
}
REFERENCE, BASELINES = "adaptive", ("fedit", "fslora", "hetlora")
# the protocol of docs/results.md, section 1 (the tiny preset, AdamW clients)
PROTOCOL = ["--preset", "tiny", "--tune-seeds", "1000", "--set", "data.synthetic_per_client=100",
            "--set", "data.heldout_fraction=0.3", "--set", "checkpoint_every=0"]
SYSTEM_FIELDS = tuple(f.name for f in dataclasses.fields(wireless.SystemConfig))


def overrides(point: dict) -> list[str]:
    """A cell as ``--set`` options of ``fedlora-jax compare``: its ``SystemConfig`` fields as
    ``system.*`` and ``num_clients`` as ``data.num_clients`` (the adapter payload of the map's
    third axis is no system setting: not measurable here)."""
    for key in point:
        require(key in (*SYSTEM_FIELDS, "num_clients"), "cell setting", key,
                "be a field of wireless.SystemConfig or num_clients", "payload is not measured")
    sets = [f"system.{k}={v}" for k, v in point.items() if k != "num_clients"]
    return sets + [f"data.num_clients={regime_map.cell(point)[1]}"]


def compare_argv(point: dict, out: Path, *, seeds: str, rounds: int, lr_grid: str) -> list[str]:
    """The ``fedlora-jax compare`` command line of one cell."""
    cell = [x for s in overrides(point) for x in ("--set", s)]
    return ["compare", *PROTOCOL, *cell, "--rounds", str(rounds), "--seeds", seeds,
            "--strategies", ",".join((REFERENCE, *BASELINES)), "--lr-grid", lr_grid,
            "--output-dir", str(out)]


def read_runs(out: Path) -> compare.Runs:
    """A finished comparison's reporting runs, ``strategy -> seed -> rows``, from its
    ``metrics.jsonl`` (every row tagged with strategy and seed)."""
    runs: compare.Runs = {}
    with open(out / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            runs.setdefault(row["strategy"], {}).setdefault(row["seed"], []).append(row)
    return runs


def plan(rows_by_seed: dict[int, list[dict]]) -> dict:
    """What a strategy did per round, averaged over rounds and seeds (the keys it logged)."""
    rounds = [r for rows in rows_by_seed.values() for r in rows if "participants" in r]
    keys = ("participants", "expected_participants", "mean_rank", "round_total_s")
    return {k: float(np.mean([r[k] for r in rounds])) for k in keys if k in rounds[0]}


def rounds_to(rows_by_seed: dict[int, list[dict]], target: float) -> float | None:
    """Median over seeds of the rounds to the target in the whole run (None: most missed):
    with the round time, what a wall-clock time is made of."""
    rounds = np.median([stats.first_crossing(*compare.curve(rows, "round"), target)
                        for rows in rows_by_seed.values()])
    return float(rounds) if np.isfinite(rounds) else None


def estimates(rows_by_seed: dict[int, list[dict]]) -> tuple[float, float]:
    """(``G_n^2`` mean, ``|g|^2``): median over seeds of the last logged estimates."""
    last = [[r for r in rows if "est_signal" in r][-1] for rows in rows_by_seed.values()]
    return (float(np.median([r["est_g2_mean"] for r in last])),
            float(np.median([r["est_signal"] for r in last])))


def measured(out: Path) -> dict:
    """The measured side of a cell from its finished comparison: target, budget, the best
    baseline, ``adaptive / best`` paired time ratio (CI) and share faster, every baseline's
    ratio, and each strategy's per-round plan and rounds to target."""
    protocol = json.loads((out / "protocol.json").read_text())
    runs = read_runs(out)
    times = compare.censored_times(runs, protocol["target"], protocol["budget_s"])
    best = min(BASELINES, key=lambda b: float(np.mean(times[b])))  # ties: the first
    pairs = {b: stats.paired(times[REFERENCE], times[b]) for b in BASELINES}
    return {"target": protocol["target"], "budget_s": protocol["budget_s"],
            "chosen_client_lr": {n: s["client_lr"] for n, s in protocol["chosen"].items()},
            "reached": {n: int(stats.censor([compare.time_to_target(rows, protocol["target"])
                                             for rows in by_seed.values()],
                                            protocol["budget_s"])[1].sum())
                        for n, by_seed in runs.items()},
            "best_baseline": best, "ratio": pairs[best].ratio._asdict(),
            "faster": pairs[best].faster, "ties": pairs[best].ties,
            "ratios": {b: {"ratio": p.ratio._asdict(), "faster": p.faster, "ties": p.ties}
                       for b, p in pairs.items()},
            "plans": {n: plan(by_seed) for n, by_seed in runs.items()},
            "rounds_to_target": {n: rounds_to(by_seed, protocol["target"])
                                 for n, by_seed in runs.items()},
            "adaptive_estimates": dict(zip(("g2", "signal"), estimates(runs[REFERENCE])))}


def predicted(model: regime_map.Model, point: dict, draws: int, g2: float, signal: float
              ) -> float:
    """The map's predicted speedup at a cell: median over its network draws."""
    return float(np.median(regime_map.predicted_speedups(
        model, *regime_map.cell(point), draws, g2, signal)))


def export(out: Path, dst: Path) -> None:
    """A cell's tables, ``protocol.json`` and gzipped metrics into ``dst`` (for the docs)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tuning.md", "summary.md", "paired.md", "protocol.json"):
        shutil.copy(out / name, dst / name)
    for name in ("metrics.jsonl", "tuning.jsonl"):
        with open(out / name, "rb") as src, gzip.open(dst / f"{name}.gz", "wb") as f:
            shutil.copyfileobj(src, f)


def table(rows: list[dict]) -> str:
    """The cells as a markdown table: predicted speedup, measured ratio, and the plans."""
    lines = ["| cell | predicted speedup (own estimates) | best baseline | measured ratio "
             "adaptive / best [95% CI] | adaptive faster (ties) | adaptive: expected "
             "participants, mean rank, round (s) | best: rank, round (s) | rounds to target "
             "(adaptive, best) |", "|" + "---|" * 8]
    for row in rows:
        m = row["measured"]
        a, b = m["plans"][REFERENCE], m["plans"][m["best_baseline"]]
        rounds = [m["rounds_to_target"].get(n) for n in (REFERENCE, m["best_baseline"])]
        lines.append(
            f"| {row['cell']} | {row['predicted']:.2f} ({row['predicted_own_estimates']:.2f}) "
            f"| {m['best_baseline']} | {stats.Interval(**m['ratio'])} | {m['faster']:.2f} "
            f"({m['ties']:.2f}) | {a['expected_participants']:.3g}, {a['mean_rank']:.3g}, "
            f"{a['round_total_s']:.3g} | {b['mean_rank']:.3g}, {b['round_total_s']:.3g} | "
            + ", ".join("-" if r is None else f"{r:g}" for r in rounds) + " |")
    return "\n".join(lines)


def draw(rows: list[dict], path: Path) -> Path:
    """Measured against predicted speedup per cell (log axes): a point on the diagonal is a
    prediction that holds, one in the shaded half a cell where ``adaptive`` is slower."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    values = [1.0]
    by_height = np.argsort([1.0 / row["measured"]["ratio"]["mean"] for row in rows])
    above = {int(i): k % 2 == 1 for k, i in enumerate(by_height)}  # neighbours' labels apart
    for i, row in enumerate(rows):
        ratio = row["measured"]["ratio"]
        y = 1.0 / ratio["mean"]  # speedup = best baseline's time / adaptive's
        err = [[y - 1.0 / ratio["high"]], [1.0 / ratio["low"] - y]]
        x, x_own = row["predicted"], row["predicted_own_estimates"]
        ax.errorbar(x, y, yerr=err, fmt="o", color=f"C{i}", capsize=4)
        ax.plot([x, x_own], [y, y], color=f"C{i}", lw=1, ls=":")
        ax.plot(x_own, y, marker="o", mfc="none", color=f"C{i}", ls="none")
        ax.annotate(f"{row['cell']}: {x:.2g}x -> {y:.2g}x (vs {row['measured']['best_baseline']})",
                    (x, y), xytext=(7, 5 if above[i] else -11), textcoords="offset points",
                    fontsize=8, color=f"C{i}")
        values += [x, x_own, 1.0 / ratio["high"], 1.0 / ratio["low"]]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    ax.plot([lo, 3 * hi], [lo, 3 * hi], color="gray", lw=1, label="measured = predicted")
    ax.axhspan(lo, 1.0, color="red", alpha=0.06, label="adaptive slower than the best baseline")
    ticks = [t for t in (0.25, 0.5, 1, 2, 4, 8, 16) if t >= lo]
    ax.set(xscale="log", yscale="log", xlim=(lo, 3 * hi), ylim=(lo, hi),  # room for the labels
           xlabel="predicted speedup (solver's model; hollow: with the run's own estimates)\n"
                  "labels: cell: predicted -> measured",
           ylabel="measured speedup: best baseline's time / adaptive's\n"
                  "(time to target, paired seeds, 95% CI)")
    for axis, top in ((ax.xaxis, 3 * hi), (ax.yaxis, hi)):
        shown = [t for t in ticks if t <= top]
        axis.set_ticks(shown, [f"{t:g}x" for t in shown])
        axis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title("adaptive vs the best of FedIT, FSLoRA, HetLoRA: predicted and measured\n"
                 "(tiny preset, cells of the regime map)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/regime_map", help="folder for measured.json/.png")
    p.add_argument("--runs", default="runs/regime_measured", help="compare's output, per cell")
    p.add_argument("--cells", default="preset,radius_100m,radius_2000m,bandwidth_1e8",
                   help=f"comma-separated, of {', '.join(CELLS)}")
    p.add_argument("--seeds", default="0-19")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--lr-grid", default="3e-3,1e-2,3e-2,1e-1")
    p.add_argument("--draws", type=int, default=3, help="network draws of the prediction")
    args = p.parse_args(argv)
    names = [c for c in args.cells.split(",") if c]
    unknown = [c for c in names if c not in CELLS]
    if unknown or not names:
        p.error(f"--cells: unknown {unknown or 'none given'}; choose from {', '.join(CELLS)}")
    out, runs_dir = Path(args.out), Path(args.runs)
    argvs = {c: compare_argv(CELLS[c], runs_dir / c, seeds=args.seeds, rounds=args.rounds,
                             lr_grid=args.lr_grid) for c in names}
    parsed = {c: build_parser().parse_args(a) for c, a in argvs.items()}
    for a in parsed.values():
        compare.plan_protocol(a)  # every cell's configs validated before anything runs
    out.mkdir(parents=True, exist_ok=True)
    model = regime_map.model_of("tiny")
    rows = []
    for c in names:
        start, load = time.perf_counter(), os.getloadavg()
        compare.main(parsed[c])
        side = measured(runs_dir / c)
        export(runs_dir / c, out / "measured" / c)
        g2, signal = side["adaptive_estimates"].values()
        rows.append({
            "cell": c, "settings": CELLS[c], "command": "fedlora-jax " + " ".join(argvs[c]),
            "predicted": predicted(model, CELLS[c], args.draws, regime_map.G2, regime_map.SIGNAL),
            "predicted_own_estimates": predicted(model, CELLS[c], args.draws, g2, signal),
            "measured": side, "host_s": round(time.perf_counter() - start, 1),
            "load_average_before": load, "load_average_after": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        print(f"{c}: predicted {rows[-1]['predicted']:.2f}x, measured ratio adaptive / "
              f"{side['best_baseline']} {stats.Interval(**side['ratio'])} "
              f"({rows[-1]['host_s']} s)", flush=True)
        (out / "measured.json").write_text(json.dumps(
            {"draws": args.draws, "map_g2": regime_map.G2, "map_signal": regime_map.SIGNAL,
             "cells": rows}, indent=1))  # after every cell: an interrupted sweep keeps its rows
    print(table(rows))
    print(f"wrote {draw(rows, out / 'measured.png')} and measured.json")


if __name__ == "__main__":
    main()
