"""Is an ``adaptive`` run's plan what its own model calls optimal? Checked from the run's logged
estimates (its last checkpoint), without training.

    python benchmarks/plan_audit.py RUN_DIR [--random 4096]

From the checkpoint's estimates (``G_n^2`` per client, the signal ``|g|^2``) the strategy plans
again (``Adaptive.plan``: the solver), and the plan's model objective ``J = R(q, rho) E[T]`` is
held against (1) the fixed baselines (uniform ``q`` at full rank, at the fixed sketch ratio,
everyone at full rank), (2) every one-client move (``q_n`` x 0.8 or x 1.25 within
``[q_min, 1]``, ``k_n`` +-1 within ``[1, r]``) and (3) ``--random`` uniformly random plans
(``log q`` uniform in ``[log q_min, 0]``, ``k`` uniform on the grid). A plan that is optimal under
the model beats all three; the share of moves that would improve it measures how far it is from a
local optimum. The plan the run actually used (planned earlier, from older estimates) is scored
on the same model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import checkpoint, solver as solver_lib, strategies, theory
from fedlora_jax.build import build, strategy_context
from fedlora_jax.config import load_config
from fedlora_jax.train import RunState


def restore(run_dir: Path):
    """(ctx, strategy, estimates, plan in use, round) from a run's config and newest checkpoint."""
    cfg = load_config(str(run_dir / "config.json"))
    setup = build(cfg)
    ctx = strategy_context(cfg, setup)
    fresh = RunState(setup.engine.init(), strategies.init_estimates(ctx.num_clients),
                     ctx.uniform())
    with checkpoint.Checkpointer(run_dir / "checkpoints") as saved:
        state, _ = saved.restore(fresh)
    return ctx, strategies.strategy_of(cfg), state.estimates, state.plan, int(state.server.round)


def objective(ctx, est, strategy):
    """The model the strategy solves at ``est``: ``J(q, k)`` (batched over leading axes), and q_min."""
    q_min = min(strategy.q_min, ctx.q_default)
    cfg = solver_lib.SolverConfig(rank=ctx.rank, q_min=q_min, baseline_q=ctx.q_default)
    problem = solver_lib.make_problem(ctx.profile, ctx.system, ctx.workload, est.g2, ctx.weights,
                                      1.0 / est.signal, 1.0,
                                      law=theory.update_law(ctx.client_optimizer),
                                      overhead_s=ctx.round_overhead_s)
    single = lambda q, k: solver_lib.objective_terms(problem, q, k / ctx.rank, cfg)["objective"]
    batched = jax.jit(jax.vmap(single))
    return (lambda q, k: np.asarray(batched(jnp.atleast_2d(q), jnp.atleast_2d(k).astype(jnp.float32)))), q_min


def moves(q, k, q_min, rank):
    """Every one-client move of the plan, as stacked (M, N) arrays."""
    qs, ks = [], []
    for n in range(q.size):
        for factor in (0.8, 1.25):
            qs.append(q.copy()); qs[-1][n] = np.clip(q[n] * factor, q_min, 1.0); ks.append(k)
        for step in (-1, 1):
            ks.append(k.copy()); ks[-1][n] = np.clip(k[n] + step, 1, rank); qs.append(q)
    return np.stack(qs), np.stack(ks)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--random", type=int, default=4096, help="random plans to compare against")
    args = p.parse_args(argv)
    ctx, strategy, est, used, round_ = restore(args.run_dir)
    if strategy.name != "adaptive" or est.signal <= 0:
        p.error(f"{args.run_dir}: needs an adaptive run past its pilot rounds "
                f"(strategy {strategy.name!r}, signal {est.signal:g})")
    J, q_min = objective(ctx, est, strategy)
    plan = strategy.plan(round_ + 1, ctx, est)
    q, k = np.asarray(plan.q, np.float32), np.asarray(plan.k, np.int32)
    j = float(J(q, k)[0])
    n, r = ctx.num_clients, ctx.rank
    base = {"uniform, full rank": (np.full(n, ctx.q_default), np.full(n, r)),
            "uniform, fixed ratio": (np.full(n, ctx.q_default), np.full(n, max(1, round(r / 4)))),
            "everyone, full rank": (np.ones(n), np.full(n, r))}
    mq, mk = moves(q, k, q_min, r)
    jm = J(mq.astype(np.float32), mk)
    rng = np.random.default_rng(0)
    rq = np.exp(rng.uniform(np.log(q_min), 0.0, (args.random, n))).astype(np.float32)
    rk = rng.integers(1, r + 1, (args.random, n))
    jr = J(rq, rk)
    report = {
        "run": str(args.run_dir), "checkpoint_round": round_, "signal": est.signal,
        "g2_mean": float(np.mean(est.g2)), "g2_min_max": [float(np.min(est.g2)), float(np.max(est.g2))],
        "plan": {"expected_participants": float(q.sum()), "mean_rank": float(k.mean()), "J": j},
        "plan_in_use": {"expected_participants": float(used.q.sum()),
                        "mean_rank": float(np.mean(used.k)),
                        "J": float(J(np.asarray(used.q, np.float32), np.asarray(used.k))[0])},
        "baselines_J": {name: float(J(bq.astype(np.float32), bk)[0]) for name, (bq, bk) in base.items()},
        "moves": {"count": int(jm.size), "improving": int(np.sum(jm < j * (1 - 1e-4))),
                  "best_relative_gain": float(max(0.0, 1 - jm.min() / j))},
        "random_plans": {"count": args.random, "better": int(np.sum(jr < j)),
                         "best_J": float(jr.min())}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
