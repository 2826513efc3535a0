"""Allocation solver: brute force, scipy multi-start, baselines, feasibility, closed forms, batching."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so

from fedlora_jax import solver as S
from fedlora_jax import wireless as W

SYS = W.SystemConfig()
WORK = W.workload_from_counts(125e6, 0.3e6, 4096, 5)


def _problem(n, seed=0):
    prof = W.generate_profile(jax.random.key(seed), n, SYS)
    g2 = jax.random.uniform(jax.random.key(seed + 1), (n,), minval=0.5, maxval=2.0)
    return prof, g2, jnp.full(n, 1.0 / n), float(n), 100.0


def _feasible(res, cfg):
    q, k = np.asarray(res.q), np.asarray(res.k)
    assert np.all(q >= cfg.q_min * (1 - 1e-6)) and np.all(q <= 1 + 1e-6)
    assert np.all((k >= 1) & (k <= cfg.rank)) and np.allclose(res.rho, k / cfg.rank)
    assert float(res.objective) <= min(float(b["objective"]) for b in res.baselines.values()) * (1 + 1e-6)


def test_matches_brute_force_for_three_clients():
    cfg = S.SolverConfig(rank=2, q_min=0.1, baseline_rho=0.5)
    prof, g2, a, alpha, beta = _problem(3)
    res = S.solve(prof, SYS, WORK, g2, a, alpha, beta, cfg, overhead_s=0.0)
    _feasible(res, cfg)
    problem = S.make_problem(prof, SYS, WORK, g2, a, alpha, beta, overhead_s=0.0)
    qs = np.linspace(0.1, 1.0, 10)
    grid = np.array([(*q, *k) for q in itertools.product(qs, repeat=3) for k in itertools.product((1, 2), repeat=3)])
    obj = jax.jit(jax.vmap(lambda x: S.objective_terms(problem, x[:3], x[3:] / 2, cfg)["objective"]))
    brute = float(jnp.min(obj(jnp.asarray(grid, jnp.float32))))
    assert float(res.objective) <= brute * 1.01


def _scipy_multistart(problem, cfg, n, starts=3):
    f = jax.jit(jax.value_and_grad(lambda x: jnp.log(S.objective_terms(
        problem, jnp.exp(x[:n]), jnp.exp(x[n:]), cfg)["objective"])))
    bounds = [(np.log(cfg.q_min), 0.0)] * n + [(np.log(1 / cfg.rank), 0.0)] * n
    rng = np.random.default_rng(0)
    best = np.inf
    for _ in range(starts):
        x0 = np.array([rng.uniform(lo, hi) for lo, hi in bounds])
        r = so.minimize(lambda x: tuple(np.asarray(v, np.float64) for v in f(jnp.asarray(x, jnp.float32))), x0,
                        jac=True, bounds=bounds, method="L-BFGS-B")
        best = min(best, float(np.exp(r.fun)))
    return best


@pytest.mark.parametrize("n", [8, pytest.param(50, marks=pytest.mark.slow)])
def test_matches_scipy_multistart(n):
    cfg = S.SolverConfig(rank=64, baseline_rho=0.25)  # a fine grid: rounding costs little
    prof, g2, a, alpha, beta = _problem(n, seed=2)
    res = S.solve(prof, SYS, WORK, g2, a, alpha, beta, cfg, overhead_s=0.0)
    _feasible(res, cfg)
    ref = _scipy_multistart(S.make_problem(prof, SYS, WORK, g2, a, alpha, beta, overhead_s=0.0), cfg, n)
    assert float(res.objective) <= ref * 1.01


def test_sampling_only_matches_closed_form():
    cfg = S.SolverConfig(rank=1, baseline_rho=1.0, surrogate="demand")  # rho pinned to 1
    prof, g2, a, alpha, beta = _problem(8, seed=4)
    res = S.solve(prof, SYS, WORK, g2, a, alpha, beta, cfg, overhead_s=0.0)
    _, j_ref = S.sampling_only_demand(S.make_problem(prof, SYS, WORK, g2, a, alpha, beta, overhead_s=0.0),
                                      jnp.ones(8), cfg)
    np.testing.assert_allclose(float(res.objective), float(j_ref), rtol=0.01)


def test_equal_times_matches_closed_form():
    n, rank, alpha, beta, t0, t1 = 20, 64, 200.0, 30.0, 3.0, 5.0
    g2, a = jnp.ones(n), jnp.full(n, 1.0 / n)

    def f(x):  # x = (log q (n), log rho): set-independent equal times, E[T] the exact expected max
        q, rho = jnp.exp(x[:n]), jnp.exp(x[n])
        rounds = alpha * jnp.sum(a * a * g2 * (1 / (q * rho) - 1)) + beta
        return jnp.log(rounds * W.expected_max_exact(jnp.full(n, t0 + t1 * rho), q))

    lo = jnp.log(jnp.append(jnp.full(n, 0.05), 1 / rank))
    x, _ = jax.jit(lambda x0: S.minimize_box(f, x0, lo, jnp.zeros(n + 1), 500, 1e-9))(jnp.full(n + 1, -1.0))
    np.testing.assert_allclose(jnp.exp(x[:n]), 1.0, atol=1e-3)
    rho_star = S.equal_times_rho(alpha, beta, g2, a, t0, t1, rank)
    assert 1 / rank < rho_star < 1
    np.testing.assert_allclose(jnp.exp(x[n]), rho_star, rtol=1e-2)


@pytest.mark.parametrize("multistart_max_clients", [500, 2])  # five starts, and the uniform one alone
def test_batch_equals_single_solves(multistart_max_clients):
    cfg = S.SolverConfig(rank=2, q_min=0.1, baseline_rho=0.5, multistart_max_clients=multistart_max_clients)
    problems = [S.make_problem(*_problem(3, seed=s)[:1], SYS, WORK, *_problem(3, seed=s)[1:], overhead_s=0.1)
                for s in (0, 7)]
    batched = jax.tree.map(lambda *x: jnp.stack(x), *problems)
    keys = jnp.stack([jax.random.key(cfg.seed)] * 2)
    out = S.solve_batch(batched, keys, cfg)
    for i, p in enumerate(problems):
        single = S.solve_problem(p, keys[i], cfg)
        np.testing.assert_allclose(out.objective[i], single.objective, rtol=1e-6)
        np.testing.assert_allclose(out.q[i], single.q, rtol=1e-6)
        np.testing.assert_array_equal(out.k[i], single.k)


def test_bad_solver_inputs():
    with pytest.raises(ValueError, match="q_min"):
        S.SolverConfig(rank=8, q_min=0.0)
    with pytest.raises(ValueError, match="q_min"):
        S.SolverConfig(rank=8, q_min=1.5)
    with pytest.raises(ValueError, match="baseline_rho"):
        S.SolverConfig(rank=8, baseline_rho=0.3)
    with pytest.raises(ValueError, match="rank"):
        S.SolverConfig(rank=0)
    with pytest.raises(TypeError, match="rank"):  # no silent default: the run's rank is required
        S.SolverConfig()
    prof, g2, a, alpha, beta = _problem(4)
    make = lambda *args, **kw: S.make_problem(*args, **{"overhead_s": 0.0, **kw})
    with pytest.raises(ValueError, match="G2.shape"):
        make(prof, SYS, WORK, g2[:3], a, alpha, beta)
    with pytest.raises(ValueError, match="alpha"):
        make(prof, SYS, WORK, g2, a, -1.0, beta)
    with pytest.raises(ValueError, match="power_w"):
        make(prof.replace(power_w=-prof.power_w), SYS, WORK, g2, a, alpha, beta)
    with pytest.raises(ValueError, match="overhead_s"):
        make(prof, SYS, WORK, g2, a, alpha, beta, overhead_s=-1.0)
    with pytest.raises(ValueError, match="x64"):
        make(prof, SYS, WORK, g2, a, alpha, beta, dtype=jnp.float64)


# ----------------------------------------------------------------------------- exact gradients

def _x64_problem(n, seed, overhead_s=0.0, min_round_s=0.0):
    prof, g2, a, alpha, beta = _problem(n, seed)
    return S.make_problem(prof, SYS, WORK, g2, a, alpha, beta, overhead_s=overhead_s, min_round_s=min_round_s,
                          dtype=jnp.float64)


# Points on the box (q in [q_min, 1], rho in [1/r, 1]) of N = 6 clients, rank 8: interior, every
# bound of q and of rho, and mixes.
_POINTS = {"interior": ([0.3, 0.5, 0.7, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7, 0.9, 0.4, 0.6]),
           "q_at_1": ([1.0] * 6, [0.3, 0.5, 0.7, 0.9, 0.4, 0.6]),
           "q_at_q_min": ([0.05] * 6, [0.3, 0.5, 0.7, 0.9, 0.4, 0.6]),
           "rho_at_1/r": ([0.3, 0.5, 0.7, 0.4, 0.6, 0.8], [0.125] * 6),
           "rho_at_1": ([0.3, 0.5, 0.7, 0.4, 0.6, 0.8], [1.0] * 6),
           "corners": ([1.0, 0.05, 1.0, 0.05, 0.5, 1.0], [0.125, 1.0, 1.0, 0.125, 0.5, 0.125])}


@pytest.mark.parametrize("point", sorted(_POINTS))
def test_objective_gradient_matches_finite_differences(point):
    """The gradient of ``log J`` in ``(log q, log rho)`` (what the solver descends) against float64
    finite differences of the same function, central inside the box and one-sided into it at the
    bounds. Finite everywhere, including ``q = 1``. Per coordinate it is exact up to the normal
    surrogate's jumps (docs/method.md, "Gradients"): within 0.5% of the largest component."""
    cfg = S.SolverConfig(rank=8)
    with jax.enable_x64(True):
        problem = _x64_problem(6, seed=3, overhead_s=0.05)
        f = jax.jit(jax.value_and_grad(lambda x: jnp.log(S.objective_terms(
            problem, jnp.exp(x[0]), jnp.exp(x[1]), cfg)["objective"])))
        q, rho = (np.asarray(v, np.float64) for v in _POINTS[point])
        x = np.log(np.stack([q, rho]))
        lo = np.log(np.stack([np.full(6, cfg.q_min), np.full(6, 1 / cfg.rank)]))
        _, g = f(x)
        g = np.asarray(g)
        assert np.all(np.isfinite(g))
        h, scale = 1e-6, np.max(np.abs(g))
        for i, j in itertools.product(range(2), range(6)):
            e = np.zeros_like(x)
            e[i, j] = h
            up, down = int(x[i, j] + h <= 0), int(x[i, j] - h >= lo[i, j])
            fd = (float(f(x + e * up)[0]) - float(f(x - e * down)[0])) / (h * (up + down))
            assert abs(g[i, j] - fd) <= 5e-3 * scale + 1e-3 * abs(fd), (point, i, j, g[i, j], fd)


def test_one_sided_gradient_at_full_participation_is_right():
    """At ``q = 1`` the true ``dE[T]/dq_n = T(all) - T(all but n)`` > 0 for the slowest client and
    ``dE[T]/drho`` is the full round's: the surrogate's gradients against the exact enumeration."""
    with jax.enable_x64(True):
        prof, *_ = _problem(8, seed=6)
        arrays = W.client_arrays(jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), prof), SYS, WORK)
        rho, q = jnp.linspace(0.2, 1.0, 8), jnp.ones(8)
        surrogate = jax.jit(jax.grad(lambda q, rho: W.expected_round_time_normal(
            arrays.times(rho), q, SYS.bandwidth_hz), argnums=(0, 1)))
        exact = jax.jit(jax.grad(lambda q, rho: W.expected_round_time_exact(
            arrays.times(rho), q, SYS.bandwidth_hz), argnums=(0, 1)))
        (gq, grho), (eq, erho) = surrogate(q, rho), exact(q, rho)
        slowest = int(jnp.argmax(eq))
        assert float(eq[slowest]) > 0.05 * float(W.adaptive_round_time(arrays.times(rho), q > 0, SYS.bandwidth_hz))
        np.testing.assert_allclose(gq[slowest], eq[slowest], rtol=0.03)
        np.testing.assert_allclose(grho, erho, rtol=1e-6, atol=1e-9 * float(jnp.max(erho)))
