"""``fedlora-jax plot``: rebuild a run's figures and CSV from its saved metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  fedlora-jax plot runs/latest
  fedlora-jax plot runs/a runs/b --out figures

Reads RUN_DIR/metrics.jsonl (and RUN_DIR/allocation.json when present) and writes
learning_curves.png (loss and accuracy against rounds and simulated wall-clock), round_times.png
(distribution of simulated round times), allocation.png (q and rho per client against compute
speed and channel quality) and metrics.csv. 'fedlora-jax run' writes the same at its end.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot", help="rebuild a run's figures and metrics.csv from its saved metrics",
        description="Plots of one or more finished (or running) runs, from their saved files.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="output directory of a run (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, help="write here instead of into each RUN_DIR "
                                            "(one subdirectory per run when several)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from fedlora_jax.metrics import plot_run, read_rows

    for run_dir in args.run_dirs:
        first = next(iter(read_rows(run_dir)), {})
        if "strategy" in first:  # compare's table of every run
            raise ValueError(f"{run_dir} is a 'fedlora-jax compare' folder, whose figures compare "
                             "writes; plot one of its runs, e.g. 'fedlora-jax plot "
                             f"{run_dir / first['strategy'] / ('seed' + str(first['seed']))}'.")
        out = args.out if args.out is None or len(args.run_dirs) == 1 else args.out / run_dir.name
        written = plot_run(run_dir, out)
        print(f"{run_dir}: wrote {', '.join(str(p) for p in written)}")
    return 0
