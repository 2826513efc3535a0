"""Wall-clock model: inverse rate law, bandwidth allocation, round time, expected round time."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so

from fedlora_jax import wireless as W

SYS = W.SystemConfig()
WORK = W.workload_from_counts(125e6, 0.3e6, 4096, 5)


def _times(seed, n, rho=None):
    prof = W.generate_profile(jax.random.key(seed), n, SYS)
    rho = jax.random.choice(jax.random.key(seed + 1), jnp.array([0.125, 0.25, 0.5, 1.0]), (n,)) if rho is None else rho
    return prof, W.client_times(prof, SYS, WORK, rho)


def _np_finish(t, b):
    c, s, tc = (np.asarray(x, np.float64) for x in (t.snr_bw, t.bits, t.compute))
    return tc + s * np.log(2.0) / (b * np.log1p(c / b))


def _scipy_round_time(t, bw):
    """Independent reference: textbook formula, nested brentq in log-bandwidth, float64."""
    c, s, tc = (np.asarray(x, np.float64) for x in (t.snr_bw, t.bits, t.compute))
    floor = tc + s * np.log(2) / c

    def finish(i, b):
        return tc[i] + s[i] * np.log(2.0) / (b * np.log1p(c[i] / b))

    def b_of(T, i):
        return np.exp(so.brentq(lambda lb: finish(i, np.exp(lb)) - T, -30, 70, xtol=1e-15, rtol=1e-15))

    lo = finish(int(np.argmax(floor)), bw)  # the slowest client alone takes the whole band
    hi = max(_np_finish(t, bw / len(c)))
    return so.brentq(lambda T: sum(b_of(T, i) for i in range(len(c))) - bw, lo, hi, xtol=1e-14, rtol=1e-15)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_inverse_rate_law_near_and_far_from_floor(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        _, t = _times(0, 5)
        t = jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
        round_trip = jax.jit(lambda t, slack: W.upload_excess(t, W.bandwidth_for_slack(t, slack)))
        for rel in (1e-9, 1e-4, 1.0, 1e3, 1e7):
            slack = rel * t.upload_floor
            back = round_trip(t, slack)
            tol = 1e-5 if dtype == jnp.float32 else 1e-12
            np.testing.assert_allclose(back, slack, rtol=tol)


def test_adaptive_allocation_matches_scipy_and_equalizes():
    allocate = jax.jit(W.allocate_bandwidth)  # one compile for the three instances
    with jax.enable_x64(True):
        for seed in range(3):
            _, t = _times(seed, 6)
            t = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
            mask = jnp.ones(6, bool)
            T, b = allocate(t, mask, SYS.bandwidth_hz)
            ref = _scipy_round_time(t, SYS.bandwidth_hz)
            assert abs(float(T) / ref - 1) < 1e-6
            np.testing.assert_allclose(_np_finish(t, np.asarray(b)), float(T), rtol=1e-9)  # all finish together
            assert abs(float(b.sum()) / SYS.bandwidth_hz - 1) < 1e-9  # budget met
            # No feasible allocation does better (scipy SLSQP on the epigraph form).
            x0 = np.append(np.full(6, SYS.bandwidth_hz / 6), 2 * float(T)) / 1e6
            cons = [{"type": "eq", "fun": lambda x: x[:6].sum() - SYS.bandwidth_hz / 1e6},
                    {"type": "ineq", "fun": lambda x: x[6] - _np_finish(t, np.maximum(x[:6], 1e-9) * 1e6)}]
            res = so.minimize(lambda x: x[6], x0, constraints=cons, bounds=[(1e-9, None)] * 6 + [(0, None)],
                              method="SLSQP", options={"maxiter": 500, "ftol": 1e-12})
            assert res.fun >= float(T) * (1 - 1e-6)


def test_round_time_masks_equal_split_and_jit():
    prof, _ = _times(3, 12)
    rho = jnp.full(12, 0.5)
    mask = jnp.arange(12) % 3 == 0
    fn = jax.jit(W.round_time, static_argnames=("sys", "workload", "adaptive"))
    ada = fn(prof, SYS, WORK, mask, rho, adaptive=True)
    eq = fn(prof, SYS, WORK, mask, rho, adaptive=False)
    assert float(ada["total"]) <= float(eq["total"]) + 1e-6
    np.testing.assert_allclose(ada["compute"] + ada["upload"], ada["total"], rtol=1e-6)
    empty = fn(prof, SYS, WORK, jnp.zeros(12, bool), rho, adaptive=True)
    assert float(empty["total"]) == 0.0 and float(empty["compute"]) == 0.0
    # One participant alone gets the whole band.
    one = fn(prof, SYS, WORK, jnp.arange(12) == 4, rho, adaptive=True)
    t = W.client_times(prof, SYS, WORK, rho)
    np.testing.assert_allclose(one["total"], t.compute[4] + W.upload_time(t, SYS.bandwidth_hz)[4], rtol=1e-5)


def test_exact_expected_max_matches_monte_carlo():
    key = jax.random.key(0)
    t = jax.random.uniform(key, (15,), minval=1.0, maxval=5.0)
    q = jax.random.uniform(jax.random.key(1), (15,), minval=0.02, maxval=0.5)
    masks = W.sample_masks(jax.random.key(2), q, 200_000)
    draws = jnp.max(jnp.where(masks, t, 0.0), axis=1)
    mc, se = draws.mean(), draws.std() / np.sqrt(draws.size)
    assert abs(float(W.expected_max_exact(t, q) - mc)) < 4 * float(se)


SURROGATE_TOL = 0.05  # the normal surrogate's relative error bound vs Monte Carlo (docs/method.md)
# Jitted once per shape and shared by the tests (compiles dominate this file's time).
_normal = jax.jit(W.expected_round_time_normal, static_argnums=(3,))
_demand = jax.jit(W.expected_round_time_demand)


def test_surrogates_against_monte_carlo_over_random_q():
    errors = {"normal": [], "demand": []}
    mc_fn = jax.jit(W.expected_round_time_mc, static_argnums=(4,))
    for seed in range(4):
        _, t = _times(10 + seed, 20)
        q = jax.random.uniform(jax.random.key(100 + seed), (20,), minval=0.05, maxval=1.0)
        mc, se = mc_fn(jax.random.key(seed), t, q, SYS.bandwidth_hz, 2000)
        errors["normal"].append(float(_normal(t, q, SYS.bandwidth_hz)) / float(mc) - 1)
        errors["demand"].append(float(_demand(t, q, SYS.bandwidth_hz)) / float(mc) - 1)
        assert float(se) < 0.01 * float(mc)
    assert max(map(abs, errors["normal"])) < SURROGATE_TOL, errors
    # The naive surrogate is the flawed one: it overestimates, and by far more.
    assert min(errors["demand"]) > 0 and np.mean(np.abs(errors["demand"])) > 3 * np.mean(np.abs(errors["normal"]))


def test_normal_surrogate_exact_at_full_participation():
    _, t = _times(5, 20)
    full = jax.jit(W.adaptive_round_time)(t, jnp.ones(20, bool), SYS.bandwidth_hz)
    np.testing.assert_allclose(_normal(t, jnp.ones(20), SYS.bandwidth_hz), full, rtol=1e-3)


def test_surrogate_gradients_match_finite_differences():
    """The demand surrogate's IFT gradient is exact; the normal one's ignores its quadrature nodes
    moving across the jumps of the normal law (docs/method.md), so it is checked more loosely. Its
    integration range is converged here (60 steps): the default 12 leave it exact only to ~1e-7,
    which is float32 round-off for the solver but swamps a 1e-5 finite difference in float64."""
    with jax.enable_x64(True):
        _, t = _times(6, 8)
        t = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
        q = jnp.linspace(0.2, 0.9, 8)
        e = jnp.zeros(8).at[3].set(1e-5)
        for fn, rtol in ((lambda q: W.expected_round_time_demand(t, q, SYS.bandwidth_hz), 1e-4),
                         (lambda q: W.expected_round_time_normal(t, q, SYS.bandwidth_hz, 256, iters=60), 0.1)):
            value_and_grad = jax.jit(jax.value_and_grad(fn))  # one compile serves both
            g = value_and_grad(q)[1]
            fd = (value_and_grad(q + e)[0] - value_and_grad(q - e)[0]) / 2e-5
            np.testing.assert_allclose(g[3], fd, rtol=rtol)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="bandwidth_hz"):
        W.SystemConfig(bandwidth_hz=0.0)
    with pytest.raises(ValueError, match="power_w"):
        W.SystemConfig(power_w=(-0.1, 0.2))
    with pytest.raises(ValueError, match="flops_median"):
        W.SystemConfig(flops_median=0.0)
    prof, _ = _times(0, 4)
    with pytest.raises(ValueError, match="flops_per_s"):
        W.validate_profile(prof.replace(flops_per_s=prof.flops_per_s.at[1].set(0.0)))
    with pytest.raises(ValueError, match="rho"):
        W.round_time(prof, SYS, WORK, jnp.ones(4, bool), jnp.full(4, 1.5))
    nan_csv = tmp_path / "t.csv"
    nan_csv.write_text("flops_per_s,rate_kbps\n1e12,1000\n,2000\n")
    with pytest.raises(ValueError, match="flops_per_s.*NaN"):
        W.load_trace(nan_csv)
    ok_csv = tmp_path / "ok.csv"
    ok_csv.write_text("flops_per_s,rate_kbps\n1e12,1000\n2e12,2000\n")
    with pytest.raises(ValueError, match="num_clients=2"):
        W.load_trace(ok_csv, num_clients=3)
    with pytest.raises(FileNotFoundError):
        W.load_trace(tmp_path / "missing.csv")


def test_load_trace_csv_json_round_trip(tmp_path):
    rates = np.array([5e5, 2e6, 8e6])
    (tmp_path / "t.csv").write_text("flops_per_s,rate_bps\n" + "".join(f"1e12,{r}\n" for r in rates))
    (tmp_path / "t.json").write_text(json.dumps({str(i): {"compute_speed": 1e12, "rate_kbps": r / 1e3}
                                                 for i, r in enumerate(rates)}))
    for name in ("t.csv", "t.json"):
        prof = W.load_trace(tmp_path / name, num_clients=3, reference_bandwidth_hz=1e6)
        t = W.client_times(prof, SYS, WORK, jnp.ones(3))
        rate = 1e6 * np.log2(1 + np.asarray(t.snr_bw) / 1e6)  # the link rate at the reference band
        np.testing.assert_allclose(rate, rates, rtol=1e-4)


def test_exact_enumeration_matches_monte_carlo():
    """``expected_round_time_exact`` (all 2^N sets, set-dependent adaptive round times) against
    Monte Carlo of the same round times, and the normal surrogate within its tolerance of it."""
    _, t = _times(21, 10)
    q = jax.random.uniform(jax.random.key(3), (10,), minval=0.05, maxval=1.0)
    exact = float(jax.jit(W.expected_round_time_exact)(t, q, SYS.bandwidth_hz))
    mc, se = jax.jit(W.expected_round_time_mc, static_argnums=(4,))(jax.random.key(4), t, q, SYS.bandwidth_hz, 20_000)
    assert abs(exact - float(mc)) < 4 * float(se)
    assert abs(float(_normal(t, q, SYS.bandwidth_hz)) / exact - 1) < SURROGATE_TOL


def test_array_api_matches_profile_api():
    """``ClientArrays`` built by hand (seconds and bits affine in rho, SNR per Hz) give the
    profile API's times, in float32 and float64."""
    prof, _ = _times(8, 6)
    rho = jnp.linspace(0.125, 1.0, 6)
    f = np.asarray(prof.flops_per_s, np.float64)
    steps = WORK.local_steps
    for dtype in (jnp.float32, jnp.float64):
        with jax.enable_x64(dtype == jnp.float64):
            by_hand = W.ClientArrays(
                compute_s=jnp.asarray(steps * WORK.base_flops_per_step / f, dtype),
                compute_per_rho_s=jnp.asarray(steps * WORK.lora_flops_per_step_full_rank / f, dtype),
                bits=jnp.zeros(6, dtype), bits_per_rho=jnp.full(6, WORK.payload_bits_full_rank, dtype),
                snr_bw=jnp.asarray(np.asarray(prof.power_w, np.float64) * np.asarray(prof.gain, np.float64)
                                   / SYS.noise_w_per_hz, dtype))
            profile = jax.tree.map(lambda x: jnp.asarray(x, dtype), prof)
            want = W.client_times(profile, SYS, WORK, jnp.asarray(rho, dtype))
            got = by_hand.times(jnp.asarray(rho, dtype))
            assert got.compute.dtype == dtype
            tol = 1e-5 if dtype == jnp.float32 else 1e-12
            for name in ("compute", "bits", "snr_bw"):
                np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=tol)
            mask = jnp.arange(6) % 2 == 0
            np.testing.assert_allclose(W.adaptive_round_time(got, mask, SYS.bandwidth_hz),
                                       W.round_time(profile, SYS, WORK, mask, jnp.asarray(rho, dtype))["total"],
                                       rtol=10 * tol)


def test_minimum_round_time_charges_every_round():
    """``E[max(T, m)]``: the normal surrogate against the exact enumeration of ``max(T(P), m)``
    (empty rounds cost ``m``), with ``m`` below, inside and above the range of ``T``."""
    _, t = _times(22, 6)
    q = jnp.full(6, 0.2)  # P(empty round) = 0.26
    full = float(W.adaptive_round_time(t, jnp.ones(6, bool), SYS.bandwidth_hz))
    masks = (jnp.arange(64)[:, None] >> jnp.arange(6)) & 1 == 1
    times = jax.vmap(lambda m: W.adaptive_round_time(t, m, SYS.bandwidth_hz))(masks)
    prob = jnp.prod(jnp.where(masks, q, 1 - q), axis=1)
    for m in (0.0, 0.5 * full, 2 * full):
        exact = float(jnp.sum(prob * jnp.maximum(times, m)))
        normal = float(jax.jit(W.expected_round_time_normal)(t, q, SYS.bandwidth_hz, min_round_s=m))
        assert abs(normal / exact - 1) < SURROGATE_TOL, (m, normal, exact)
    assert normal == pytest.approx(2 * full, rel=1e-6)  # every round, empty or not, lasts m
