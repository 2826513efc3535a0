"""Adapters found by variable type: every helper that reads or rewrites LoRA factors, heads, masks
or adapted kernels agrees with the module graph (attribute access on each :class:`LoRALinear`) on a
model whose modules and parameters are named to mislead any matching of names; and ``merge_lora``
folds an adapter into the plain linear it wrapped."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedlora_jax import aggregation
from fedlora_jax.client import split_model
from fedlora_jax.lora import (BaseKernel, HeadParam, LoRAA, LoRAB, LoRAConfig, SketchMask,
                              apply_lora, by_layer, lora_layers, merge_lora)
from fedlora_jax.models.tiny import TinyTransformer
from fedlora_jax.sketch import draw_sketch, restrict_to_sketch
from fedlora_jax.strategies.flora import add_to_kernels
from tests.conftest import tiny_lora_model

RANK = 3


class Decoy(nnx.Module):
    """A head whose parameters are named as LoRA factors are."""

    def __init__(self, rngs: nnx.Rngs):
        self.lora_a = nnx.Param(jax.random.normal(rngs.params(), (2,)))
        self.lora_b = nnx.Param(jax.random.normal(rngs.params(), (6, 2)))

    def __call__(self, x):
        return x @ self.lora_b[...] + self.lora_a[...]


class Oddly(nnx.Module):
    """Adapted linears named ``base`` and ``lora_a``, a frozen one named ``kernel``, and a trained
    head named ``lora_b`` (a :class:`Decoy`)."""

    def __init__(self, rngs: nnx.Rngs):
        self.base = nnx.Linear(5, 6, rngs=rngs)
        self.lora_a = nnx.Linear(6, 6, rngs=rngs)
        self.kernel = nnx.Linear(6, 6, rngs=rngs)
        self.lora_b = Decoy(rngs)

    def __call__(self, x):
        return self.lora_b(self.kernel(self.lora_a(self.base(x))))


def _odd_model():
    model = Oddly(nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=RANK, alpha=6.0, targets=("base", "lora_a"),
                                 modules_to_save=("lora_b",)), rngs=nnx.Rngs(1))
    for i, (_, layer) in enumerate(lora_layers(model)):  # a non-zero B, as after training
        layer.lora_b[...] = jax.random.normal(jax.random.key(i), layer.lora_b.shape)
    return model


def _graph_factors(model):
    """``{layer: (A, B)}`` read off the modules, the reference for the helpers."""
    return {path: (np.asarray(m.lora_a[...]), np.asarray(m.lora_b[...]))
            for path, m in lora_layers(model)}


def _graph_heads(model):
    return [np.asarray(v[...]) for _, v in nnx.iter_graph(model) if isinstance(v, HeadParam)]


def _values(state, kind):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.filter_state(state, kind))]


def test_apply_lora_types_every_adapter_variable():
    model = tiny_lora_model(rank=RANK)
    for _, layer in lora_layers(model):
        assert (type(layer.lora_a), type(layer.lora_b)) == (LoRAA, LoRAB)
        assert (type(layer.sketch), type(layer.base.kernel)) == (SketchMask, BaseKernel)
    assert {type(v) for _, v in nnx.to_flat_state(split_model(model).trainable)} == {
        LoRAA, LoRAB, HeadParam}


def test_helpers_find_adapters_by_type_not_by_name():
    model = _odd_model()
    parts = split_model(model)
    factors, heads = _graph_factors(model), _graph_heads(model)
    assert sorted(factors) == ["base", "lora_a"] and len(heads) == 2  # the decoy's two parameters

    found = aggregation.lora_factors(parts.trainable)
    assert sorted(found) == sorted(factors)
    for layer, (a, b) in factors.items():
        np.testing.assert_array_equal(found[layer][0], a)
        np.testing.assert_array_equal(found[layer][1], b)

    sizes = aggregation.adapter_sizes(parts.trainable)
    assert (sizes.lora_a, sizes.lora_b) == (sum(a.size for a, _ in factors.values()),
                                            sum(b.size for _, b in factors.values()))
    assert sizes.head == sum(h.size for h in heads) == 14
    assert sorted(sizes.layers) == sorted((a.shape[0], b.shape[1]) for a, b in factors.values())
    np.testing.assert_allclose(aggregation.head_sq_norm(parts.trainable),
                               sum(np.sum(h ** 2) for h in heads), rtol=1e-6)

    mapped = aggregation.map_factors(parts.trainable, lambda layer, a, b: (2 * a, b - 1),
                                     head_fn=jnp.negative)
    for layer, (a, b) in aggregation.lora_factors(mapped).items():
        np.testing.assert_array_equal(a, 2 * factors[layer][0])
        np.testing.assert_array_equal(b, factors[layer][1] - 1)
    for got, head in zip(_values(mapped, HeadParam), _values(parts.trainable, HeadParam)):
        np.testing.assert_array_equal(got, -head)

    mixed = aggregation.lora_from(mapped, parts.trainable)  # mapped factors, original heads
    for got, want in zip(_values(mixed, nnx.LoRAParam), _values(mapped, nnx.LoRAParam)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(_values(mixed, HeadParam), _values(parts.trainable, HeadParam)):
        np.testing.assert_array_equal(got, want)


def test_restrict_to_sketch_masks_factors_by_type():
    model = _odd_model()
    parts = split_model(model)
    sketch = draw_sketch(jax.random.key(2), jnp.int32(1), parts.sketch, shared_across_layers=False)
    held = {path: np.asarray(s) > 0 for path, s in by_layer(sketch, SketchMask).items()}
    restricted = restrict_to_sketch(parts.trainable, sketch)
    for layer, (a, b) in aggregation.lora_factors(restricted).items():
        ref_a, ref_b = _graph_factors(model)[layer]
        assert held[layer].sum() == 1
        np.testing.assert_array_equal(a, np.where(held[layer][None, :], ref_a, 0))
        np.testing.assert_array_equal(b, np.where(held[layer][:, None], ref_b, 0))
    for got, head in zip(_values(restricted, HeadParam), _graph_heads(model)):
        np.testing.assert_array_equal(got, head)  # heads named lora_a/lora_b are kept whole


def test_add_to_kernels_adds_to_the_adapted_kernels_only():
    model = _odd_model()
    parts = split_model(model)
    merged = {path: np.full((m.base.in_features, m.base.out_features), i + 1.0, np.float32)
              for i, (path, m) in enumerate(lora_layers(model))}
    before = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(parts.base)}
    after = {path: np.asarray(v[...])
             for path, v in nnx.to_flat_state(add_to_kernels(parts.base, merged))}
    adapted = {("base", "base", "kernel"): merged["base"],
               ("lora_a", "base", "kernel"): merged["lora_a"]}
    assert set(after) == set(before)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value + adapted.get(path, 0.0))


def test_merge_lora_folds_the_adapter_into_the_plain_linear():
    model = tiny_lora_model(rank=RANK, modules_to_save=())
    for i, (_, layer) in enumerate(lora_layers(model)):
        layer.lora_b[...] = jax.random.normal(jax.random.key(i), layer.lora_b.shape)
    ids = jax.random.randint(jax.random.key(9), (2, 8), 1, 64)
    mask = jnp.ones((2, 8), jnp.int32)
    wrapped = model(ids, mask)
    merge_lora(model)
    np.testing.assert_allclose(model(ids, mask), wrapped, atol=1e-5)
    never_wrapped = TinyTransformer(model.cfg, rngs=nnx.Rngs(0))  # modules and variable types
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(never_wrapped))
