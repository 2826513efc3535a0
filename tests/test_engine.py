"""The round engine against per-client Python references; compile once; bad input."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedlora_jax.client import ClientConfig, client_update, split_model, train_clients
from fedlora_jax.data.pool import sample_batches
from fedlora_jax.engine import FederatedEngine, FederationConfig
from fedlora_jax.lora import LoRAConfig, LoRALinear
from fedlora_jax.optim import OptimizerConfig, make_optimizer
from fedlora_jax.sketch import draw_sketch
from fedlora_jax.tasks import classification_loss
from tests.conftest import random_pool, tiny_lora_model

OPT = OptimizerConfig("adamw", 1e-2, weight_decay=0.01)


def _perturbed_parts(seed=0):
    """A split model whose B is non-zero, so every LoRA factor trains."""
    return _perturbed_parts_of(split_model(tiny_lora_model(rank=4, seed=seed)), seed)


def _perturbed_parts_of(parts, seed=0):
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed), x.shape),
                             parts.trainable)
    return dataclasses.replace(parts, trainable=trainable)


def test_vmapped_chunk_equals_per_client_loop_with_mixed_k(pool):
    parts = _perturbed_parts()
    ks = jnp.array([1, 4, 2, 3, 4, 1])
    ids = jnp.arange(ks.size)
    keys = jax.random.split(jax.random.key(7), (ks.size, 2))
    sketches = jax.vmap(lambda kk, k: draw_sketch(kk, k, parts.sketch, shared_across_layers=False)
                        )(keys[:, 0], ks)
    batches = jax.vmap(lambda i, kk: sample_batches(pool, i, kk, 3, 4))(ids, keys[:, 1])
    opt = make_optimizer(OPT)
    deltas, metrics = jax.jit(lambda s, b: train_clients(
        parts.graphdef, parts.base, parts.trainable, s, b, loss_fn=classification_loss,
        optimizer=opt))(sketches, batches)
    chex.assert_tree_shape_prefix(deltas, (ks.size,))
    single = jax.jit(lambda s, b: client_update(parts.graphdef, parts.base, parts.trainable, s, b,
                                                loss_fn=classification_loss, optimizer=opt))
    for c in range(ks.size):
        take = lambda t: jax.tree.map(lambda x: x[c], t)
        delta_c, metrics_c = single(take(sketches), take(batches))
        chex.assert_trees_all_close(take(deltas), delta_c, atol=1e-6, rtol=1e-5)
        chex.assert_trees_all_close(take(metrics), metrics_c, atol=1e-5, rtol=1e-5)


def _engine(pool, parts=None, **fed):
    parts = parts or _perturbed_parts()
    fed = {"chunk_size": 4, "sketch_ratio": 0.5, **fed}
    return FederatedEngine(parts, pool, classification_loss, client=ClientConfig(2, 4),
                           client_optimizer=OPT, federation=FederationConfig(**fed))


def test_round_equals_python_reference(pool):
    """Aggregate = sum over participants of a_n / q_n * delta_n, each client trained alone."""
    eng = _engine(pool, sampling="independent", participants=6.0, shared_sketch=False)
    q = np.linspace(0.3, 1.0, eng.num_clients).astype(np.float32)
    k = np.arange(eng.num_clients) % 4 + 1
    state = eng.init(seed=3)
    new_state, result = eng.run_round(state, q, k)
    assert result.participants.size > eng.cfg.chunk_size  # several chunks, one padded

    _, _, k_train = jax.random.split(state.key, 3)
    parts, opt = eng.parts, make_optimizer(OPT)

    @jax.jit
    def alone(n, k_n):  # one client, trained on its own, as a user's loop would
        k_sketch, k_data, _ = jax.random.split(jax.random.fold_in(k_train, n), 3)
        sketch = draw_sketch(k_sketch, k_n, parts.sketch, shared_across_layers=False)
        batches = sample_batches(pool, n, k_data, 2, 4)
        return client_update(parts.graphdef, parts.base, parts.trainable, sketch, batches,
                             loss_fn=classification_loss, optimizer=opt)[0]

    expected = parts.trainable
    for n in result.participants:
        delta = alone(jnp.int32(n), jnp.int32(k[n]))
        w = pool.weights[n] / q[n]
        expected = jax.tree.map(lambda e, d: e + w * d, expected, delta)
    chex.assert_trees_all_close(new_state.trainable, expected, atol=1e-6, rtol=1e-5)
    applied = sum(np.sum((np.asarray(e) - np.asarray(t)) ** 2, dtype=np.float64) for e, t in
                  zip(jax.tree.leaves(expected), jax.tree.leaves(parts.trainable)))
    assert result.applied_sq_norm == pytest.approx(applied, rel=1e-4)  # |D|^2 of the step


def _counting_loss():
    traces = []

    def loss(model, batch):
        traces.append(1)
        return classification_loss(model, batch)

    return loss, traces


def test_one_compile_across_participant_counts_and_empty_rounds(pool):
    loss, traces = _counting_loss()
    eng = FederatedEngine(_perturbed_parts(), pool, loss, client=ClientConfig(2, 4),
                          federation=FederationConfig(chunk_size=4))
    state, _ = eng.run_round(eng.init(), np.full(eng.num_clients, 0.5, np.float32))
    compiled_traces = len(traces)
    assert compiled_traces > 0
    counts = set()
    for q in [0.05, 1.0, 1e-6, 0.3, 0.9]:
        before = jax.tree.map(np.asarray, state.trainable)
        state, result = eng.run_round(state, np.full(eng.num_clients, q, np.float32))
        counts.add(result.participants.size)
        if result.participants.size == 0:  # an empty round is legal and changes nothing (SGD)
            chex.assert_trees_all_equal(state.trainable, before)
    assert len(counts) >= 4 and 0 in counts
    assert len(traces) == compiled_traces  # no round after the first traced the model again
    assert int(state.round) == 6


def test_padding_and_chunking_change_nothing(pool):
    """12 clients in 4 full chunks of 3, or in one chunk of 16 (4 padding clients) trained as a
    compiled loop over blocks of 4 vmapped clients."""
    by3 = _engine(pool, chunk_size=3, sampling="full")
    by16 = _engine(pool, parts=by3.parts, chunk_size=16, sampling="full", block_size=4)
    s1, r1 = by3.run_round(by3.init(seed=1))
    s2, r2 = by16.run_round(by16.init(seed=1))
    chex.assert_trees_all_close(s1.trainable, s2.trainable, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(r1.clients.update_sq_norm, r2.clients.update_sq_norm, rtol=1e-5)


def test_same_seed_same_result(pool):
    eng = _engine(pool)
    runs = []
    for seed in (11, 11, 12):
        state = eng.init(seed=seed)
        for _ in range(2):
            state, _ = eng.run_round(state)
        runs.append(jax.tree.map(np.asarray, state.trainable))
    chex.assert_trees_all_equal(runs[0], runs[1])
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(runs[0], runs[2])


def test_training_reduces_loss():
    pool = random_pool(num_clients=8, per_client=40, seed=2)
    eng = FederatedEngine(split_model(tiny_lora_model(rank=4)), pool, classification_loss,
                          client=ClientConfig(5, 8), client_optimizer=OptimizerConfig("adamw", 1e-2),
                          federation=FederationConfig(participants=4.0, chunk_size=4))
    state = eng.init()
    before = eng.evaluate(state, pool.examples)["loss"]
    for _ in range(15):
        state, _ = eng.run_round(state)
    assert eng.evaluate(state, pool.examples)["loss"] < before - 0.05


@pytest.mark.parametrize("q, match", [
    (lambda n: np.zeros(n), r"\(0, 1\]"),
    (lambda n: np.full(n, 1.5), r"\(0, 1\]"),
    (lambda n: np.full(n, np.nan), "NaN"),
    (lambda n: np.full(n + 1, 0.5), "one per client"),
    (lambda n: -np.ones(n), r"\(0, 1\]"),
])
def test_bad_probabilities_raise_before_compiling(pool, q, match):
    loss, traces = _counting_loss()
    eng = FederatedEngine(_perturbed_parts(), pool, loss)
    with pytest.raises(ValueError, match=match):
        eng.run_round(eng.init(), q(eng.num_clients))
    assert not traces


@pytest.mark.parametrize("seed", [-1, 2 ** 31, 1.5])
def test_seeds_outside_the_key_range_are_refused(seed):
    with pytest.raises(ValueError, match=r"federation.seed must be an integer in \[0, 2\*\*31\)"):
        FederationConfig(seed=seed)


@pytest.mark.parametrize("k, match", [
    (lambda n: np.zeros(n, int), r"\[1, r=4\]"),
    (lambda n: np.full(n, 5), r"\[1, r=4\]"),
    (lambda n: np.full(n, 1.5), "integers"),
    (lambda n: np.ones(n - 1, int), "expected"),
])
def test_bad_sketch_sizes_raise_before_compiling(pool, k, match):
    loss, traces = _counting_loss()
    eng = FederatedEngine(_perturbed_parts(), pool, loss)
    with pytest.raises(ValueError, match=match):
        eng.run_round(eng.init(), None, k(eng.num_clients))
    assert not traces


def test_bad_weights_and_configs(pool):
    with pytest.raises(ValueError, match="one per client"):
        pool.with_weights(np.ones(pool.num_clients + 2))
    with pytest.raises(ValueError, match="non-negative"):
        pool.with_weights(-np.ones(pool.num_clients))
    with pytest.raises(ValueError, match="non-negative"):
        pool.with_weights(np.full(pool.num_clients, np.nan))
    with pytest.raises(ValueError, match="sampling"):
        FederationConfig(sampling="random")
    with pytest.raises(ValueError, match="sketch_ratio"):
        FederationConfig(sketch_ratio=0.0)
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)


def test_rank_larger_than_layer_raises():
    lin = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds the layer"):
        LoRALinear(lin, rank=5, scaling=1.0, rngs=nnx.Rngs(0))


def test_nan_training_is_reported(pool):
    parts = _perturbed_parts()
    bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), parts.trainable)
    eng = FederatedEngine(dataclasses.replace(parts, trainable=bad), pool,
                          classification_loss, federation=FederationConfig(sampling="full"))
    with pytest.raises(FloatingPointError, match="learning rate"):
        eng.run_round(eng.init())


def test_lora_dropout_draws_per_client_and_step_and_is_off_for_evaluation(pool):
    parts = _perturbed_parts_of(split_model(tiny_lora_model(rank=4, dropout=0.5)))
    assert jax.tree.leaves(parts.rngs)
    opt = make_optimizer(OptimizerConfig("sgd", 0.1))
    batches = jax.tree.map(lambda x: jnp.stack([x[:8].reshape(2, 4, *x.shape[1:])] * 3),
                           pool.examples)
    sketches = jax.tree.map(lambda s: jnp.stack([s] * 3), parts.sketch)
    keys = jnp.stack([jax.random.key(0), jax.random.key(0), jax.random.key(1)])
    deltas, _ = jax.jit(lambda k: train_clients(
        parts.graphdef, parts.base, parts.trainable, sketches, batches,
        loss_fn=classification_loss, optimizer=opt, rngs=parts.rngs, keys=k))(keys)
    same = lambda i, j: all(np.array_equal(x[i], x[j]) for x in jax.tree.leaves(deltas))
    assert same(0, 1) and not same(0, 2)  # the key, not the position, decides the dropout
    eng = FederatedEngine(parts, pool, classification_loss)
    state = eng.init()
    assert eng.evaluate(state, pool.examples) == eng.evaluate(state, pool.examples)
    with pytest.raises(ValueError, match="PRNG key"):
        client_update(parts.graphdef, parts.base, parts.trainable, parts.sketch,
                      jax.tree.map(lambda x: x[0], batches), loss_fn=classification_loss,
                      optimizer=opt, rngs=parts.rngs)
