"""Client sampling schemes and their unbiased aggregation weights (docs/method.md, 'Aggregation
rules').

Every scheme returns a participation mask ``I`` (N,) and is described by each client's inclusion
probability ``q_n = P(I_n = 1)``; weighting a participant's update by ``a_n / q_n`` makes the
aggregate ``sum_n a_n (I_n / q_n) delta_n`` unbiased for the full-participation average.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np


def independent_mask(key: jax.Array, q: jax.Array) -> jax.Array:
    """``I_n ~ Bernoulli(q_n)`` independently: the paper's sampling."""
    chex.assert_rank(q, 1)
    return jax.random.uniform(key, q.shape) < q


def uniform_mask(key: jax.Array, q: jax.Array) -> jax.Array:
    """Exactly ``K = round(sum q)`` clients uniformly without replacement (inclusion ``K/N``)."""
    chex.assert_rank(q, 1)
    n = q.shape[0]
    k = jnp.round(q.sum()).astype(jnp.int32)
    return jax.random.permutation(key, n) < k


def full_mask(key: jax.Array, q: jax.Array) -> jax.Array:
    """Every client, every round."""
    del key
    return jnp.ones(q.shape, bool)


SCHEMES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "independent": independent_mask, "uniform": uniform_mask, "full": full_mask}


def inclusion_probabilities(scheme: str, q: np.ndarray) -> np.ndarray:
    """``P(I_n = 1)`` under ``scheme`` for the requested ``q``: what the ``1/q`` weights must use."""
    q = np.asarray(q, np.float64)
    if scheme == "independent":
        return q
    if scheme == "uniform":
        return np.full_like(q, round(q.sum()) / q.size)
    if scheme == "full":
        return np.ones_like(q)
    raise ValueError(f"Unknown sampling scheme {scheme!r}; valid: {sorted(SCHEMES)}.")


def validate_probabilities(q, num_clients: int) -> np.ndarray:
    """Checks ``q`` on the host before any compilation; returns it as float32."""
    q = np.asarray(q, np.float64)
    if q.shape != (num_clients,):
        raise ValueError(f"Sampling probabilities have shape {q.shape}; expected ({num_clients},), "
                         "one per client.")
    if not np.isfinite(q).all():
        raise ValueError("Sampling probabilities contain NaN or inf.")
    bad = np.flatnonzero((q <= 0) | (q > 1))
    if bad.size:
        raise ValueError(f"Sampling probabilities must lie in (0, 1]; client {bad[0]} has "
                         f"q={q[bad[0]]:g} ({bad.size} clients out of range). A client that never "
                         "takes part cannot be reweighted: give it a small positive q instead.")
    return q.astype(np.float32)


def aggregation_weights(mask: jax.Array, a: jax.Array, q: jax.Array) -> jax.Array:
    """``a_n I_n / q_n``: the unbiased weight of each client's update."""
    return jnp.where(mask, a / q, 0.0)
