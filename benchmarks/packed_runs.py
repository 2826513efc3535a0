"""Runs per hour: runs of one config that differ only in their seed, trained one after another
in one process (each run builds its data and model and compiles its own programs, as
``fedlora-jax compare --no-pack`` does), against the same number of runs packed into one compiled
program (:func:`fedlora_jax.train.train_packed`, what ``compare`` and ``sweep`` do by default).

``sequential_runs_per_hour`` is 3600 over the best wall time of one run alone (seeds 0, 1, 2,
...: one per repeat; the runs of a seed sweep cost alike); ``packed_runs_per_hour`` is 3600 R over
the best wall time of the pack of R runs. Both sides include building, compiling, every round,
the evaluations and the checkpoints, and are timed in turns (run, pack, run, pack, ...), at least
3 times each; the min/median/max of each side and the load average are printed with the row.

    python benchmarks/packed_runs.py --quick --json packed.json
    python benchmarks/packed_runs.py --models tiny --runs 32
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from fedlora_jax import train as train_lib
from fedlora_jax.config import load_config
from common import fmt_spread, load_average, parser, spread, write_rows  # benchmarks/common.py

# model -> (preset, overrides, runs, runs with --quick). MiniLM runs 2 rounds (evaluated at the
# end) so that a row fits in a session; the tiny preset runs as it is (10 rounds).
MODELS = {
    "tiny": ("tiny", [], 32, 8),
    "minilm": (None, ["federation.rounds=2", "eval_every=2"], 8, 2),
}


def configs(model: str, seeds: range, out: Path, overrides: list[str]) -> list:
    preset, fixed, _, _ = MODELS[model]
    return [load_config(overrides=[*fixed, *overrides, f"federation.seed={seed}",
                                   f"output_dir={out / f'seed{seed}'}"], preset=preset)
            for seed in seeds]


def measure(model: str, runs: int, repeats: int, overrides: list[str]) -> dict:
    quiet = lambda *_: None
    times = {"sequential": [], "packed": []}
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            (cfg,) = configs(model, range(i, i + 1), Path(tmp) / f"alone{i}", overrides)
            start = time.perf_counter()
            train_lib.train(cfg, progress="none", log=quiet)
            times["sequential"].append(time.perf_counter() - start)
            cfgs = configs(model, range(runs), Path(tmp) / f"packed{i}", overrides)
            start = time.perf_counter()
            train_lib.train_packed(cfgs, log=quiet)
            times["packed"].append(time.perf_counter() - start)
    seconds = {side: spread(np.asarray(t)) for side, t in times.items()}
    sequential = 3600 / seconds["sequential"]["min"]
    packed = 3600 * runs / seconds["packed"]["min"]
    return {"model": model, "runs": runs, "sequential_runs_per_hour": sequential,
            "packed_runs_per_hour": packed, "speedup": packed / sequential,
            "run_alone_s": seconds["sequential"], "pack_s": seconds["packed"],
            "repeats": repeats, "load_average": [load, load_average()],
            "overrides": MODELS[model][1] + overrides}


def main(argv=None) -> list[dict]:
    quick = ", ".join(f"{model} {runs}" for model, (*_, runs) in MODELS.items())
    p = parser(__doc__, f"fewer runs a pack: {quick}")
    p.add_argument("--models", default=",".join(MODELS), help=f"of {list(MODELS)}")
    p.add_argument("--runs", type=int, help="runs a pack (default: per model, see MODELS)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs and packs (at least 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override of every run, as for 'fedlora-jax run'")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be at least 3 (the figures are the best of the repeats)")
    rows = []
    for model in args.models.split(","):
        if model not in MODELS:
            p.error(f"unknown model {model!r}; valid: {list(MODELS)}")
        runs = args.runs or MODELS[model][3 if args.quick else 2]
        row = measure(model, runs, args.repeats, args.overrides)
        rows.append(row)
        print(f"{model}: {runs} runs; one run alone {fmt_spread(row['run_alone_s'], 1)} s, "
              f"the pack {fmt_spread(row['pack_s'], 1)} s (min/median/max of "
              f"{args.repeats}); {row['sequential_runs_per_hour']:.0f} -> "
              f"{row['packed_runs_per_hour']:.0f} runs/hour = {row['speedup']:.2f}x; "
              f"load {row['load_average'][0]:.1f}/{row['load_average'][1]:.1f}", flush=True)
    return write_rows(rows, args.json)


if __name__ == "__main__":
    main()
