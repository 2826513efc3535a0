"""Convergence-bound model (docs/method.md, 'Bound'): rounds to accuracy and its online estimators.

Independent sampling ``I_n ~ Bernoulli(q_n)`` and sketching with ratio ``rho_n`` inflate the second
moment of the aggregated update by

    V(q, rho) = sum_n a_n^2 G_n^2 (1 / (q_n rho_n) - 1),

(exact for one SGD step: ``E|sum a (I/q) S g|^2 = |sum a g|^2 + V``, tested by Monte Carlo), and the
rounds to reach accuracy ``eps`` are modelled as ``R = (alpha V + beta) / eps``. ``G_n``, ``alpha``
and ``beta`` are unknown: :class:`GradNormState` estimates ``G_n^2`` from the update norms the
clients return, :func:`fit_alpha_beta` gets ``alpha, beta`` from two pilot runs.

How a sketch changes a client's update depends on its optimizer (:class:`UpdateLaw`, chosen by
:func:`update_law`, the one place to swap it; docs/method.md "Update laws"): SGD's sketched update
is unbiased with ``1/rho`` times the squared norm, an Adam-type client's moves ``rho`` of the
coordinates by a full-size step, so its update is ``rho`` times smaller in mean and squared norm.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def variance_term(q: jax.Array, rho: jax.Array, g2: jax.Array, a: jax.Array) -> jax.Array:
    """``V(q, rho) = sum_n a_n^2 G_n^2 (1 / (q_n rho_n) - 1)``; 0 at full participation and rank.

    ``g2`` is ``G_n^2``, the **squared** norm of client ``n``'s unsketched update (not ``G_n``),
    as everywhere in this module: pass ``G ** 2`` if you hold norms.
    """
    chex.assert_equal_shape([q, g2, a])
    return jnp.sum(a * a * g2 * (1.0 / (q * rho) - 1.0))


# ----------------------------------------------------------------------------- update laws

@dataclasses.dataclass(frozen=True)
class UpdateLaw:
    """How client ``n``'s sketched update ``delta_S`` relates to its unsketched update ``u_n``.

    ``E|delta_S|^2 = rho^norm_power |u_n|^2`` and ``E[delta_S] = rho^shrink_power u_n``; with fixed
    learning rates a round whose mean update shrinks by ``s`` makes ``s^progress_power`` of the
    progress. ``G_n^2 = |u_n|^2`` (the unsketched second moment) in every law.
    """

    name: str
    norm_power: float
    shrink_power: float
    progress_power: float


SGD_LAW = UpdateLaw("sgd", norm_power=-1.0, shrink_power=0.0, progress_power=0.0)
# progress_power: 0 if the learning rate were re-tuned to the step, 1 in the small-step limit; 0.5
# is measured (tiny preset, AdamW 5e-3, full participation: 0.34-0.62; docs/method.md).
ADAM_LAW = UpdateLaw("adam", norm_power=1.0, shrink_power=1.0, progress_power=0.5)
# The rounds model fitted against training (benchmarks/calibrate_rounds.py; docs/method.md,
# "Calibrated rounds model"): the noise weight c (alpha = c / |g|^2) and progress_power p from the
# rounds to validation accuracy 0.8 of the tiny preset's AdamW clients at 15 uniform (q, rho),
# tuning seeds 1000-1003 only. The options of ``adaptive_calibrated``.
CALIBRATED_NOISE_SCALE = 0.0844
CALIBRATED_PROGRESS_POWER = 0.239
_LAWS = {"sgd": SGD_LAW, "momentum": SGD_LAW, "adam": ADAM_LAW, "adamw": ADAM_LAW}


def update_law(optimizer: str) -> UpdateLaw:
    """The law of a client optimizer (``OptimizerConfig.name``): linear ones (SGD, momentum) keep the
    ``r/k``-scaled gradient, Adam-type ones normalise it away coordinate by coordinate."""
    if optimizer not in _LAWS:
        raise ValueError(f"No update law for client optimizer {optimizer!r}; known: {sorted(_LAWS)}.")
    return _LAWS[optimizer]


def unsketched_sq_norm(sq_norms: jax.Array, rho: jax.Array, law: UpdateLaw = SGD_LAW) -> jax.Array:
    """``G_n^2`` samples from reported ``|delta_S|^2``: ``rho^-norm_power |delta_S|^2`` (SGD:
    ``rho |delta|^2``; Adam: ``|delta|^2 / rho``)."""
    return sq_norms * rho ** -law.norm_power


def step_shrink(rho: jax.Array, a: jax.Array, law: UpdateLaw = SGD_LAW) -> jax.Array:
    """``s = sum_n a_n rho_n^shrink_power / sum_n a_n``: the aggregate's mean update over the
    unsketched one (1 for SGD; the data-weighted mean ``rho`` for Adam)."""
    return jnp.sum(a * rho ** law.shrink_power) / jnp.sum(a)


def aggregate_variance(q: jax.Array, rho: jax.Array, g2: jax.Array, a: jax.Array,
                       law: UpdateLaw = SGD_LAW) -> jax.Array:
    """Variance of the applied update ``sum_n a_n (I_n/q_n) delta_n``:
    ``sum_n a_n^2 G_n^2 (rho_n^norm_power / q_n - rho_n^(2 shrink_power))`` (SGD: ``V(q, rho)``)."""
    chex.assert_equal_shape([q, g2, a])
    return jnp.sum(a * a * g2 * (rho ** law.norm_power / q - rho ** (2 * law.shrink_power)))


def predicted_rounds(q: jax.Array, rho: jax.Array, g2: jax.Array, a: jax.Array, alpha: float, beta: float,
                     eps: float = 1.0, law: UpdateLaw = SGD_LAW) -> jax.Array:
    """Rounds to accuracy ``eps``: ``(alpha V_law / s^2 + beta) / (eps s^progress_power)``.

    ``V_law / s^2`` is the noise-to-signal ratio of the applied update (:func:`aggregate_variance`
    over the squared shrunk mean, ``alpha = 1/|g|^2``); ``s^-progress_power`` the rounds a smaller
    mean step costs (:func:`step_shrink`). SGD: ``s = 1``, so ``(alpha V(q, rho) + beta) / eps``.
    """
    s = step_shrink(rho, a, law)
    noise = aggregate_variance(q, rho, g2, a, law) / s ** 2
    return (alpha * noise + beta) / (eps * s ** law.progress_power)


# ----------------------------------------------------------------------------- G_n^2 estimator

@struct.dataclass
class GradNormState:
    """Running estimate of each client's update second moment ``G_n^2``.

    ``mean`` is the plain mean of a client's first ``pilot`` reports (``count`` of them), then an
    exponential moving average so the estimate tracks training.
    """

    mean: jax.Array   # (N,) current estimate of G_n^2 (0 where never seen)
    count: jax.Array  # (N,) reports received


def init_grad_norms(num_clients: int) -> GradNormState:
    return GradNormState(mean=jnp.zeros(num_clients), count=jnp.zeros(num_clients, jnp.int32))


def update_grad_norms(state: GradNormState, mask: jax.Array, sq_norms: jax.Array, rho: jax.Array,
                      pilot: int = 5, decay: float = 0.9, law: UpdateLaw = SGD_LAW,
                      head_sq_norms: jax.Array | None = None) -> GradNormState:
    """Fold in the squared update norms ``|D_n|^2`` (N,) of this round's participants ``mask``.

    Each report is mapped to the unsketched ``G_n^2`` by the client optimizer's ``law``
    (:func:`unsketched_sq_norm`); ``head_sq_norms`` (N,), the part of ``sq_norms`` from parameters
    that are never sketched (heads), is kept as reported. Mean of the first ``pilot`` reports,
    then EMA.
    """
    chex.assert_equal_shape([state.mean, mask, sq_norms])
    head = jnp.zeros_like(sq_norms) if head_sq_norms is None else head_sq_norms
    sample = unsketched_sq_norm(sq_norms - head, rho, law) + head
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
