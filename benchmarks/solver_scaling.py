"""Solve time and memory of the (q, rho) solver against the number of clients and of scenarios.

    python benchmarks/solver_scaling.py --quick --json runs/solver_scaling.json

Rows: num_clients, scenarios, solve_s (after compile), solve_cpu_s (the process's CPU time over
the same call: on a shared machine it moves less with the other jobs than wall time),
per_scenario_s (solve_s / scenarios: compare the batched rows with the single solve of the same
size), compile_s (first call minus a solve), peak_mem_mb (process peak RSS so
far), objective and uniform_objective (the uniform baseline's; means over scenarios), scipy_s and
scipy_objective (L-BFGS-B on the same jitted objective and gradient, one start at the uniform
baseline, continuous rho; None where skipped as too slow). Goals: N = 10^5 in under 2 s, and 1000
scenarios of 1000 clients (``solve_batch``) at no more per scenario than single solves.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize as so

from fedlora_jax import solver, wireless

SYS = wireless.SystemConfig()
WORK = wireless.workload_from_counts(125e6, 0.3e6, 4096, 5)


def _problem(key, n):
    prof = wireless.generate_profile(key, n, SYS)
    return solver.make_problem(prof, SYS, WORK, jnp.ones(n), jnp.full(n, 1.0 / n), float(n), 100.0, overhead_s=0.0)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _scipy(problem, cfg, n):
    f = jax.jit(jax.value_and_grad(lambda x: jnp.log(solver.objective_terms(
        problem, jnp.exp(x[:n]), jnp.exp(x[n:]), cfg)["objective"])))
    f(jnp.zeros(2 * n))
    bounds = [(np.log(cfg.q_min), 0.0)] * n + [(np.log(1 / cfg.rank), 0.0)] * n
    t0 = time.perf_counter()
    r = so.minimize(lambda x: tuple(np.asarray(v, np.float64) for v in f(jnp.asarray(x, jnp.float32))),
                    np.concatenate([np.full(n, np.log(max(cfg.baseline_q, cfg.q_min))), np.zeros(n)]), jac=True, bounds=bounds, method="L-BFGS-B")
    return time.perf_counter() - t0, float(np.exp(r.fun))


def bench(n: int, scenarios: int, cfg: solver.SolverConfig, with_scipy: bool) -> dict:
    keys = jax.random.split(jax.random.key(0), scenarios)
    if scenarios == 1:
        problem, run = _problem(keys[0], n), solver.solve_problem
        args = (problem, keys[0], cfg)
    else:
        problem = jax.vmap(lambda k: _problem(k, n))(keys)
        run, args = solver.solve_batch, (problem, keys, cfg)
    t0 = time.perf_counter()
    jax.block_until_ready(run(*args))  # compiles (once per client-count bucket)
    compile_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    res = jax.block_until_ready(run(*args))
    solve_s, solve_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    compile_s -= solve_s
    row = {"num_clients": n, "scenarios": scenarios, "solve_s": solve_s, "solve_cpu_s": solve_cpu_s,
           "per_scenario_s": solve_s / scenarios,
           "compile_s": compile_s, "peak_mem_mb": _peak_mb(), "objective": float(jnp.mean(res.objective)),
           "uniform_objective": float(jnp.mean(res.baselines["uniform"]["objective"])),
           "scipy_s": None, "scipy_objective": None}
    if with_scipy and scenarios == 1:
        row["scipy_s"], row["scipy_objective"] = _scipy(problem, cfg, n)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only (about a minute)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--clients", type=int, nargs="+", metavar="N",
                   help="only single solves of these client counts (e.g. --clients 100000)")
    p.add_argument("--sweep", type=int, nargs=3, metavar=("FIRST", "LAST", "STEP"),
                   help="only solve every client count in range(FIRST, LAST + 1, STEP) and print the "
                        "number of compilations")
    args = p.parse_args()
    cfg = solver.SolverConfig(rank=8)
    if args.sweep:
        sizes = range(args.sweep[0], args.sweep[1] + 1, args.sweep[2])
        for n in sizes:
            jax.block_until_ready(solver.solve_problem(_problem(jax.random.key(n), n), jax.random.key(0), cfg).q)
        print(f"compilations for {len(sizes)} client counts in {args.sweep}: {solver.compile_count()}")
        return
    if args.clients:
        plan = [(n, 1, False) for n in args.clients]
    elif args.quick:
        plan = [(100, 1, True), (1000, 1, False), (10_000, 1, False), (100_000, 1, False), (100, 10, False),
                (1000, 100, False)]
    else:
        plan = [(10 ** e, 1, e <= 4) for e in range(2, 7)] + [(100, 100, False), (1000, 100, False),
                                                              (1000, 1000, False)]
    rows = []
    print(f"{'clients':>9} {'scen':>5} {'solve_s':>9} {'cpu_s':>7} {'per_scen':>9} {'compile_s':>9} {'peak_MB':>8} {'objective':>11} "
          f"{'uniform':>11} {'scipy_s':>8} {'scipy_obj':>11}")
    for n, s, sp in plan:
        row = bench(n, s, cfg, sp)
        rows.append(row)
        fmt = lambda v, f: "-" if v is None else format(v, f)
        print(f"{n:>9} {s:>5} {row['solve_s']:>9.3f} {row['solve_cpu_s']:>7.2f} {row['per_scenario_s']:>9.4f} {row['compile_s']:>9.2f} {row['peak_mem_mb']:>8.0f} "
              f"{row['objective']:>11.1f} {row['uniform_objective']:>11.1f} {fmt(row['scipy_s'], '8.3f'):>8} {fmt(row['scipy_objective'], '11.1f'):>11}",
              flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
