"""Sampling schemes and the unbiased, sketched aggregate (docs/method.md, 'Aggregation rules'),
by Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import sampling
from fedlora_jax.client import split_model, train_clients
from fedlora_jax.optim import OptimizerConfig, make_optimizer
from fedlora_jax.sketch import draw_sketch
from fedlora_jax.tasks import classification_loss
from tests.conftest import random_pool, tiny_lora_model


def test_scheme_inclusion_probabilities():
    q = jnp.array([0.1, 0.5, 0.9, 1.0, 0.25])
    keys = jax.random.split(jax.random.key(0), 20000)
    freq = np.asarray(jax.vmap(sampling.independent_mask, (0, None))(keys, q)).mean(0)
    np.testing.assert_allclose(freq, q, atol=4 * np.sqrt(0.25 / keys.shape[0]))
    uni = np.asarray(jax.vmap(sampling.uniform_mask, (0, None))(keys, q))
    assert (uni.sum(1) == round(float(q.sum()))).all()
    np.testing.assert_allclose(uni.mean(0), sampling.inclusion_probabilities("uniform", q),
                               atol=0.02)
    assert np.asarray(sampling.full_mask(keys[0], q)).all()


def test_sketched_sampled_aggregate_is_unbiased_with_the_stated_variance():
    """One SGD step from B = 0: delta_n = -lr S_n g_n exactly, so
    E[sum a I/q delta] = sum a delta_full and
    E||sum a I/q delta - sum a delta_full||^2 = sum a^2 ||delta_full||^2 (1/(q rho) - 1)."""
    rank, n, trials = 4, 5, 6000
    parts = split_model(tiny_lora_model(rank=rank, modules_to_save=()))
    pool = random_pool(num_clients=n, per_client=4, seed=5)
    a = jnp.array([0.1, 0.3, 0.2, 0.15, 0.25])
    q = jnp.array([0.3, 0.9, 0.5, 1.0, 0.6])
    k = jnp.array([1, 4, 2, 3, 2])
    # each client's fixed batch: the same data every trial, so only I and S are random
    batch = {name: jnp.stack([pool.examples[name][pool.order[pool.offsets[i]]][None]
                              for i in range(n)])[:, None] for name in pool.examples}
    opt = make_optimizer(OptimizerConfig("sgd", 0.5))
    train = jax.jit(lambda sketches, batches: train_clients(
        parts.graphdef, parts.base, parts.trainable, sketches, batches,
        loss_fn=classification_loss, optimizer=opt)[0])
    flat = lambda tree: jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], 1)

    full = flat(train(jax.tree.map(lambda t: jnp.broadcast_to(t, (n, *t.shape)), parts.sketch), batch))
    target = (a[:, None] * full).sum(0)

    keys = jax.random.split(jax.random.key(42), (trials, n + 1))
    sketches = jax.vmap(jax.vmap(lambda kk, kn: draw_sketch(kk, kn, parts.sketch,
                                                            shared_across_layers=False)))(
        keys[:, 1:], jnp.broadcast_to(k, (trials, n)))
    masks = jax.vmap(sampling.independent_mask, (0, None))(keys[:, 0], q)
    weights = jax.vmap(sampling.aggregation_weights, (0, None, None))(masks, a, q)
    tile = jax.tree.map(lambda b: jnp.broadcast_to(b, (trials, *b.shape)), batch)
    deltas = jax.vmap(lambda s, b: flat(train(s, b)))(sketches, tile)  # (trials, n, P)
    aggregates = jnp.einsum("tn,tnp->tp", weights, deltas)

    rho = k / rank
    predicted = float((a ** 2 * (full ** 2).sum(1) * (1 / (q * rho) - 1)).sum())
    err = np.asarray(aggregates - target)
    mc_second_moment = (err ** 2).sum(1)
    assert mc_second_moment.mean() == pytest.approx(predicted, rel=0.06)
    # unbiased: every coordinate of the mean within 5 standard errors of the target
    z = err.mean(0) / (err.std(0) / np.sqrt(trials) + 1e-12)
    assert np.abs(z[err.std(0) > 0]).max() < 5.0
    assert float(((err.mean(0)) ** 2).sum()) < 3 * predicted / trials
