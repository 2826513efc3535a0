"""What a run's strategy planned, set against what the simulation then did: the lines the run's
summary prints under ``plan``.

The prediction is the solver's model of a round's expected cost (:func:`solver.expected_round_time`
at the plan's ``(q, k / r)``, with the run's network, workload and per-round overhead, adaptive
bandwidth allocation); the simulation is the mean of the rounds that ran under the final plan
(the rounds since the strategy last planned), taken from the metrics rows' ``sim_clock_s``.
The model samples clients independently; for the strategies that draw exactly K of N it treats
their draw as independent at the same ``q``, and it allocates bandwidth adaptively even where the
run splits the band equally, so there the two times differ by design.
"""

from __future__ import annotations

import jax
import numpy as np

from fedlora_jax import solver as solver_lib
from fedlora_jax.strategies.base import Context, Plan

# Jitted: evaluated op by op, the surrogate's loops and quadrature cost seconds at the end of a run.
_expected_round_time = jax.jit(solver_lib.expected_round_time, static_argnames="cfg")


def predicted_round_s(ctx: Context, plan: Plan) -> float:
    """The solver's expected cost of one round of ``plan`` (seconds, empty rounds included).

    ``G_n^2``, ``alpha`` and ``beta`` do not enter a round's time, so placeholders stand for them.
    """
    n = ctx.num_clients
    problem = solver_lib.make_problem(ctx.profile, ctx.system, ctx.workload, np.ones(n, np.float32),
                                      ctx.weights, 1.0, 1.0, overhead_s=ctx.round_overhead_s)
    rho = np.asarray(plan.k, np.float32) / ctx.rank
    cfg = solver_lib.SolverConfig(rank=ctx.rank).numerics()  # the rank does not enter a round's time
    return float(_expected_round_time(problem, np.asarray(plan.q, np.float32), rho, cfg))


def simulated_round_s(history: list[dict], since_round: int) -> tuple[float, int]:
    """Mean simulated seconds of the rounds ``>= since_round`` in the metrics rows, and how many."""
    rows = sorted((h["round"], h["sim_clock_s"]) for h in history if "sim_clock_s" in h)
    rounds, clock = (np.array(x, np.float64) for x in zip(*rows))
    took = np.diff(clock)[rounds[1:] >= since_round]
    return (float(took.mean()) if took.size else float("nan")), int(took.size)


def _quantiles(x: np.ndarray) -> str:
    lo, q1, med, q3, hi = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
    return f"min {lo:.3g}, quartiles {q1:.3g} / {med:.3g} / {q3:.3g}, max {hi:.3g}"


def _counts(k: np.ndarray) -> str:
    values, counts = np.unique(k, return_counts=True)
    return ", ".join(f"{v}: {c}" for v, c in zip(values.tolist(), counts.tolist()))


def summary(ctx: Context, plan: Plan, history: list[dict], since_round: int) -> str:
    """The ``plan`` section of a run's summary: the final plan (planned for round ``since_round``
    on), its predicted against its simulated round time, and the accuracy reached."""
    q, k = np.asarray(plan.q), np.asarray(plan.k)
    predicted = predicted_round_s(ctx, plan)
    simulated, count = simulated_round_s(history, since_round)
    evaluated = [h for h in history if "eval_accuracy" in h]
    best = max(evaluated, key=lambda h: h["eval_accuracy"])
    return "\n".join([
        f"plan (in use from round {since_round})",
        f"  expected participants  {q.sum():.2f} of {q.size}",
        f"  q_n                    {_quantiles(q)}",
        f"  k_n (rank {ctx.rank}: clients)  {_counts(k)}",
        f"  round time             predicted {predicted:.4g} s, simulated {simulated:.4g} s "
        f"(mean of {count} rounds)",
        f"  held-out accuracy      {evaluated[-1]['eval_accuracy']:.4f} at round "
        f"{evaluated[-1]['round']} (best {best['eval_accuracy']:.4f} at round {best['round']})"])


def last_planned(strategy, rounds: int) -> int:
    """The last round ``<= rounds`` at which ``strategy`` planned (its final plan's first round)."""
    return max(r for r in range(1, rounds + 1) if strategy.due(r))
