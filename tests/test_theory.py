"""Bound terms and estimators: variance formula by Monte Carlo, G_n^2 and alpha/beta recovery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import theory


def test_variance_formula_by_monte_carlo():
    n, r, m = 6, 8, 100_000
    key = jax.random.key(0)
    g = jax.random.normal(key, (n, r))
    a = jnp.linspace(1.0, 2.0, n)
    a = a / a.sum()
    q = jnp.linspace(0.2, 1.0, n)
    k = jnp.array([1, 2, 4, 8, 3, 6])
    rho = k / r

    def draw(key):
        k1, k2 = jax.random.split(key)
        part = jax.random.uniform(k1, (n,)) < q
        ranks = jnp.argsort(jnp.argsort(jax.random.uniform(k2, (n, r)), axis=1), axis=1)  # uniform permutations
        s = jnp.where(ranks < k[:, None], r / k[:, None], 0.0)  # S = (r/k) diag(1_I), |I| = k
        return jnp.sum(jnp.sum((a * part / q)[:, None] * s * g, 0) ** 2)

    mc = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(1), m)).mean()
    exact = jnp.sum(jnp.sum(a[:, None] * g, 0) ** 2) + theory.variance_term(q, rho, jnp.sum(g * g, 1), a)
    np.testing.assert_allclose(mc, exact, rtol=0.02)
    assert float(theory.variance_term(jnp.ones(n), jnp.ones(n), jnp.ones(n), a)) == 0.0


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
