"""``fedlora-jax compare``: several strategies on the same clients, split, network and seeds.

Every (strategy, seed) is one ``train`` run (``OUTPUT_DIR/STRATEGY/seedS``) of the same config but
for ``strategy`` and ``federation.seed``; the seed fixes the data split, the simulated network and
the sampling keys, so strategies differ only in what they choose. Writes to ``OUTPUT_DIR``:
``metrics.jsonl`` (every row, tagged with strategy and seed), ``accuracy_vs_clock.png`` and
``accuracy_vs_round.png``, and ``time_to_target.csv`` / ``.md`` (mean and spread over seeds).
Time is the simulated wall-clock (``sim_clock_s``), never the host's.
"""

from __future__ import annotations

import argparse
import csv
import json
import textwrap
from pathlib import Path

import numpy as np

EXAMPLE = textwrap.dedent("""\
    examples:
      fedlora-jax compare --preset tiny --strategies adaptive,fedit,fslora --seeds 0,1,2
      fedlora-jax compare --strategies adaptive,luo,fslora,fedit,full --rounds 20 --target 0.6
      fedlora-jax compare --model tiny --set eval_every=2 --output-dir runs/cmp

    The target defaults to 90% of the best held-out accuracy any run reached. Evaluation runs every
    round unless --set eval_every=N says otherwise (time to target is read at evaluations).
    Runs that finished before in OUTPUT_DIR with the same settings are reused, so an interrupted
    comparison continues where it stopped and strategies can be added later; delete a run's
    folder (OUTPUT_DIR/STRATEGY/seedS) to redo it.""")

DEFAULT_STRATEGIES = "adaptive,luo,fslora,fedit,full"


SHORTCUTS = {"model": "model.source", "data": "data.source", "rounds": "federation.rounds",
             "clients": "data.num_clients"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="compare strategies in simulated wall-clock time",
        description="Runs several strategies on the same clients, data split, network and seeds; "
                    "writes accuracy-vs-wall-clock and -vs-round plots, a time-to-target table "
                    "and the raw metrics.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="named settings (see 'fedlora-jax run --help')")
    p.add_argument("--config", help="TOML, YAML or JSON file of settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting of every run (repeatable)")
    p.add_argument("--model", help="'minilm' (default), 'tiny', or a local Hugging Face directory")
    p.add_argument("--data", help="'builtin' (default), 'synthetic', or a data file")
    p.add_argument("--rounds", type=int, help="communication rounds per run")
    p.add_argument("--clients", type=int, help="number of clients")
    p.add_argument("--output-dir", default="runs/compare", help="default runs/compare")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                   help=f"comma-separated strategy names (default {DEFAULT_STRATEGIES})")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--target", type=float,
                   help="target held-out accuracy (default: 90%% of the best any run reached)")
    p.set_defaults(func=main)


def time_to_target(rows: list[dict], target: float) -> tuple[float, int] | None:
    """Simulated seconds and round of the first evaluation at or above ``target`` (None: never)."""
    for row in rows:
        if row.get("eval_accuracy", -np.inf) >= target:
            return row.get("sim_clock_s", 0.0), row["round"]
    return None


def accuracy_at(rows: list[dict], seconds: float) -> float:
    """Held-out accuracy of the last evaluation at or before ``seconds`` of simulated time."""
    evals = [r["eval_accuracy"] for r in rows
             if "eval_accuracy" in r and r.get("sim_clock_s", 0.0) <= seconds]
    return evals[-1] if evals else float("nan")


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.4g} ± {np.std(values):.2g}" if len(values) > 1 else f"{values[0]:.4g}"


def summarize(runs: dict[str, dict[int, list[dict]]], target: float) -> list[dict]:
    """One row per strategy: seeds that reached ``target``, time and rounds to it (mean ± std over
    those seeds), final accuracy, total simulated time, and the accuracy at a common time budget
    (the shortest run's simulated time: fair to strategies with short rounds), mean ± std over
    all seeds."""
    budget = min(rows[-1].get("sim_clock_s", 0.0) for by_seed in runs.values()
                 for rows in by_seed.values())
    table = []
    for name, by_seed in runs.items():
        hits = [h for h in (time_to_target(rows, target) for rows in by_seed.values()) if h]
        finals = [rows[-1].get("eval_accuracy", np.nan) for rows in by_seed.values()]
        clocks = [rows[-1].get("sim_clock_s", 0.0) for rows in by_seed.values()]
        table.append({"strategy": name, "reached": f"{len(hits)}/{len(by_seed)}",
                      "time_to_target_s": _mean_std([t for t, _ in hits]),
                      "rounds_to_target": _mean_std([float(r) for _, r in hits]),
                      "final_accuracy": _mean_std(finals),
                      f"accuracy_at_{budget:.3g}s": _mean_std(
                          [accuracy_at(rows, budget) for rows in by_seed.values()]),
                      "total_sim_time_s": _mean_std(clocks)})
    return table


def write_table(table: list[dict], target: float, out: Path) -> None:
    """``time_to_target.csv`` and ``time_to_target.md``."""
    keys = list(table[0])
    with open(out / "time_to_target.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(table)
    lines = [f"Target held-out accuracy: {target:.4f}", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in table]
    (out / "time_to_target.md").write_text("\n".join(lines) + "\n")


def plot(runs: dict[str, dict[int, list[dict]]], target: float, out: Path) -> list[Path]:
    """Held-out accuracy against simulated wall-clock and against rounds, one color (and, past ten
    strategies, line style) per strategy, one line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, x_label, file in (("sim_clock_s", "simulated wall-clock (s)", "accuracy_vs_clock.png"),
                                 ("round", "round", "accuracy_vs_round.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, by_seed) in enumerate(runs.items()):
            for j, rows in enumerate(by_seed.values()):
                points = [(r.get(x_key, 0.0), r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=f"C{i % 10}", ls=("-", "--", ":")[i // 10 % 3], alpha=0.7,
                        label=name if j == 0 else None)
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:.3f}")
        ax.set_xlabel(x_label)
        ax.set_ylabel("held-out accuracy")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / file, dpi=120)
        plt.close(fig)
        paths.append(out / file)
    return paths


def run_all(base_overrides: list[str], names: list[str], seeds: list[int], out: Path, *,
            config: str | None = None, preset: str | None = None, log=print
            ) -> dict[str, dict[int, list[dict]]]:
    """Trains every (strategy, seed); all configs are validated before the first run starts."""
    from fedlora_jax import strategies
    from fedlora_jax.config import load_config
    from fedlora_jax.train import train

    cfgs = {(name, seed): strategies.configure(load_config(
                config, ["eval_every=1", *base_overrides, f"strategy={name}",
                         f"federation.seed={seed}", f"output_dir={out / name / f'seed{seed}'}"],
                preset=preset))
            for name in names for seed in seeds}
    runs: dict[str, dict[int, list[dict]]] = {name: {} for name in names}
    with open(out / "metrics.jsonl", "w") as f:
        for (name, seed), cfg in cfgs.items():
            rows = finished_run(cfg)
            log(f"compare: {name}, seed {seed}" + (" (finished before: reused)" if rows else ""))
            rows = rows or train(cfg, progress="none", log=lambda *_: None, overwrite=True)
            runs[name][seed] = rows
            f.writelines(json.dumps({"strategy": name, "seed": seed, **row}) + "\n" for row in rows)
    return runs


def finished_run(cfg) -> list[dict] | None:
    """The metrics of a run that already finished in ``cfg.output_dir`` with the same settings
    (so an interrupted comparison picks up where it stopped), else None."""
    from fedlora_jax import metrics
    from fedlora_jax.config import to_dict

    out = Path(cfg.output_dir)
    try:
        same = json.loads((out / "config.json").read_text()) == json.loads(json.dumps(to_dict(cfg)))
        rows = metrics.read_rows(out) if same else []
    except (OSError, ValueError):
        return None
    return rows if rows and rows[-1].get("round") == cfg.federation.rounds else None


def _parse_list(text: str, kind, what: str) -> list:
    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be a comma-separated list, got {text!r}.") from None
    if not items:
        raise ValueError(f"--{what} is empty.")
    return items


def main(args) -> int:
    from fedlora_jax import strategies

    names = _parse_list(args.strategies, str, "strategies")
    for name in names:
        strategies.get_strategy(name)
    seeds = _parse_list(args.seeds, int, "seeds")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"{key}={getattr(args, name)}" for name, key in SHORTCUTS.items()
                 if getattr(args, name) is not None] + args.overrides
    runs = run_all(overrides, names, seeds, out, config=args.config, preset=args.preset)
    best = max(r.get("eval_accuracy", 0.0) for by_seed in runs.values() for rows in by_seed.values()
               for r in rows)
    target = 0.9 * best if args.target is None else args.target
    table = summarize(runs, target)
    write_table(table, target, out)
    plot(runs, target, out)
    print((out / "time_to_target.md").read_text())
    print(f"wrote {out}/metrics.jsonl, time_to_target.csv/.md, accuracy_vs_clock.png, "
          "accuracy_vs_round.png")
    return 0
