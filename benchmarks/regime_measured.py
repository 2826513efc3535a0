"""Measured points on the regime map: the protocol of ``fedlora-jax compare`` run at a few cells
of ``benchmarks/regime_map.py``'s maps, set beside the speedup the solver predicts there.

    python benchmarks/regime_measured.py --out docs/results/regime_map [--cells preset,radius_2000m]
    python benchmarks/regime_measured.py --model minilm --out docs/results/regime_map_minilm

Each cell is a system setting over a preset's (the run ``regime_map.py`` models): ``--model
tiny`` (the tiny preset, AdamW clients: docs/results.md section 1) or ``minilm`` (the embedded
default, AdamW clients: section 6). On the tiny preset ``fedlora-jax compare`` tunes every
strategy's client learning rate at each cell on the validation split (``--lr-grid``) and runs
``adaptive``, FedIT, FSLoRA and HetLoRA on paired seeds. On MiniLM (a run costs minutes) nothing
is tuned at a cell: ``adaptive``, FedIT and HetLoRA run compare's reporting stage with the
settings and the target that section 6's tuning chose at the preset cell
(``docs/results/protocol_minilm/protocol.json``), unless ``--lr-grid`` asks for tuning. The
measured speedup is the paired time-to-target ratio ``adaptive / best baseline`` (the baseline
with the shortest restricted mean time, misses censored at the budget) with its 95% bootstrap CI
and the share of seeds where ``adaptive`` is faster. The predicted speedup is
``regime_map.predicted_speedups`` at the cell with the preset's workload (median over its network
draws), with the map's estimates (``G_n^2``, ``|g|^2``) and again with the estimates ``adaptive``
itself logged in the cell (median over seeds of the last round's).

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
from fedlora_jax.config import load_config
from fedlora_jax.fields import require

CELLS = {  # name: settings over the preset's (10 MHz, sigma 0.5, 500 m; 16 or 10 clients)
    "preset": {},
    "radius_100m": {"cell_radius_m": 100.0},
    "radius_2000m": {"cell_radius_m": 2000.0},
    "bandwidth_1e6": {"bandwidth_hz": 1e6},
    "bandwidth_1e8": {"bandwidth_hz": 1e8},
    "bandwidth_1e9": {"bandwidth_hz": 1e9},
    "clients_64": {"num_clients": 64},
    # compute-bound on MiniLM: phone-class compute (median 1e11 FLOP/s, a wide spread) in a small
    # cell: local steps take ~4x a client's upload at the median, 91-96% of a simulated round
    "compute_bound": {"flops_median": 1e11, "flops_log_sigma": 1.0, "cell_radius_m": 100.0},
}
REFERENCE = "adaptive"
SYSTEM_FIELDS = tuple(f.name for f in dataclasses.fields(wireless.SystemConfig))
NAMES = {"fedit": "FedIT", "fslora": "FSLoRA", "hetlora": "HetLoRA"}  # for the figure


@dataclasses.dataclass(frozen=True)
class Mode:
    """One model's measured points: the preset the map models (and its label), compare's protocol
    options besides the cell, the baselines, the command line's defaults, the map's estimates,
    and where the settings come from when a cell is not tuned (``tuned_at``, a compare
    ``protocol.json``: its chosen settings and its target)."""

    preset: str
    label: str
    protocol: tuple[str, ...]
    baselines: tuple[str, ...]
    cells: str
    seeds: str
    rounds: int
    lr_grid: str | None
    g2: float
    signal: float
    runs: str
    tuned_at: str | None = None


MODES = {
    # the protocol of docs/results.md, section 1 (the tiny preset, AdamW clients), tuned on the
    # wall-clock budget as section 3's cells were
    "tiny": Mode("tiny", "tiny preset",
                 ("--preset", "tiny", "--tune-seeds", "1000", "--set",
                  "data.synthetic_per_client=100", "--set", "data.heldout_fraction=0.3", "--set",
                  "checkpoint_every=0", "--tune-score", "budget"), ("fedit", "fslora", "hetlora"),
                 "preset,radius_100m,radius_2000m,bandwidth_1e8", "0-19", 30,
                 "3e-3,1e-2,3e-2,1e-1", regime_map.G2, regime_map.SIGNAL,
                 "runs/regime_measured"),
    # section 6 (the embedded default, AdamW clients); its best two baselines. The map's
    # estimates: adaptive's last logged est_g2_mean and est_signal there, median over its 5 seeds
    # (docs/results/protocol_minilm/metrics.jsonl.gz)
    "minilm": Mode("default", "MiniLM, the embedded default",
                   ("--tune-seeds", "1000", "--set", "eval_every=2", "--set", "checkpoint_every=0"),
                   ("fedit", "hetlora"), "bandwidth_1e9,bandwidth_1e6,radius_2000m,compute_bound",
                   "0-4", 20, None, 39.07, 1.566,
                   "runs/regime_measured_minilm", "docs/results/protocol_minilm/protocol.json"),
}


def overrides(point: dict, num_clients: int) -> list[str]:
    """A cell as ``--set`` options of ``fedlora-jax compare``: its ``SystemConfig`` fields as
    ``system.*`` and ``num_clients`` (default: the preset's) as ``data.num_clients`` (the
    adapter payload of the map's third axis is no system setting: not measurable here)."""
    for key in point:
        require(key in (*SYSTEM_FIELDS, "num_clients"), "cell setting", key,
                "be a field of wireless.SystemConfig or num_clients", "payload is not measured")
    sets = [f"system.{k}={v}" for k, v in point.items() if k != "num_clients"]
    return sets + [f"data.num_clients={regime_map.cell(point, num_clients)[1]}"]


def compare_argv(mode: Mode, point: dict, out: Path, *, num_clients: int, seeds: str,
                 rounds: int, lr_grid: str | None, tune_score: str | None = None) -> list[str]:
    """The ``fedlora-jax compare`` command line of one cell (no ``--lr-grid``: not tuned;
    ``tune_score`` overrides the mode's)."""
    cell = [x for s in overrides(point, num_clients) for x in ("--set", s)]
    grid = ["--lr-grid", lr_grid] if lr_grid else []
    score = ["--tune-score", tune_score] if tune_score else []
    return ["compare", *mode.protocol, *cell, "--rounds", str(rounds), "--seeds", seeds,
            "--strategies", ",".join((REFERENCE, *mode.baselines)), *grid, *score,
            "--output-dir", str(out)]


def tuned_settings(path: Path, names: list[str]) -> tuple[dict[str, compare.Setting], float]:
    """Each strategy's chosen setting and the target of an earlier comparison's
    ``protocol.json``: what an untuned cell runs."""
    tuned = json.loads(path.read_text())
    missing = [n for n in names if n not in tuned["chosen"]]
    require(not missing, str(path), f"chosen settings of {missing}", "hold every strategy run",
            "run that comparison with them, or pass --lr-grid to tune at each cell")
    return {n: compare.Setting(**tuned["chosen"][n]) for n in names}, float(tuned["target"])


def report_at(parsed, chosen: dict[str, compare.Setting], target: float, tuned_at: str) -> None:
    """compare's reporting stage alone at given settings and target (no tuning at the cell);
    writes compare's tables, figures and a ``protocol.json`` that names where they came from."""
    protocol = compare.plan_protocol(parsed)
    out = Path(parsed.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget, _, warnings = compare.report(protocol, chosen, out, target=target, budget=None,
                                         reference=REFERENCE, show_seeds=False)
    (out / "protocol.json").write_text(json.dumps(
        {"target": target, "budget_s": budget, "seeds": protocol.seeds,
         "chosen": {n: s._asdict() for n, s in chosen.items()}, "tuned_at": tuned_at,
         "warnings": warnings}, indent=2))


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


def measured(out: Path, baselines: tuple[str, ...]) -> dict:
    """The measured side of a cell from its finished comparison: target, budget, the best
    baseline, ``adaptive / best`` paired time ratio (CI) and share faster, every baseline's
    ratio, and each strategy's per-round plan and rounds to target."""
    protocol = json.loads((out / "protocol.json").read_text())
    runs = read_runs(out)
    times = compare.censored_times(runs, protocol["target"], protocol["budget_s"])
    best = min(baselines, key=lambda b: float(np.mean(times[b])))  # ties: the first
    pairs = {b: stats.paired(times[REFERENCE], times[b]) for b in baselines}
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
              ) -> list[float]:
    """The map's predicted speedups at a cell, one per network draw."""
    return regime_map.predicted_speedups(
        model, *regime_map.cell(point, model.num_clients), draws, g2, signal).tolist()


def export(out: Path, dst: Path) -> None:
    """A cell's tables, ``protocol.json`` and gzipped metrics into ``dst`` (for the docs; the
    tuning's only where the cell was tuned)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tuning.md", "summary.md", "paired.md", "protocol.json"):
        if (out / name).exists():
            shutil.copy(out / name, dst / name)
    for name in ("metrics.jsonl", "tuning.jsonl"):
        if not (out / name).exists():
            continue
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


def draw(rows: list[dict], path: Path, mode: Mode) -> Path:
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
    ax.set_title(f"adaptive vs the best of {', '.join(NAMES[b] for b in mode.baselines)}: "
                 f"predicted and measured\n({mode.label}, cells of the regime map)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=sorted(MODES),
                   help="the preset the cells vary (default tiny)")
    p.add_argument("--out", default="runs/regime_map", help="folder for measured.json/.png")
    p.add_argument("--runs", help="compare's output, per cell (default runs/regime_measured, "
                                  "MiniLM: runs/regime_measured_minilm)")
    p.add_argument("--cells", help=f"comma-separated, of {', '.join(CELLS)} (default "
                                   "preset,radius_100m,radius_2000m,bandwidth_1e8; MiniLM: "
                                   "bandwidth_1e9,bandwidth_1e6,radius_2000m,compute_bound, its "
                                   "preset cell being section 6's runs)")
    p.add_argument("--seeds", help="default 0-19 (MiniLM: 0-4)")
    p.add_argument("--rounds", type=int, help="default 30 (MiniLM: 20)")
    p.add_argument("--lr-grid", help="tune at every cell on this grid (default "
                                     "3e-3,1e-2,3e-2,1e-1; MiniLM: none, section 6's settings)")
    p.add_argument("--tune-score", choices=sorted(compare.TUNE_SCORES),
                   help="compare's tuning score (default: the mode's; tiny: budget, as section 3's "
                        "cells were tuned)")
    p.add_argument("--draws", type=int, default=3, help="network draws of the prediction")
    args = p.parse_args(argv)
    mode = MODES[args.model]
    seeds, rounds = args.seeds or mode.seeds, args.rounds or mode.rounds
    lr_grid = args.lr_grid or mode.lr_grid
    names = [c for c in (args.cells or mode.cells).split(",") if c]
    unknown = [c for c in names if c not in CELLS]
    if unknown or not names:
        p.error(f"--cells: unknown {unknown or 'none given'}; choose from {', '.join(CELLS)}")
    out, runs_dir = Path(args.out), Path(args.runs or mode.runs)
    clients = load_config(preset=mode.preset).data.num_clients
    argvs = {c: compare_argv(mode, CELLS[c], runs_dir / c, num_clients=clients, seeds=seeds,
                             rounds=rounds, lr_grid=lr_grid, tune_score=args.tune_score)
             for c in names}
    parsed = {c: build_parser().parse_args(a) for c, a in argvs.items()}
    fixed = None if lr_grid else tuned_settings(Path(mode.tuned_at),
                                               [REFERENCE, *mode.baselines])
    for a in parsed.values():  # every cell's configs validated before anything runs
        protocol = compare.plan_protocol(a)
        for name, setting in (fixed[0] if fixed else {}).items():
            protocol.config(name, setting, protocol.seeds[0], "test")
    out.mkdir(parents=True, exist_ok=True)
    model = regime_map.model_of(mode.preset)
    rows = []
    for c in names:
        start, load = time.perf_counter(), os.getloadavg()
        if fixed:
            report_at(parsed[c], *fixed, mode.tuned_at)
        else:
            compare.main(parsed[c])
        side = measured(runs_dir / c, mode.baselines)
        export(runs_dir / c, out / "measured" / c)
        g2, signal = side["adaptive_estimates"].values()
        draws = predicted(model, CELLS[c], args.draws, mode.g2, mode.signal)
        rows.append({
            "cell": c, "settings": CELLS[c], "command": "fedlora-jax " + " ".join(argvs[c]),
            **({"tuned_at": mode.tuned_at} if fixed else {}),
            "predicted": float(np.median(draws)), "predicted_draws": draws,  # median: the map's
            "predicted_own_estimates": float(np.median(
                predicted(model, CELLS[c], args.draws, g2, signal))),
            "measured": side, "host_s": round(time.perf_counter() - start, 1),
            "load_average_before": load, "load_average_after": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        print(f"{c}: predicted {rows[-1]['predicted']:.2f}x, measured ratio adaptive / "
              f"{side['best_baseline']} {stats.Interval(**side['ratio'])} "
              f"({rows[-1]['host_s']} s)", flush=True)
        (out / "measured.json").write_text(json.dumps(
            {"model": args.model, "draws": args.draws, "map_g2": mode.g2,
             "map_signal": mode.signal, "cells": rows}, indent=1))  # after every cell
    print(table(rows))
    print(f"wrote {draw(rows, out / 'measured.png', mode)} and measured.json")


if __name__ == "__main__":
    main()
