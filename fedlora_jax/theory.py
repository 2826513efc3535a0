"""Convergence-bound model (paper.md section 3): rounds to accuracy and its online estimators.

Independent sampling ``I_n ~ Bernoulli(q_n)`` and sketching with ratio ``rho_n`` inflate the second
moment of the aggregated update by

    V(q, rho) = sum_n a_n^2 G_n^2 (1 / (q_n rho_n) - 1),

(exact for one SGD step: ``E|sum a (I/q) S g|^2 = |sum a g|^2 + V``, tested by Monte Carlo), and the
rounds to reach accuracy ``eps`` are modelled as ``R = (alpha V + beta) / eps``. ``G_n``, ``alpha``
and ``beta`` are unknown: :class:`GradNormState` estimates ``G_n^2`` from the update norms the
clients return, :func:`fit_alpha_beta` gets ``alpha, beta`` from two pilot runs.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def variance_term(q: jax.Array, rho: jax.Array, g2: jax.Array, a: jax.Array) -> jax.Array:
    """``V(q, rho) = sum_n a_n^2 G_n^2 (1 / (q_n rho_n) - 1)``; 0 at full participation and rank."""
    chex.assert_equal_shape([q, g2, a])
    return jnp.sum(a * a * g2 * (1.0 / (q * rho) - 1.0))


def predicted_rounds(q: jax.Array, rho: jax.Array, g2: jax.Array, a: jax.Array, alpha: float, beta: float,
                     eps: float = 1.0) -> jax.Array:
    """Rounds to accuracy ``eps``: ``(alpha V(q, rho) + beta) / eps``."""
    return (alpha * variance_term(q, rho, g2, a) + beta) / eps


# ----------------------------------------------------------------------------- G_n^2 estimator

@struct.dataclass
class GradNormState:
    """Running estimate of each client's update second moment ``G_n^2``.

    ``total``/``count`` hold the plain mean over a client's first ``pilot`` reports; afterwards
    ``mean`` follows an exponential moving average so the estimate tracks training.
    """

    mean: jax.Array   # (N,) current estimate of G_n^2 (0 where never seen)
    count: jax.Array  # (N,) reports received


def init_grad_norms(num_clients: int) -> GradNormState:
    return GradNormState(mean=jnp.zeros(num_clients), count=jnp.zeros(num_clients, jnp.int32))


def update_grad_norms(state: GradNormState, mask: jax.Array, sq_norms: jax.Array, rho: jax.Array,
                      pilot: int = 5, decay: float = 0.9) -> GradNormState:
    """Fold in the squared update norms ``|D_n|^2`` (N,) of this round's participants ``mask``.

    A sketched update is rescaled by ``r / k``, so ``E|S g|^2 = |g|^2 / rho``: the report is deflated
    by ``rho`` to estimate the unsketched ``G_n^2``. Mean of the first ``pilot`` reports, then EMA.
    """
    chex.assert_equal_shape([state.mean, mask, sq_norms])
    sample = rho * sq_norms
    count = state.count + mask.astype(jnp.int32)
    weight = jnp.where(count <= pilot, 1.0 / jnp.maximum(count, 1), 1.0 - decay)
    mean = jnp.where(mask, state.mean + weight * (sample - state.mean), state.mean)
    return GradNormState(mean=mean, count=count)


def grad_norm_estimate(state: GradNormState) -> jax.Array:
    """``G_n^2`` for every client; clients never seen get the mean over those seen (1 if none)."""
    seen = state.count > 0
    fallback = jnp.where(seen.any(), jnp.sum(jnp.where(seen, state.mean, 0.0)) / jnp.maximum(seen.sum(), 1), 1.0)
    return jnp.where(seen, state.mean, fallback)


# ----------------------------------------------------------------------------- alpha, beta

def rounds_to_target(losses, target: float) -> int:
    """First round (1-based) whose loss is at or below ``target``; ValueError if never reached."""
    losses = np.asarray(losses)
    hit = np.flatnonzero(losses <= target)
    if hit.size == 0:
        raise ValueError(f"target = {target} was never reached (best loss {losses.min():.4g}): "
                         "run the pilot longer or raise the target")
    return int(hit[0]) + 1


def fit_alpha_beta(rounds: tuple[float, float], variances: tuple[float, float],
                   eps: float = 1.0) -> tuple[float, float]:
    """``alpha, beta`` from two pilot runs reaching the same target in ``rounds`` at ``variances``.

    Solves ``R_i eps = alpha V_i + beta`` for the two pilots (``V_i = variance_term`` of each run's
    sampling). The pilots must differ in ``V`` and the slower must be the noisier.
    """
    (r1, r2), (v1, v2) = rounds, variances
    if abs(v1 - v2) <= 1e-12 * max(abs(v1), abs(v2), 1.0):
        raise ValueError(f"variances = {variances} are equal: run the two pilots with different sampling "
                         "(e.g. q = 1 and q = 0.2)")
    alpha = eps * (r1 - r2) / (v1 - v2)
    beta = eps * r1 - alpha * v1
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"rounds = {rounds} give alpha = {alpha:.4g}, beta = {beta:.4g}: the noisier pilot must "
                         "need more rounds; use a stricter target or pilots whose sampling differs more")
    return float(alpha), float(beta)
