"""Sketch masks: support size and value, uniform subsets, shared B/A indices, zero gradients."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from fedlora_jax.client import client_update, split_model
from fedlora_jax.optim import OptimizerConfig, make_optimizer
from fedlora_jax.sketch import draw_sketch, rank_mask, restrict_to_sketch
from fedlora_jax.tasks import classification_loss
from tests.conftest import tiny_lora_model


def test_rank_mask_has_k_entries_of_value_r_over_k():
    r = 8
    ks = jnp.array([1, 2, 3, 5, 8, 4, 7, 6])
    keys = jax.random.split(jax.random.key(0), ks.size)
    masks = jax.vmap(lambda key, k: rank_mask(key, k, r))(keys, ks)  # mixed k in one vmap
    chex.assert_shape(masks, (ks.size, r))
    for mask, k in zip(np.asarray(masks), np.asarray(ks)):
        nz = mask[mask != 0]
        assert nz.size == k
        np.testing.assert_allclose(nz, r / k, rtol=1e-6)
        assert mask.mean() == pytest.approx(1.0, rel=1e-6)  # E[S] = I in the trace


def test_every_subset_equally_likely():
    r, k, draws = 5, 2, 20000
    masks = jax.vmap(lambda key: rank_mask(key, jnp.int32(k), r))(
        jax.random.split(jax.random.key(1), draws))
    subsets = list(itertools.combinations(range(r), k))
    index = {s: i for i, s in enumerate(subsets)}
    counts = np.zeros(len(subsets))
    for m in np.asarray(masks):
        counts[index[tuple(np.flatnonzero(m))]] += 1
    assert stats.chisquare(counts).pvalue > 1e-3, counts


def test_shared_and_per_layer_draws():
    template = split_model(tiny_lora_model(rank=8)).sketch
    shared = draw_sketch(jax.random.key(0), jnp.int32(3), template, shared_across_layers=True)
    per_layer = draw_sketch(jax.random.key(0), jnp.int32(3), template, shared_across_layers=False)
    shared_leaves = [np.asarray(x) for x in jax.tree.leaves(shared)]
    assert all((x == shared_leaves[0]).all() for x in shared_leaves)
    per_leaves = [np.asarray(x) for x in jax.tree.leaves(per_layer)]
    assert any((x != per_leaves[0]).any() for x in per_leaves)
    assert all((x != 0).sum() == 3 for x in per_leaves)


def _with_random_b(model, seed=0):
    """Sets every lora_b to random values so both A and B receive gradient."""
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed)

    def fill(path, x):
        if path[-2].key == "lora_b":
            return jax.random.normal(jax.random.fold_in(key, hash(str(path)) % 2**31), x.shape)
        return x

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def test_gradients_of_unselected_components_are_exactly_zero(pool):
    parts = split_model(_with_random_b(tiny_lora_model(rank=6)))
    sketch = draw_sketch(jax.random.key(3), jnp.int32(2), parts.sketch, shared_across_layers=False)
    batch = {k: v[:8] for k, v in pool.examples.items()}

    def loss(trainable):
        return classification_loss(nnx.merge(parts.graphdef, trainable, sketch, parts.base), batch)[0]

    grads = jax.grad(loss)(parts.trainable)
    masks = {p[:-1]: np.asarray(v[...]) > 0 for p, v in nnx.to_flat_state(sketch)}
    for path, g in nnx.to_flat_state(grads):
        if path[-1] not in ("lora_a", "lora_b"):
            continue
        keep = masks[path[:-1]]
        g = np.asarray(g[...])
        rank_axis = g if path[-1] == "lora_b" else g.T  # rows of B, columns of A: the same indices
        assert (rank_axis[~keep] == 0).all()
        assert (np.abs(rank_axis[keep]).sum(1) > 0).all()


def test_weight_decay_never_moves_unheld_components(pool):
    """AdamW's decay would shrink every entry; restricting updates keeps unheld ones fixed."""
    parts = split_model(_with_random_b(tiny_lora_model(rank=6)))
    sketch = draw_sketch(jax.random.key(4), jnp.int32(2), parts.sketch, shared_across_layers=True)
    batches = {k: v[:12].reshape(3, 4, *v.shape[1:]) for k, v in pool.examples.items()}
    opt = make_optimizer(OptimizerConfig("adamw", 1e-2, weight_decay=0.5))
    delta, _ = client_update(parts.graphdef, parts.base, parts.trainable, sketch, batches,
                             loss_fn=classification_loss, optimizer=opt)
    chex.assert_trees_all_equal(delta, restrict_to_sketch(delta, sketch))
    assert any(np.abs(np.asarray(x)).sum() > 0 for x in jax.tree.leaves(delta))
