"""Is the default task stable? ``fedlora-jax run`` with the default config (plus ``--set``
overrides) over several seeds, the held-out set scored after every round, reporting per seed the
accuracy curve, the largest drop between consecutive evaluations after round ``--after``, the
final accuracy with its standard error ``sqrt(p (1 - p) / H)``, and the host time with the
evaluation's share of it (the first evaluation includes its compile).

    python benchmarks/default_stability.py --set strategy=fedit \\
        --set federation.participants=20 --seeds 0,1,2 --json fedit.json
"""

from __future__ import annotations

import tempfile
import time
from unittest import mock

import numpy as np

from fedlora_jax import train as train_lib
from fedlora_jax.config import load_config
from common import load_average, parser, write_rows  # benchmarks/common.py


def run_seed(seed: int, overrides: list[str], eval_every: int) -> dict:
    """One training run; its evaluation curve, drops and host time."""
    seconds, heldout = [], []
    evaluate = train_lib.evaluate

    def timed_evaluate(setup, state):
        heldout.append(len(setup.heldout["labels"]))
        start = time.perf_counter()
        row = evaluate(setup, state)  # host floats: the evaluation has finished
        seconds.append(time.perf_counter() - start)
        return row

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides=[f"output_dir={tmp}", f"federation.seed={seed}",
                                     f"eval_every={eval_every}", "checkpoint_every=0",
                                     *overrides])
        load = load_average()
        start = time.perf_counter()
        with mock.patch.object(train_lib, "evaluate", timed_evaluate):
            history = train_lib.train(cfg, progress="none", log=lambda *_: None)
        total = time.perf_counter() - start
    evaluated = [h for h in history if "eval_accuracy" in h]
    return {"seed": seed, "strategy": cfg.strategy, "rounds": [h["round"] for h in evaluated],
            "accuracy": [h["eval_accuracy"] for h in evaluated],
            "loss": [h["eval_loss"] for h in evaluated],
            "participants": float(np.mean([h["participants"] for h in history[1:]])),
            "sim_clock_s": history[-1]["sim_clock_s"], "heldout": heldout[0],
            "run_s": total, "eval_s": float(np.sum(seconds)), "first_eval_s": seconds[0],
            "load_average": [load, load_average()]}


def drops(rounds: list[int], accuracy: list[float], after: int) -> float:
    """The largest fall of accuracy between consecutive evaluations that end after ``after``."""
    falls = [a - b for r, a, b in zip(rounds[1:], accuracy, accuracy[1:]) if r > after]
    return max([0.0, *falls])


def main(argv=None) -> list[dict]:
    p = parser(__doc__, "seeds 0 only")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, as for 'fedlora-jax run'")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--eval-every", type=int, default=1, help="rounds between evaluations")
    p.add_argument("--after", type=int, default=4,
                   help="count drops between evaluations after this round")
    args = p.parse_args(argv)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        row = run_seed(seed, args.overrides, args.eval_every)
        row["max_drop"] = drops(row["rounds"], row["accuracy"], args.after)
        final = row["accuracy"][-1]
        row["final_se"] = float(np.sqrt(final * (1 - final) / row["heldout"]))
        rows.append(row)
        curve = " ".join(f"{a:.2f}" for a in row["accuracy"])
        share = row["eval_s"] / row["run_s"]
        print(f"seed {seed} {row['strategy']}: acc {curve} | max drop after round {args.after} "
              f"{row['max_drop']:.3f} | final {final:.4f} (SE {row['final_se']:.4f}, "
              f"H={row['heldout']}) | participants {row['participants']:.1f} | host "
              f"{row['run_s']:.0f} s, eval {row['eval_s']:.1f} s ({share:.0%}, first "
              f"{row['first_eval_s']:.1f} s) | load {row['load_average'][0]:.1f}", flush=True)
    return write_rows(rows, args.json, overrides=args.overrides, after=args.after)


if __name__ == "__main__":
    main()
