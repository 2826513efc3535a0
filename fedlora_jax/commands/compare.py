"""``fedlora-jax compare``: strategies against each other under one protocol, in simulated time.

1. **Tuning.** Every strategy gets the same grid: client learning rates, times server steps for
   the strategies that have one (those that do not pin ``server_optimizer``). Each trial runs on
   the tuning seeds and is scored on the *validation* split only (a seeded part of the held-out
   data, disjoint from the test split: ``data.validation_fraction``). ``--tune-score rounds``
   (the default) scores a trial by its mean validation accuracy over all its rounds (the area
   under its accuracy-vs-round curve), so every strategy is tuned over the same rounds whatever
   their length; ``--tune-score budget`` by its mean over the wall-clock budget (its first rounds
   only, for a strategy with long rounds). The best mean score over the tuning seeds picks each
   strategy's setting.
2. **Reporting.** Each strategy's chosen setting runs on the reporting seeds, scored on the test
   split. One seed fixes the data split, the network, the initialization and the sampling keys
   for every strategy, so results are paired by seed.
3. **Statistics** (:mod:`fedlora_jax.stats`): seeds reaching the target, restricted mean time to
   target (misses censored at the budget), test accuracy at fixed budgets, each with a 95%
   bootstrap interval over seeds; against each baseline, the share of seeds where the reference
   strategy (``adaptive``) is faster and the paired time ratio.

Time is the simulated wall-clock (``sim_clock_s``), never the host's. The budget defaults to the
shortest run's simulated time in each stage, so every run covers it; the target defaults to 90%
of the best validation accuracy of the tuning stage (the test split never picks anything).
Writes to ``OUTPUT_DIR``: ``tuning.csv/.md`` (every trial's score), ``summary.csv/.md``,
``paired.csv/.md``, ``accuracy_vs_clock.png`` and ``accuracy_vs_round.png`` (mean over seeds with
its 95% band), ``metrics.jsonl`` and ``tuning.jsonl`` (every row, tagged) and ``protocol.json``
(with ``tune_score`` and ``warnings``: the strategies with runs that complete no round within a
stage's budget, whose result there is degenerate, and, under ``--tune-score budget``, those
whose tuning runs complete under a third of their rounds within it; printed too).
"""

from __future__ import annotations

import argparse
import csv
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedlora_jax import stats
from fedlora_jax.commands.run import CONFIG_SHORTCUTS, add_config_options
from fedlora_jax.fields import require

EXAMPLE = textwrap.dedent("""\
    examples:
      fedlora-jax compare --preset tiny --strategies adaptive,fedit,fslora --seeds 0-19
      fedlora-jax compare --strategies adaptive,fslora,fedit --seeds 0-4 --lr-grid 1e-3,3e-3,1e-2
      fedlora-jax compare --preset tiny --server-lr-grid 0.5,1 --budget 0.2 --target 0.8
      fedlora-jax compare --preset tiny --tune-score budget  # tune on the wall-clock budget

    Every strategy is tuned on the same grid (--lr-grid, default the configured client learning
    rate times 0.1, 0.3, 1, 3) on --tune-seeds, scored on the validation split (--tune-score),
    then run with its best setting on --seeds and scored on the test split. Evaluation runs
    every round unless --set eval_every=N says otherwise (time to target is read at
    evaluations). Runs finished before in OUTPUT_DIR with the same settings and the same code
    are reused, so an interrupted comparison continues where it stopped; delete a run's folder
    to redo it.

    Packing: runs that differ only in seed, learning rates, network and a strategy of the same
    aggregation rule train as one compiled program (up to 16 runs a pack; each run still gets
    its own folder, and its results equal its run alone's up to float round-off). fixed,
    fedit, fslora and adaptive share FSLoRA's rule and pack together; hetlora, flora and ffa
    (its own model change) and flexlora pack only with runs of the same strategy; fedsa
    (personalized) never packs. --no-pack trains
    every run on its own.""")

DEFAULT_STRATEGIES = "adaptive,fslora,hetlora,flexlora,fedit,ffa"
LR_FACTORS = (0.1, 0.3, 1.0, 3.0)  # the default grid, times the configured client step: 30x
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)  # test accuracy is reported at these parts of the budget
DEFAULT_TUNE_SCORE = "rounds"  # a key of TUNE_SCORES: each trial scored over all its rounds
COVERAGE = 1 / 3  # a budget score over fewer than this share of a trial's rounds is warned about
Runs = dict[str, dict[int, list[dict]]]  # strategy -> seed -> metrics rows


class Setting(NamedTuple):
    """A point of the tuning grid; ``server_lr`` is None for strategies without a server step."""

    client_lr: float
    server_lr: float | None

    def overrides(self) -> list[str]:
        out = [f"client_optimizer.learning_rate={self.client_lr}"]
        return out + ([] if self.server_lr is None else
                      [f"server_optimizer.learning_rate={self.server_lr}"])

    @property
    def folder(self) -> str:
        server = "" if self.server_lr is None else f"_slr{self.server_lr:g}"
        return f"lr{self.client_lr:g}{server}"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="compare strategies in simulated wall-clock time (tuned, paired seeds)",
        description="Tunes every strategy on the same grid (validation split), runs the chosen "
                    "settings on paired seeds (test split) and reports time to target and "
                    "accuracy at fixed budgets with bootstrap confidence intervals.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p, " of every run")
    p.add_argument("--output-dir", default="runs/compare", help="default runs/compare")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                   help=f"comma-separated strategy names (default {DEFAULT_STRATEGIES})")
    p.add_argument("--reference", default="adaptive",
                   help="the strategy paired against every other one (default adaptive)")
    p.add_argument("--seeds", default="0-4", help="reporting seeds: list and ranges (default 0-4)")
    p.add_argument("--tune-seeds", default="1000",
                   help="tuning seeds, disjoint from --seeds (default 1000)")
    p.add_argument("--lr-grid", help="client learning rates tried by every strategy "
                                     "(default: the configured one times 0.1, 0.3, 1, 3)")
    p.add_argument("--server-lr-grid", help="server steps tried by the strategies that have one "
                                            "(default: the configured one, not tuned)")
    p.add_argument("--tune-score", default=DEFAULT_TUNE_SCORE, metavar="{rounds,budget}",
                   help="a trial's score: its mean validation accuracy over all its rounds "
                        "(rounds, the default) or over the tuning stage's wall-clock budget "
                        "(budget: a strategy with long rounds is scored on its start only)")
    p.add_argument("--validation-fraction", type=float, default=0.5,
                   help="share of the held-out data used for validation (default 0.5)")
    p.add_argument("--budget", type=float,
                   help="simulated wall-clock budget in seconds "
                        "(default: each stage's shortest run)")
    p.add_argument("--target", type=float, help="target test accuracy (default: 90%% of the best "
                                                "validation accuracy of the tuning stage)")
    p.add_argument("--show-seeds", action="store_true", help="also draw each seed's curve")
    p.add_argument("--no-pack", action="store_true",
                   help="train every run on its own (default: packed, see below)")
    p.set_defaults(func=main)


# ---------------------------------------------------------------------------------- curves ---

def curve(rows: list[dict], x_key: str = "sim_clock_s") -> tuple[np.ndarray, np.ndarray]:
    """``(x, held-out accuracy)`` at a run's evaluations (round 0 sits at time 0)."""
    points = [(r.get(x_key, 0.0), r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    xs, ys = zip(*points)
    return np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def end_time(rows: list[dict]) -> float:
    return float(rows[-1].get("sim_clock_s", 0.0))


def shortest(runs: Runs) -> float:
    """The shortest run's simulated time: a budget every run covers."""
    return min(end_time(rows) for by_seed in runs.values() for rows in by_seed.values())


def time_to_target(rows: list[dict], target: float) -> float:
    """Simulated seconds to the first evaluation at or above ``target`` (``inf``: never)."""
    return stats.first_crossing(*curve(rows), target)


def accuracy_at(rows: list[dict], seconds: float) -> float:
    """Held-out accuracy of the last evaluation at or before ``seconds`` of simulated time."""
    return float(stats.step_value(*curve(rows), seconds))


def first_round_time(rows: list[dict]) -> float:
    """Simulated seconds at the end of a run's first round."""
    return float(next(r["sim_clock_s"] for r in rows if r.get("round", 0) >= 1))


def rounds_within(rows: list[dict], budget: float) -> int:
    """Rounds a run completes within ``budget`` simulated seconds."""
    return sum(1 for r in rows if r.get("round", 0) >= 1 and r["sim_clock_s"] <= budget)


def roundless(stage: str, runs: dict[str, list[list[dict]]], budget: float, log=print,
              coverage: float = 0.0) -> list[dict]:
    """Strategies with runs that complete no round within ``budget`` (their score or result
    there is the untrained model's) or, with ``coverage``, fewer than that share of their rounds
    (a budget score sees their start only): one warning line each, logged, and returned as
    records for ``protocol.json``."""
    found = []
    for name, all_rows in runs.items():
        short = [rows for rows in all_rows
                 if rounds_within(rows, budget) < max(1, coverage * rows[-1]["round"])]
        if not short:
            continue
        done = min(rounds_within(rows, budget) for rows in short)
        first = min(map(first_round_time, short))
        found.append({"stage": stage, "strategy": name, "runs": len(short), "of": len(all_rows),
                      "rounds_within": done, "rounds": short[0][-1]["round"],
                      "round_s": first, "budget_s": budget})
        where = f"on {len(short)} of its {len(all_rows)} {stage} runs"
        log(f"compare: warning: {name}'s first round takes {first:.4g} s or more {where}, past "
            f"the {stage} budget of {budget:.4g} s: it completes no round there, so its result "
            f"is degenerate; a longer --budget (or more --rounds) fixes it." if done == 0 else
            f"compare: warning: {name} completes under {coverage:.0%} of its "
            f"{short[0][-1]['round']} rounds (as few as {done}) within the {stage} budget of "
            f"{budget:.4g} s {where}, so its {stage} score sees its start only; --tune-score "
            f"rounds scores every trial over all its rounds.")
    return found


def budget_score(rows: list[dict], budget: float) -> float:
    """Mean validation accuracy over ``[0, budget]`` simulated seconds (the step curve's area):
    a strategy with long rounds is scored on the rounds that fit in the budget."""
    return stats.area_under(*curve(rows), budget)


def rounds_score(rows: list[dict], budget: float) -> float:
    """Mean validation accuracy over the whole run, by round (the area under its
    accuracy-vs-round curve over its rounds; ``budget`` unused): the same rounds for every
    strategy, so a collapse after the first rounds costs the rounds it lasts."""
    return stats.curve_mean(*curve(rows, "round"))


TUNE_SCORES = {"rounds": rounds_score, "budget": budget_score}  # --tune-score


# ------------------------------------------------------------------------------ statistics ---

def tuning_table(trials: dict[str, dict[Setting, dict[int, list[dict]]]], budget: float,
                 tune_score: str = DEFAULT_TUNE_SCORE) -> tuple[list[dict], dict[str, Setting]]:
    """Every trial's score (``TUNE_SCORES[tune_score]``, mean over the tuning seeds) and each
    strategy's best setting."""
    score = TUNE_SCORES[tune_score]
    table, chosen = [], {}
    for name, by_setting in trials.items():
        scores = {s: float(np.mean([score(rows, budget) for rows in by_seed.values()]))
                  for s, by_seed in by_setting.items()}
        chosen[name] = max(scores, key=scores.get)  # ties: the first (smallest) setting
        table += [{"strategy": name, "client_lr": s.client_lr,
                   "server_lr": "-" if s.server_lr is None else s.server_lr,
                   "validation_score": f"{v:.4f}", "chosen": "yes" if s == chosen[name] else ""}
                  for s, v in scores.items()]
    return table, chosen


def censored_times(runs: Runs, target: float, budget: float) -> dict[str, np.ndarray]:
    """Per strategy, the seeds' times to target censored at the budget, in one seed order."""
    seeds = sorted(next(iter(runs.values())))
    return {name: stats.censor([time_to_target(by_seed[s], target) for s in seeds], budget)[0]
            for name, by_seed in runs.items()}


def summarize(runs: Runs, settings: dict[str, Setting], target: float, budget: float
              ) -> list[dict]:
    """One row per strategy: its setting, seeds reaching the target within the budget,
    restricted mean time to target and test accuracy at parts of the budget (95% CIs over
    seeds), and what it did per round (participants, kept rank, simulated round time)."""
    table = []
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        times, reached = stats.censor([time_to_target(by_seed[s], target) for s in seeds], budget)
        rounds = [r for s in seeds for r in by_seed[s] if "participants" in r]
        row = {"strategy": name, "client_lr": settings[name].client_lr,
               "server_lr": "-" if settings[name].server_lr is None else settings[name].server_lr,
               "reached": f"{int(reached.sum())}/{len(seeds)}",
               "time_to_target_s": str(stats.mean_ci(times))}
        row.update({f"accuracy_at_{f * budget:.3g}s": str(stats.mean_ci(
            [accuracy_at(by_seed[s], f * budget) for s in seeds])) for f in BUDGET_FRACTIONS})
        row.update(participants=f"{np.mean([r['participants'] for r in rounds]):.3g}",
                   mean_rank=f"{np.mean([r['mean_rank'] for r in rounds]):.3g}",
                   round_s=f"{np.mean([r['round_total_s'] for r in rounds]):.3g}")
        table.append(row)
    return table


def paired_table(runs: Runs, reference: str, target: float, budget: float) -> list[dict]:
    """``reference`` against every other strategy over paired seeds (censored times)."""
    times = censored_times(runs, target, budget)
    table = []
    for name in runs:
        if name == reference:
            continue
        p = stats.paired(times[reference], times[name])
        table.append({"baseline": name, f"{reference}_faster": f"{p.faster:.2f}",
                      "ties": f"{p.ties:.2f}", "time_ratio": str(p.ratio),
                      "mean_log_ratio": str(p.log_ratio)})
    return table


def strongest(runs: Runs, reference: str, budget: float) -> dict[str, str]:
    """The baseline with the highest mean test accuracy at each part of the budget."""
    out = {}
    for f in BUDGET_FRACTIONS:
        means = {name: np.mean([accuracy_at(rows, f * budget) for rows in by_seed.values()])
                 for name, by_seed in runs.items() if name != reference}
        if means:
            best = max(means, key=means.get)
            out[f"{f * budget:.3g}s"] = f"{best} ({means[best]:.4f})"
    return out


def write_table(table: list[dict], out: Path, stem: str, header: list[str] = ()) -> None:
    """``STEM.csv`` and ``STEM.md`` (with ``header`` lines above the table)."""
    keys = list(table[0])
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(table)
    lines = [*header, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in table]
    (out / f"{stem}.md").write_text("\n".join(lines).lstrip("\n") + "\n")


# ----------------------------------------------------------------------------------- plots ---

def curve_figure(runs: Runs, x_key: str, grid: np.ndarray, target: float, *,
                 show_seeds: bool = False):
    """Test accuracy against ``x_key`` on ``grid``: per strategy the mean over seeds (one line)
    with its 95% bootstrap band; each seed as a thin unlabelled line on request."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, by_seed) in enumerate(runs.items()):
        color, style = f"C{i % 10}", ("-", "--", ":")[i // 10 % 3]
        values = np.stack([stats.step_value(*curve(rows, x_key), grid)
                           for rows in by_seed.values()])
        band = stats.mean_ci(values, resamples=999)
        ax.plot(grid, band.mean, color=color, ls=style, label=f"{name} ({len(values)} seeds)")
        ax.fill_between(grid, band.low, band.high, color=color, alpha=0.2, lw=0)
        if show_seeds:
            ax.plot(grid, values.T, color=color, lw=0.5, alpha=0.3)
    ax.axhline(target, color="gray", ls="--", lw=1)
    ax.set_xlabel({"sim_clock_s": "simulated wall-clock (s)"}.get(x_key, x_key))
    ax.set_ylabel("test accuracy (mean, 95% CI)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(runs: Runs, target: float, budget: float, out: Path, *, show_seeds: bool = False
         ) -> list[Path]:
    """``accuracy_vs_clock.png`` (over the budget) and ``accuracy_vs_round.png``."""
    import matplotlib.pyplot as plt

    rounds = np.unique(np.concatenate([curve(rows, "round")[0] for by_seed in runs.values()
                                       for rows in by_seed.values()]))
    axes = (("sim_clock_s", np.linspace(0.0, budget, 201), "accuracy_vs_clock.png"),
            ("round", rounds, "accuracy_vs_round.png"))
    paths = []
    for x_key, grid, file in axes:
        fig = curve_figure(runs, x_key, grid, target, show_seeds=show_seeds)
        fig.savefig(out / file, dpi=120)
        plt.close(fig)
        paths.append(out / file)
    return paths


# ------------------------------------------------------------------------------------ runs ---

def run_configs(cfgs: dict[tuple, object], jsonl: Path, log=print, pack: bool = True
                ) -> dict[tuple, list[dict]]:
    """Trains (or reuses) every config, as packs where they allow
    (:func:`fedlora_jax.train.train_all`); ``jsonl`` gets every row tagged with its key's
    fields."""
    from fedlora_jax import rundir
    from fedlora_jax.train import train_all

    results = {key: rundir.finished_rows(cfg) for key, cfg in cfgs.items()}
    for key, rows in results.items():
        if rows:
            log(f"compare: {cfgs[key].output_dir} (finished before: reused)")
    todo = [key for key, rows in results.items() if not rows]
    trained = train_all([cfgs[key] for key in todo], pack=pack,
                        log=lambda line: log(f"compare: {line}"))
    results.update(zip(todo, trained))
    with open(jsonl, "w") as f:
        for key, cfg in cfgs.items():
            tag = {"strategy": cfg.strategy, "seed": cfg.federation.seed,
                   "client_lr": cfg.client_optimizer.learning_rate,
                   "server_lr": cfg.server_optimizer.learning_rate}
            f.writelines(json.dumps({**tag, **row}) + "\n" for row in results[key])
    return results


class Protocol(NamedTuple):
    """Everything a comparison needs, validated before anything runs."""

    names: list[str]
    seeds: list[int]
    tune_seeds: list[int]
    grids: dict[str, list[Setting]]  # strategy -> its tuning grid
    config: Callable[[str, Setting, int, str], object]  # (name, setting, seed, split) -> RunConfig
    tune_score: str = DEFAULT_TUNE_SCORE


def plan_protocol(args) -> Protocol:
    """Parses the command line and builds (hence validates) every config the protocol may run."""
    from fedlora_jax import strategies
    from fedlora_jax.config import load_config

    names = _parse_list(args.strategies, str, "strategies")
    for name in names:
        strategies.get_strategy(name)
    seeds = _parse_seeds(args.seeds, "seeds")
    tune_seeds = _parse_seeds(args.tune_seeds, "tune-seeds")
    both = sorted(set(seeds) & set(tune_seeds))
    require(not both, "--tune-seeds", args.tune_seeds, "be disjoint from --seeds",
            f"both hold {both}; e.g. --tune-seeds 1000,1001")
    require(args.budget is None or args.budget > 0, "--budget", args.budget,
            "be a positive number of seconds")
    require(args.tune_score in TUNE_SCORES, "--tune-score", args.tune_score,
            f"be one of {', '.join(TUNE_SCORES)}",
            "rounds scores a trial over all its rounds, budget over the wall-clock budget")
    base = [f"{key}={getattr(args, name)}" for name, key in CONFIG_SHORTCUTS.items()
            if getattr(args, name) is not None]
    base = ["eval_every=1", *base, *args.overrides,
            f"data.validation_fraction={args.validation_fraction}"]
    default = load_config(args.config, base, preset=args.preset)
    lrs = (_parse_list(args.lr_grid, float, "lr-grid") if args.lr_grid else
           [float(f"{f * default.client_optimizer.learning_rate:.3g}") for f in LR_FACTORS])
    server_lrs = (_parse_list(args.server_lr_grid, float, "server-lr-grid") if args.server_lr_grid
                  else [default.server_optimizer.learning_rate])
    require(min(lrs + server_lrs) > 0, "--lr-grid and --server-lr-grid", lrs + server_lrs,
            "be positive learning rates")
    grids = {name: [Setting(lr, slr if "server_optimizer" not in
                            strategies.get_strategy(name).settings() else None)
                    for lr in lrs for slr in server_lrs] for name in names}
    grids = {name: list(dict.fromkeys(grid)) for name, grid in grids.items()}
    out = Path(args.output_dir)

    def config(name: str, setting: Setting, seed: int, split: str):
        folder = (out / "tuning" / name / setting.folder if split == "validation" else out / name)
        return load_config(  # validated, with the strategy's pinned settings applied
            args.config, [*base, *setting.overrides(), f"data.evaluate_on={split}",
                          f"strategy={name}", f"federation.seed={seed}",
                          f"output_dir={folder / f'seed{seed}'}"], preset=args.preset)

    for name, grid in grids.items():  # every config either stage may build
        for setting in grid:
            config(name, setting, tune_seeds[0], "validation")
            config(name, setting, seeds[0], "test")
    if args.reference not in names:
        print(f"compare: --reference {args.reference!r} is not among the strategies; "
              "no paired table.")
    return Protocol(names, seeds, tune_seeds, grids, config, args.tune_score)


def tune(protocol: Protocol, out: Path, budget: float | None, pack: bool = True
         ) -> tuple[dict[str, Setting], float, float, list[dict]]:
    """The tuning stage (validation split only): each strategy's chosen setting, the stage's
    budget, the best validation accuracy reached within it and the :func:`roundless` warnings;
    writes ``tuning.*``."""
    keys = [(name, s, seed) for name in protocol.names for s in protocol.grids[name]
            for seed in protocol.tune_seeds]
    done = run_configs({k: protocol.config(*k, "validation") for k in keys}, out / "tuning.jsonl",
                       pack=pack)
    trials: dict = {name: {} for name in protocol.names}
    for (name, setting, seed), rows in done.items():
        trials[name].setdefault(setting, {})[seed] = rows
    budget = budget or min(shortest(by_setting) for by_setting in trials.values())
    table, chosen = tuning_table(trials, budget, protocol.tune_score)
    scored = {"rounds": "all its rounds (the area under its accuracy-vs-round curve)",
              "budget": f"the first {budget:.4g} simulated seconds"}[protocol.tune_score]
    write_table(table, out, "tuning", [f"Validation score (--tune-score {protocol.tune_score}): "
                                       f"each trial's mean validation accuracy over {scored}."])
    best = max(acc for rows in done.values() for t, acc in zip(*curve(rows)) if t <= budget)
    warnings = roundless("tuning", {name: [rows for by_seed in by_setting.values()
                                           for rows in by_seed.values()]
                                    for name, by_setting in trials.items()}, budget,
                         coverage=COVERAGE if protocol.tune_score == "budget" else 0.0)
    return chosen, budget, best, warnings


def report(protocol: Protocol, chosen: dict[str, Setting], out: Path, *, target: float,
           budget: float | None, reference: str, show_seeds: bool, pack: bool = True
           ) -> tuple[float, list[str], list[dict]]:
    """The reporting stage (test split): runs each chosen setting on the seeds, writes the
    summary and paired tables and the figures; returns the budget, the tables written and the
    :func:`roundless` warnings."""
    # seed by seed, so an interrupted comparison leaves whole seeds to report (--seeds 0-K)
    keys = [(name, chosen[name], seed) for seed in protocol.seeds for name in protocol.names]
    done = run_configs({k: protocol.config(*k, "test") for k in keys}, out / "metrics.jsonl",
                       pack=pack)
    runs: Runs = {name: {} for name in protocol.names}
    for (name, _, seed), rows in done.items():
        runs[name][seed] = rows
    budget = budget or shortest(runs)
    warnings = roundless("reporting", {name: list(by_seed.values()) for name, by_seed in runs.items()},
                         budget)
    header = [f"Test accuracy target {target:.4f}, budget {budget:.4g} simulated seconds, "
              f"{len(protocol.seeds)} paired seeds; mean [95% bootstrap CI]."]
    write_table(summarize(runs, chosen, target, budget), out, "summary",
                header + [f"Strongest baseline at {t}: {b}." for t, b in
                          strongest(runs, reference, budget).items()])
    tables = ["summary"]
    if reference in runs and len(runs) > 1:
        write_table(paired_table(runs, reference, target, budget), out, "paired", header)
        tables.append("paired")
    plot(runs, target, budget, out, show_seeds=show_seeds)
    return budget, tables, warnings


def main(args) -> int:
    protocol = plan_protocol(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen, tune_budget, best, tune_warnings = tune(protocol, out, args.budget,
                                                    pack=not args.no_pack)
    target = 0.9 * best if args.target is None else args.target
    budget, tables, warnings = report(protocol, chosen, out, target=target, budget=args.budget,
                                      reference=args.reference, show_seeds=args.show_seeds,
                                      pack=not args.no_pack)
    (out / "protocol.json").write_text(json.dumps(
        {"target": target, "budget_s": budget, "tuning_budget_s": tune_budget,
         "tune_score": protocol.tune_score,
         "seeds": protocol.seeds, "tune_seeds": protocol.tune_seeds,
         "chosen": {n: s._asdict() for n, s in chosen.items()},
         "grid": {n: [s._asdict() for s in g] for n, g in protocol.grids.items()},
         "warnings": tune_warnings + warnings}, indent=2))
    for stem in ("tuning", *tables):
        print((out / f"{stem}.md").read_text())
    print(f"wrote {out}/: {', '.join(('tuning', *tables))} tables (.csv, .md), "
          "accuracy_vs_clock.png, accuracy_vs_round.png, metrics.jsonl, tuning.jsonl, "
          "protocol.json")
    return 0


def _parse_list(text: str, kind, what: str) -> list:
    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be a comma-separated list, got {text!r}.") from None
    if not items:
        raise ValueError(f"--{what} is empty.")
    return items


def _parse_seeds(text: str, what: str) -> list[int]:
    """``0,3,5-9`` -> [0, 3, 5, 6, 7, 8, 9] (ranges inclusive)."""
    seeds = []
    for item in _parse_list(text, str, what):
        first, _, last = item.strip().partition("-")
        try:
            seeds += list(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ValueError(f"--{what} takes integers and ranges like 0-19, "
                             f"got {item!r}.") from None
    require(bool(seeds) and len(set(seeds)) == len(seeds), f"--{what}", text, "name distinct seeds")
    return seeds
