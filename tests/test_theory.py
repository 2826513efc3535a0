"""Bound terms and estimators: variance formula by Monte Carlo, G_n^2 and alpha/beta recovery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import theory


N_MC, R_MC, DRAWS = 6, 8, 100_000  # clients, rank, Monte Carlo draws


def _mc_setting():
    """Data weights ``a``, sampling probabilities ``q``, kept ranks ``k`` and ``rho = k / r``."""
    a = jnp.linspace(1.0, 2.0, N_MC)
    q = jnp.linspace(0.2, 1.0, N_MC)
    k = jnp.array([1, 2, 4, 8, 3, 6])
    return a / a.sum(), q, k, k / R_MC


def _mc_draw(key, a, q, k):
    """One round's ``a_n I_n / q_n`` (independent sampling) and keep masks (N, r): ``k_n`` of ``r``
    coordinates uniformly without replacement."""
    k1, k2 = jax.random.split(key)
    part = jax.random.uniform(k1, (N_MC,)) < q
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(k2, (N_MC, R_MC)), axis=1), axis=1)
    return a * part / q, ranks < k[:, None]


def test_variance_formula_by_monte_carlo():
    g = jax.random.normal(jax.random.key(0), (N_MC, R_MC))
    a, q, k, rho = _mc_setting()

    def draw(key):
        weights, keep = _mc_draw(key, a, q, k)
        s = jnp.where(keep, R_MC / k[:, None], 0.0)  # S = (r/k) diag(1_I), |I| = k
        return jnp.sum(jnp.sum(weights[:, None] * s * g, 0) ** 2)

    mc = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(1), DRAWS)).mean()
    exact = jnp.sum(jnp.sum(a[:, None] * g, 0) ** 2) + theory.variance_term(q, rho, jnp.sum(g * g, 1), a)
    np.testing.assert_allclose(mc, exact, rtol=0.02)
    ones = jnp.ones(N_MC)
    assert float(theory.variance_term(ones, ones, ones, a)) == 0.0


def test_grad_norm_estimator_recovers_known_g2():
    n, rounds = 50, 300
    g2 = jnp.linspace(0.5, 5.0, n)

    def one_round(state, key):  # the whole run is one compiled scan
        k1, k2, k3 = jax.random.split(key, 3)
        mask = jax.random.uniform(k1, (n,)) < 0.3
        rho = jax.random.choice(k2, jnp.array([0.25, 0.5, 1.0]), (n,))
        noise = jax.random.gamma(k3, 50.0, (n,)) / 50.0  # mean 1
        return theory.update_grad_norms(state, mask, g2 / rho * noise, rho, pilot=5, decay=0.98), None

    state, _ = jax.jit(lambda keys: jax.lax.scan(one_round, theory.init_grad_norms(n), keys))(
        jax.random.split(jax.random.key(0), rounds))
    np.testing.assert_allclose(theory.grad_norm_estimate(state), g2, rtol=0.15)
    fresh = theory.update_grad_norms(theory.init_grad_norms(3), jnp.array([True, False, True]),
                                     jnp.array([2.0, 9.0, 4.0]), jnp.ones(3))
    np.testing.assert_allclose(theory.grad_norm_estimate(fresh), [2.0, 3.0, 4.0])  # unseen: mean of seen


def test_alpha_beta_from_two_pilots():
    alpha, beta, eps = 3.0, 40.0, 0.5
    g2, a = jnp.ones(10), jnp.full(10, 0.1)
    vs = [float(theory.variance_term(jnp.full(10, q), jnp.full(10, rho), g2, a)) for q, rho in ((1.0, 0.5), (0.2, 0.25))]
    rs = [(alpha * v + beta) / eps for v in vs]
    np.testing.assert_allclose(theory.fit_alpha_beta(tuple(rs), tuple(vs), eps), (alpha, beta), rtol=1e-9)
    losses = [beta / (t + 1) for t in range(200)]
    assert theory.rounds_to_target(losses, 1.0) == 40
    with pytest.raises(ValueError, match="different sampling"):
        theory.fit_alpha_beta((10.0, 12.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="never reached"):
        theory.rounds_to_target([3.0, 2.0], 1.0)


@pytest.mark.parametrize("law", [theory.SGD_LAW, theory.ADAM_LAW])
def test_update_law_recovers_unsketched_g2_from_synthetic_reports(law):
    """Reports that scale as the law says (``|delta_S|^2 = rho^norm_power G^2``, noisy) give back
    ``G^2`` whatever the mix of sketch ratios; the other law's deflation is off by ``rho^2``."""
    n, rounds = 40, 300
    g2 = jnp.linspace(0.5, 5.0, n)
    other = theory.ADAM_LAW if law == theory.SGD_LAW else theory.SGD_LAW

    def one_round(states, key):
        k1, k2, k3 = jax.random.split(key, 3)
        mask = jax.random.uniform(k1, (n,)) < 0.3
        rho = jax.random.choice(k2, jnp.array([0.125, 0.25, 0.5, 1.0]), (n,))
        report = g2 * rho ** law.norm_power * jax.random.gamma(k3, 50.0, (n,)) / 50.0
        return tuple(theory.update_grad_norms(s, mask, report, rho, pilot=5, decay=0.98, law=l)
                     for s, l in zip(states, (law, other))), None

    init = (theory.init_grad_norms(n),) * 2
    (right, wrong), _ = jax.jit(lambda keys: jax.lax.scan(one_round, init, keys))(
        jax.random.split(jax.random.key(0), rounds))
    np.testing.assert_allclose(theory.grad_norm_estimate(right), g2, rtol=0.15)
    ratio = float(jnp.mean(theory.grad_norm_estimate(wrong) / g2))
    assert ratio > 2.0 if law == theory.SGD_LAW else ratio < 0.5


def test_update_law_by_optimizer_name():
    assert theory.update_law("sgd") is theory.update_law("momentum") is theory.SGD_LAW
    assert theory.update_law("adamw") is theory.update_law("adam") is theory.ADAM_LAW
    with pytest.raises(ValueError, match="No update law for client optimizer 'lion'"):
        theory.update_law("lion")
    rho = jnp.array([0.25, 1.0])
    np.testing.assert_allclose(theory.unsketched_sq_norm(jnp.array([8.0, 2.0]), rho, theory.SGD_LAW), [2.0, 2.0])
    np.testing.assert_allclose(theory.unsketched_sq_norm(jnp.array([0.5, 2.0]), rho, theory.ADAM_LAW), [2.0, 2.0])


def test_adam_law_variance_and_shrink_by_monte_carlo():
    """Adam-type sketch = keep ``k`` of ``r`` coordinates at full size (no ``r/k`` rescale): the
    applied update's mean is ``sum a rho u`` (``s |g|`` for a common direction) and its variance is
    :func:`theory.aggregate_variance` with the Adam law."""
    u = jax.random.normal(jax.random.key(2), (N_MC, R_MC))
    a, q, k, rho = _mc_setting()

    def draw(key):
        weights, keep = _mc_draw(key, a, q, k)
        return jnp.sum(weights[:, None] * jnp.where(keep, u, 0.0), 0)

    d = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(3), DRAWS))
    mean = jnp.sum((a * rho)[:, None] * u, 0)
    np.testing.assert_allclose(d.mean(0), mean, atol=0.02)
    law = theory.ADAM_LAW
    np.testing.assert_allclose(jnp.mean(jnp.sum((d - mean) ** 2, 1)),
                               theory.aggregate_variance(q, rho, jnp.sum(u * u, 1), a, law), rtol=0.02)
    np.testing.assert_allclose(theory.step_shrink(rho, a, law), jnp.sum(a * rho), rtol=1e-6)


def test_predicted_rounds_by_law():
    """SGD: the noise-scale law ``alpha V + beta``; Adam at a common ``rho``: the same noise-to-signal
    ratio, divided by ``rho^progress_power`` for the smaller mean step."""
    n = 10
    g2, a, q = jnp.linspace(1.0, 2.0, n), jnp.full(n, 0.1), jnp.full(n, 0.3)
    alpha, beta = 2.0, 5.0
    for rho in (1.0, 0.5, 0.125):
        r = jnp.full(n, rho)
        sgd = (alpha * theory.variance_term(q, r, g2, a) + beta) / 0.5
        np.testing.assert_allclose(theory.predicted_rounds(q, r, g2, a, alpha, beta, 0.5), sgd, rtol=1e-6)
        np.testing.assert_allclose(theory.predicted_rounds(q, r, g2, a, alpha, beta, 0.5, law=theory.ADAM_LAW),
                                   sgd / rho ** theory.ADAM_LAW.progress_power, rtol=1e-5)


def test_heads_are_not_deflated_by_the_update_law():
    """Only the sketched LoRA part of a report is mapped to its unsketched size; the heads' part
    (never sketched) is kept as reported."""
    from fedlora_jax import theory

    rho = jnp.array([0.25, 0.5, 1.0])
    lora, head = jnp.array([0.5, 1.0, 2.0]), jnp.array([0.3, 0.0, 0.1])
    mask = jnp.ones(3, bool)
    for law in (theory.SGD_LAW, theory.update_law("adamw")):
        state = theory.update_grad_norms(theory.init_grad_norms(3), mask, lora + head, rho, law=law,
                                         head_sq_norms=head)
        np.testing.assert_allclose(state.mean, theory.unsketched_sq_norm(lora, rho, law) + head,
                                   rtol=1e-6)


def test_rounds_calibration_recovers_known_constants():
    """``benchmarks/calibrate_rounds.py``'s fit, on rounds generated by :func:`theory.predicted_rounds`
    at known ``R_0, c, p`` over its grid of uniform ``(q, rho)``, returns those constants, also
    with the slowest runs censored; with ``c`` and ``p`` pinned it fits ``R_0`` alone."""
    import dataclasses
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import calibrate_rounds

    n, r0, c, p = 16, 8.0, 0.1, 0.4
    law = dataclasses.replace(theory.ADAM_LAW, progress_power=p)
    full = lambda x: jnp.full(n, x)
    grid = [(k / n, rho, ratio) for k in (0.8, 1, 2, 4, 16) for rho in (0.25, 0.5, 1.0) for ratio in (3.0, 9.0)]
    rounds = [r0 * float(theory.predicted_rounds(full(q), full(rho), full(ratio), full(1 / n), c, 1.0, law=law))
              for q, rho, ratio in grid]
    terms = np.array([calibrate_rounds.noise_and_shrink(q, rho, ratio, n, theory.ADAM_LAW) for q, rho, ratio in grid])
    fitted = calibrate_rounds.fit(np.log(rounds), terms[:, 0], terms[:, 1])
    assert fitted["r0"] == pytest.approx(r0, rel=1e-3) and fitted["c"] == pytest.approx(c, rel=1e-3)
    assert fitted["p"] == pytest.approx(p, abs=1e-3) and fitted["rms_log_residual"] < 1e-4
    # runs censored below the true rounds (misses) leave the fit where it was; a censored
    # bound above the model's prediction pulls it up
    cap = np.log(np.minimum(rounds, 30.0))
    missed = np.asarray(rounds) > 30.0
    assert missed.any() and not missed.all()
    censored = calibrate_rounds.fit(cap, terms[:, 0], terms[:, 1], censored=missed)
    assert censored["c"] == pytest.approx(c, rel=1e-3) and censored["p"] == pytest.approx(p, abs=1e-3)
    assert calibrate_rounds.fit(cap, terms[:, 0], terms[:, 1])["c"] < 0.9 * c  # misses as hits: too low
    pinned = calibrate_rounds.fit(np.log(rounds), terms[:, 0], terms[:, 1], {"c": 1.0, "p": 0.5})
    unit = np.log(1.0 * terms[:, 0] + 1.0) - 0.5 * np.log(terms[:, 1])
    assert (pinned["c"], pinned["p"]) == (1.0, 0.5) and pinned["fitted"] == ["log_r0"]
    assert np.log(pinned["r0"]) == pytest.approx(np.mean(np.log(rounds) - unit), abs=1e-4)
