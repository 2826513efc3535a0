"""The held-out evaluation's share of a default run's wall time: ``fedlora-jax run`` with the
default config (MiniLM-L6, 10 clients, 20 rounds, evaluation every ``eval_every`` rounds and at
rounds 0 and 20), with the time spent in :func:`fedlora_jax.build.evaluate` measured around it.
The first evaluation includes compiling the evaluation program; ``steady`` leaves that out (the
first call counted at the median of the others). ``round_s`` is each round's host time (with its
evaluation, and with planning where the strategy plans: the solver's first compile shows there).

    python benchmarks/eval_share.py --json eval_share.json
"""

from __future__ import annotations

import tempfile
import time
from unittest import mock

import numpy as np

from fedlora_jax import train as train_lib
from fedlora_jax.config import load_config
from common import load_average, parser, write_rows  # benchmarks/common.py


def main(argv=None) -> list[dict]:
    p = parser(__doc__, "10 rounds instead of 20")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, as for 'fedlora-jax run'")
    args = p.parse_args(argv)
    seconds = []

    def timed_evaluate(setup, state):
        start = time.perf_counter()
        row = evaluate(setup, state)  # returns host floats: the evaluation has finished
        seconds.append(time.perf_counter() - start)
        return row

    evaluate = train_lib.evaluate
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}"] + (["federation.rounds=10"] if args.quick else [])
        cfg = load_config(overrides=overrides + args.overrides)
        load = load_average()
        start = time.perf_counter()
        with mock.patch.object(train_lib, "evaluate", timed_evaluate):
            history = train_lib.train(cfg, progress="none")  # prints the run's summary and plan
        total = time.perf_counter() - start
    evals = np.asarray(seconds)
    rounds = np.diff([0.0] + [h["elapsed_s"] for h in history[1:]])  # host s per round (+ its eval)
    steady = evals.sum() - evals[0] + np.median(evals[1:])
    row = {"rounds": cfg.federation.rounds, "eval_every": cfg.eval_every,
           "evaluations": len(evals), "evaluation_s": evals.tolist(), "run_s": total,
           "eval_s": float(evals.sum()), "eval_share": float(evals.sum() / total),
           "steady_eval_share": float(steady / (total - evals[0] + np.median(evals[1:]))),
           "round_s": rounds.tolist(), "load_average": [load, load_average()]}
    print(f"{row['rounds']} rounds, {len(evals)} evaluations (every {cfg.eval_every} rounds): "
          f"run {total:.1f} s, evaluation {row['eval_s']:.1f} s = {row['eval_share']:.0%} "
          f"(first {evals[0]:.1f} s with its compile; others median {np.median(evals[1:]):.2f} s; "
          f"without the compile {row['steady_eval_share']:.0%}); rounds: median "
          f"{np.median(rounds):.1f} s, slowest {rounds.max():.1f} s (round {rounds.argmax() + 1}); "
          f"load {load:.1f}/{load_average():.1f}")
    return write_rows([row], args.json)


if __name__ == "__main__":
    main()
