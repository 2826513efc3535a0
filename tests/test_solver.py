"""Allocation solver: brute force, scipy multi-start, baselines, feasibility, closed forms, batching."""

import functools
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
# Compiles dominate this file's time: every solve and float64 reference in it is padded to one
# client-count bucket, and the box (rank, bounds, baselines) is traced, so one compilation of the
# solver and one of the reference serve them all.
BUCKET = 64
# The expected round cost, jitted once per shape (its static config only selects the numerics).
_expected_cost = jax.jit(lambda problem, q, rho: S.expected_round_time(problem, q, rho, S.SolverConfig(rank=1)))


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
    problem = S.make_problem(prof, SYS, WORK, g2, a, alpha, beta, overhead_s=0.0)
    res = S.solve_problem(problem, jax.random.key(cfg.seed), cfg, min_clients=BUCKET)
    _feasible(res, cfg)
    qs = np.linspace(0.1, 1.0, 10)
    grid = np.array([(*q, *k) for q in itertools.product(qs, repeat=3) for k in itertools.product((1, 2), repeat=3)])
    obj = jax.jit(jax.vmap(lambda x: S.objective_terms(problem, x[:3], x[3:] / 2, cfg)["objective"]))
    brute = float(jnp.min(obj(jnp.asarray(grid, jnp.float32))))
    assert float(res.objective) <= brute * 1.01


def _instance(seed, n, kind):
    """A random instance: ``plain`` (the default cell), ``edge`` (3 clients at the cell edge in deep
    fades: power-limited) or ``hetero`` (compute speeds spread 1.5 in log, log-normal G^2)."""
    sys_ = W.SystemConfig(flops_log_sigma=1.5 if kind == "hetero" else 0.5)
    prof = W.generate_profile(jax.random.key(seed), n, sys_)
    if kind == "edge":
        prof = prof.replace(gain=prof.gain.at[:3].set(W.path_gain(500.0, 1e-3)))
    rng = np.random.default_rng(seed)
    g2 = rng.lognormal(0.0, 1.0, n) if kind == "hetero" else rng.uniform(0.5, 2.0, n)
    a = rng.dirichlet(np.ones(n))
    alpha, beta = n * rng.uniform(0.3, 3.0), 100.0 * rng.uniform(0.3, 3.0)
    return [S.make_problem(prof, sys_, WORK, g2, a, alpha, beta, overhead_s=0.05, dtype=dtype)
            for dtype in (jnp.float32, jnp.float64)]


@functools.cache
def _reference_objective(cfg):
    return jax.jit(jax.value_and_grad(lambda p, x: jnp.log(S.objective_terms(
        p, jnp.exp(x[:x.size // 2]), jnp.exp(x[x.size // 2:]), cfg)["objective"]), argnums=1))


def _padded_size(n):
    return max(BUCKET, S.bucket_size(n))


def _log_objective(problem, q, rho, cfg):
    """``log J`` and its gradient in ``(log q, log rho)``, (2, N), by the reference's jitted function
    (the problem padded to ``BUCKET``, the padding at ``q = rho = 1``: one compilation per dtype)."""
    n, size = problem.num_clients, _padded_size(problem.num_clients)
    pad = lambda v: np.r_[np.log(np.asarray(v, np.float64)), np.zeros(size - n)]
    f = _reference_objective(cfg.numerics())  # the box does not enter the objective
    value, grad = f(S.pad_problem(problem, size), jnp.asarray(np.r_[pad(q), pad(rho)]))
    return float(value), np.asarray(grad).reshape(2, size)[:, :n]


def _scipy_multistart(problem, cfg, random_starts=8, seed=0):
    """Float64 reference: L-BFGS-B on ``log J`` in ``(log q, log rho)`` (continuous rho) from the
    four corners of the box and random points; the best value. Padded to ``BUCKET``, so one
    compile serves every client count up to it (the padding is pinned)."""
    n, size = problem.num_clients, _padded_size(problem.num_clients)
    padded = S.pad_problem(problem, size)
    f = _reference_objective(cfg.numerics())
    lo = np.r_[np.full(n, np.log(cfg.q_min)), np.zeros(size - n), np.full(n, -np.log(cfg.rank)), np.zeros(size - n)]
    bounds = list(zip(lo, np.zeros(2 * size)))
    rng = np.random.default_rng(seed)
    x0s = [np.zeros(2 * size), lo, np.r_[np.zeros(size), lo[size:]], np.r_[lo[:size], np.zeros(size)]]
    x0s += [rng.uniform(lo, 0.0) for _ in range(random_starts)]
    fun = lambda x: tuple(np.asarray(v, np.float64) for v in f(padded, jnp.asarray(x)))
    return min(float(np.exp(so.minimize(fun, x0, jac=True, bounds=bounds, method="L-BFGS-B").fun)) for x0 in x0s)


def _objective64(problem, res, cfg):
    return float(np.exp(_log_objective(problem, res.q, res.rho, cfg)[0]))


CFG64 = S.SolverConfig(rank=64)  # a fine grid: rounding costs little


_KINDS = ("plain", "edge", "hetero")


@pytest.mark.parametrize("kind", _KINDS)
def test_matches_scipy_multistart_on_random_instances(kind):
    """The solver's plan (float32, rho on the grid) within 2% of a float64 scipy multi-start of the
    same objective on random instances of 5 to 50 clients (12 in all, 4 of each kind); one compile
    serves them all (one bucket)."""
    compiles = S.compile_count()
    with jax.enable_x64(True):
        for i, n in enumerate((5, 12, 25, 50)):
            p32, p64 = _instance(200 + 10 * i + len(kind), n, kind)
            res = S.solve_problem(p32, jax.random.key(i), CFG64, min_clients=BUCKET)
            _feasible(res, CFG64)
            ratio = _objective64(p64, res, CFG64) / _scipy_multistart(p64, CFG64)
            assert ratio <= 1.02, (n, kind, ratio)
    assert S.compile_count() - compiles <= 1


@pytest.mark.slow
@pytest.mark.parametrize("n, kind", [(n, kind) for n in (30, 50, 100) for kind in _KINDS])
def test_matches_scipy_multistart_large(n, kind):
    with jax.enable_x64(True):
        p32, p64 = _instance(300 + n + len(kind), n, kind)
        res = S.solve_problem(p32, jax.random.key(n), CFG64)
        ratio = _objective64(p64, res, CFG64) / _scipy_multistart(p64, CFG64)
        assert ratio <= 1.02, (n, kind, ratio)


def test_coordinate_search_on_a_sawtooth():
    """On ``sum_n (log rho_n - b_n)^2`` plus teeth (the surrogate's sawtooth, docs/method.md), each
    rank ends within one tooth's height of the brute-force minimum over the grid ``k / r``, from
    full rank up to 3 away in log; ``q`` at its optimum on the bound stays, and a pinned coordinate
    (``lo = hi``) never moves."""
    rank, n, height = 64, 6, 0.05
    b = jnp.asarray([-3.0, -1.7, -0.9, -0.3, -2.5, -2.0])
    teeth = lambda u: height * (u * 4 - jnp.floor(u * 4))  # rises by `height` as u grows, then drops
    per_client = lambda x: (x[1] - b) ** 2 - teeth(x[1]) + x[0] ** 2
    f = lambda x: jnp.sum(per_client(x))
    lo = jnp.stack([jnp.full(n, jnp.log(0.05)), jnp.full(n, -jnp.log(rank))]).at[:, -1].set(0.0)
    hi, x0 = jnp.zeros((2, n)), jnp.zeros((2, n))
    x, fx = jax.jit(lambda x0: S.coordinate_search(f, x0, lo, hi, rank, 200))(x0)
    grid = jnp.log(jnp.arange(1, rank + 1) / rank)
    brute = jnp.min(jax.vmap(lambda u: per_client(jnp.stack([jnp.zeros(n), jnp.full(n, u)])))(grid), axis=0)
    assert np.all(np.asarray(per_client(x) - brute)[:-1] <= height), (per_client(x), brute)
    np.testing.assert_array_equal(np.asarray(x[:, -1]), 0.0)
    np.testing.assert_array_equal(np.asarray(x[0]), 0.0)
    np.testing.assert_allclose(fx, f(x), rtol=1e-6)


def test_no_recompilation_for_bandwidth_or_client_count_within_a_bucket():
    """A new bandwidth, round cost, client count in the same bucket, rank, bound or baseline reuses
    the compiled solver."""
    compiles = S.compile_count()
    for n, bw, cfg in ((40, 10e6, CFG64), (50, 20e6, S.SolverConfig(rank=8, q_min=0.1, baseline_q=0.5)),
                       (64, 5e6, S.SolverConfig(rank=2, baseline_rho=0.5, seed=3))):
        prof, g2, a, alpha, beta = _problem(n, seed=n)
        problem = S.make_problem(prof, W.SystemConfig(bandwidth_hz=bw), WORK, g2, a, alpha, beta,
                                 overhead_s=0.01 * n, min_round_s=0.1)
        _feasible(S.solve_problem(problem, jax.random.key(0), cfg), cfg)
    assert S.compile_count() - compiles <= 1
    assert [S.bucket_size(n) for n in (1, 16, 17, 100, 100_000)] == [16, 16, 32, 128, 131072]


@pytest.mark.slow
def test_a_sweep_over_client_counts_compiles_once_per_bucket():
    """Ten client counts from 10 to 100 fall in four buckets (16, 32, 64, 128): four compilations."""
    compiles = S.compile_count()
    for n in range(10, 101, 10):
        prof, g2, a, alpha, beta = _problem(n, seed=n)
        S.solve_problem(S.make_problem(prof, SYS, WORK, g2, a, alpha, beta, overhead_s=0.01), jax.random.key(0),
                        S.SolverConfig(rank=8, max_iters=3))
    assert S.compile_count() - compiles == len({S.bucket_size(n) for n in range(10, 101, 10)}) == 4


def test_large_numerics_apply_above_multistart_max_clients():
    cfg = S.SolverConfig(rank=8, multistart_max_clients=32)
    assert cfg.for_clients(32) is cfg
    large = cfg.for_clients(64)
    fields = ("quad_points", "support_iters", "ftol", "patience", "max_backtracks", "descents")
    assert [getattr(large, f) for f in fields] == [getattr(cfg, "large_" + f) for f in fields]
    assert all(getattr(cfg, f) != getattr(large, f) for f in fields)


def test_split_point_by_regula_falsi_matches_bisection():
    """The normal surrogate's split point (regula falsi, 10 steps + one Newton step) against
    60 bisection steps: the same round time and gradient in float64, to round-off."""
    with jax.enable_x64(True):
        prof = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), W.generate_profile(jax.random.key(2), 12, SYS))
        arrays = W.client_arrays(prof, SYS, WORK)
        rho = jnp.linspace(0.1, 1.0, 12)

        @jax.jit
        def both(mask):
            t = lambda root, iters: jax.value_and_grad(lambda r: W.adaptive_round_time(
                arrays.times(r), mask, SYS.bandwidth_hz, iters, root))(rho)
            return t(W.bisect_decreasing, 60), t(W.regula_falsi_decreasing, W._SPLIT_ITERS)

        for seed in range(4):
            mask = (jax.random.uniform(jax.random.key(seed), (12,)) < 0.6).at[seed].set(True)
            (v, g), (v_rf, g_rf) = both(mask)
            np.testing.assert_allclose(v_rf, v, rtol=1e-12)
            np.testing.assert_allclose(g_rf, g, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(g))))


def test_padding_leaves_the_objective_unchanged():
    prof, g2, a, alpha, beta = _problem(5, seed=1)
    problem = S.make_problem(prof, SYS, WORK, g2, a, alpha, beta, overhead_s=0.1)
    q, rho = jnp.linspace(0.1, 1.0, 5), jnp.linspace(0.25, 1.0, 5)
    pad = lambda x: jnp.concatenate([x, jnp.full(11, 0.5)])
    terms = jax.jit(S.objective_terms, static_argnames="cfg")
    cfg = S.SolverConfig(rank=4)
    want = terms(problem, q, rho, cfg)
    got = terms(S.pad_problem(problem, 16), pad(q), pad(rho), cfg)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5)


def test_empty_rounds_are_charged():
    """Every round costs ``overhead_s`` and at least ``min_round_s``, empty ones included: the round
    cost against the exact enumeration of ``o + max(T(P), m)`` over all sets (``T(empty) = 0``)."""
    prof, g2, a, alpha, beta = _problem(6, seed=5)
    q, rho = jnp.full(6, 0.1), jnp.full(6, 0.5)  # 53% of the rounds are empty
    times = W.client_times(prof, SYS, WORK, rho)
    masks = (jnp.arange(64)[:, None] >> jnp.arange(6)) & 1 == 1
    t = jax.vmap(lambda m: W.adaptive_round_time(times, m, SYS.bandwidth_hz))(masks)
    prob = jnp.prod(jnp.where(masks, q, 1 - q), axis=1)
    assert float(prob[0]) > 0.5
    for overhead, floor in ((0.0, 0.0), (0.3, 0.0), (0.3, 2.0 * float(t.max()))):
        problem = S.make_problem(prof, SYS, WORK, g2, a, alpha, beta, overhead_s=overhead, min_round_s=floor)
        cost = float(_expected_cost(problem, q, rho))
        exact = overhead + float(jnp.sum(prob * jnp.maximum(t, floor)))
        np.testing.assert_allclose(cost, exact, rtol=0.05)
    np.testing.assert_allclose(cost, 0.3 + 2.0 * float(t.max()), rtol=1e-6)  # every round lasts the floor


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
    x, *_ = jax.jit(lambda x0: S.minimize_box(f, x0, lo, jnp.zeros(n + 1), 500, 1e-9))(jnp.full(n + 1, -1.0))
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
    out = S.solve_batch(batched, keys, cfg, min_clients=BUCKET)
    for i, p in enumerate(problems):
        single = S.solve_problem(p, keys[i], cfg, min_clients=BUCKET)
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
    bounds. Finite everywhere, including ``q = 1``, where the one-sided difference matches to 1e-4
    of the largest component (the quadrature mirrored about the normal law's step, docs/method.md,
    "Gradients"). Elsewhere it is exact up to the normal surrogate's jumps: within 3% of the largest
    component (measured: up to 1.7%)."""
    cfg = S.SolverConfig(rank=8)
    with jax.enable_x64(True):
        problem = _x64_problem(6, seed=3, overhead_s=0.05)
        f = lambda x: _log_objective(problem, np.exp(x[0]), np.exp(x[1]), cfg)
        q, rho = (np.asarray(v, np.float64) for v in _POINTS[point])
        x = np.log(np.stack([q, rho]))
        lo = np.log(np.stack([np.full(6, cfg.q_min), np.full(6, 1 / cfg.rank)]))
        _, g = f(x)
        assert np.all(np.isfinite(g))
        h, scale = 1e-6, np.max(np.abs(g))
        for i, j in itertools.product(range(2), range(6)):
            e = np.zeros_like(x)
            e[i, j] = h
            up, down = int(x[i, j] + h <= 0), int(x[i, j] - h >= lo[i, j])
            fd = (f(x + e * up)[0] - f(x - e * down)[0]) / (h * (up + down))
            assert abs(g[i, j] - fd) <= 3e-2 * scale + 1e-3 * abs(fd), (point, i, j, g[i, j], fd)


def test_one_sided_gradient_at_full_participation_is_right():
    """At ``q = 1`` the true ``dE[T]/dq_n = T(all) - T(all but n)`` > 0 and ``dE[T]/drho`` is the
    full round's: the surrogate's gradients against the exact enumeration, for the slowest client
    (summed exactly) and for every client of the normal law (the split point's mean shift)."""
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
        np.testing.assert_allclose(gq[slowest], eq[slowest], rtol=0.05)  # measured 4.3%
        normal_law = np.argsort(np.asarray(arrays.times(rho).floor))[:-W.EXACT_DEMANDS]
        assert np.all(eq[normal_law] > 0)
        np.testing.assert_allclose(gq[normal_law], eq[normal_law], rtol=0.02)  # measured 0.7%
        np.testing.assert_allclose(grho, erho, rtol=1e-6, atol=1e-9 * float(jnp.max(erho)))


def test_clock_and_solver_charge_a_round_alike():
    """One round-cost rule (``wireless.round_cost``): the run's clock (``build.make_clock``) and the
    solver's expected round cost at ``q`` in {0, 1} (a sure participant set) agree, for an empty
    round (the broadcast and server step alone) and a non-empty one."""
    from fedlora_jax import aggregation, build
    from fedlora_jax.config import load_config

    cfg, n = load_config(preset="tiny"), 6
    prof, g2, a, alpha, beta = _problem(n, seed=8)
    sizes = aggregation.AdapterSizes(lora_a=600, lora_b=400, head=10, layers=((30, 20),) * 2)
    costs, k = aggregation.adapter_costs(sizes, cfg.lora.rank), jnp.full(n, cfg.lora.rank)
    clock = build.make_clock(cfg, prof, WORK, costs)
    server = W.server_phases(cfg.system, build.PARAM_BITS * costs.download(k > 0, k),
                             costs.server_flops)
    overhead = float(server["download"] + server["server"])
    problem = S.make_problem(prof, cfg.system, WORK, g2, a, alpha, beta, overhead_s=overhead)
    assert overhead > 0
    for mask in (np.zeros(n, bool), np.array([1, 0, 1, 1, 0, 0], bool)):
        charged = float(clock(jnp.asarray(mask), k)["total"])
        planned = float(_expected_cost(problem, jnp.asarray(mask, jnp.float32), jnp.ones(n)))
        clients = float(W.adaptive_round_time(W.client_times(prof, cfg.system, WORK, jnp.ones(n)),
                                              jnp.asarray(mask), cfg.system.bandwidth_hz))
        np.testing.assert_allclose([charged, planned], overhead + clients, rtol=1e-5)


def test_sketch_only_ranks_compile_once_for_every_rank():
    """``adaptive_sketch_only``'s ranks: the rank is traced, so three ranks share one program; the
    kept ranks lie on each grid and are never worse than full rank."""
    from fedlora_jax.strategies import adaptive

    prof, g2, a, alpha, beta = _problem(5, seed=9)
    problem = S.make_problem(prof, SYS, WORK, g2, a, alpha, beta, overhead_s=0.05)
    objective = jax.jit(lambda rho: S.objective_terms(problem, jnp.full(5, 0.5), rho,
                                                      S.SolverConfig(rank=1))["objective"])
    compiles = adaptive._sketch_only_ranks._cache_size()
    for rank in (2, 4, 8):
        k = np.asarray(adaptive.sketch_only_ranks(problem, 0.5, S.SolverConfig(rank=rank, max_iters=5)))
        assert np.all((k >= 1) & (k <= rank)), (rank, k)
        assert float(objective(jnp.asarray(k / rank, jnp.float32))) <= float(objective(jnp.ones(5))) * (1 + 1e-6)
    assert adaptive._sketch_only_ranks._cache_size() - compiles == 1
