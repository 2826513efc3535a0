"""``flora`` (FLoRA, Wang et al. 2024): every round each participant trains a fresh adapter of its
own rank ``k_n`` (resource tiers, as FSLoRA's); the server *stacks* them,
``A_stack = [w_1 A_1, ..., w_K A_K]``, ``B_stack = [B_1; ...; B_K]``, so that
``A_stack B_stack = sum_n w_n A_n B_n`` exactly (no cross terms, unlike averaging ``A`` and ``B``),
and merges the stacked product into the frozen base.

The merged products live in the rule's server state and are added to the base kernels the
clients and the evaluation run on. The download grows with the stack: every participant receives
the stacked adapter of the round (``sum_n k_n / r`` full adapters), which the clock charges. The
merge bypasses the server optimizer, so FLoRA pins it to ``sgd`` at learning rate 1 (FedAvg).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax.aggregation import (AdapterSizes, Costs, Rule, RuleState, adapter_costs,
                                     lora_factors, map_factors, prefix_sketch, product_averages,
                                     products_rule)
from fedlora_jax.engine import FederationConfig
from fedlora_jax.lora import BaseKernel, LoRAConfig, layer_key
from fedlora_jax.optim import OptimizerConfig
from fedlora_jax.strategies.base import TieredRanks

MERGED = "merged"


def add_to_kernels(base, merged: dict[str, jax.Array]):
    """``base`` with ``merged[layer]`` added to the frozen kernel (:class:`BaseKernel`) of every
    LoRA layer."""
    def add(path, var):
        if not isinstance(var, BaseKernel):
            return var
        kernel = var.get_value()
        return var.replace(kernel + merged[layer_key(path, var)].astype(kernel.dtype))
    return nnx.map_state(add, base)


def merged_zeros(trainable, weights) -> RuleState:
    """No product merged yet: a zero ``d_in x d_out`` matrix per LoRA layer."""
    del weights
    return RuleState(server={MERGED: {layer: jnp.zeros((a.shape[0], b.shape[1]), a.dtype)
                                      for layer, (a, b) in lora_factors(trainable).items()}},
                     clients={})


def merged_base(base, server):
    """The base with the merged products added to its kernels."""
    return add_to_kernels(base, server[MERGED])


def fresh_adapter(trainable, rows, template, k, key):
    """A fresh adapter: ``A`` uniform in ``+-1/sqrt(d_in)`` (PEFT's init), ``B = 0``; the first
    ``k`` components kept."""
    del rows
    layers = list(lora_factors(trainable))
    keys = dict(zip(layers, jax.random.split(key, len(layers))))

    def fresh(layer, a, b):
        bound = 1.0 / math.sqrt(a.shape[0])
        return (jax.random.uniform(keys[layer], a.shape, a.dtype, -bound, bound),
                jnp.zeros_like(b))

    return map_factors(trainable, fresh), prefix_sketch(k, template)


def rule(scaling: float = 1.0) -> Rule:
    """FLoRA's rule; ``scaling``: the LoRA scaling ``c`` (the merged update is
    ``c sum_n w_n A_n B_n``, the global factors never move)."""

    def merge(trainable, server, total, weight_sum):
        products, deltas = product_averages(total, weight_sum)
        merged = jax.tree.map(lambda m, p: m + scaling * p, server[MERGED], products)
        update = map_factors(deltas, lambda layer, a, b: (jnp.zeros_like(a), jnp.zeros_like(b)))
        return update, {**server, MERGED: merged}

    return products_rule(merge)._replace(init=merged_zeros, base=merged_base, start=fresh_adapter)


@dataclasses.dataclass(frozen=True)
class FLoRA(TieredRanks):
    name: str = "flora"

    def settings(self) -> dict[str, tuple[Any, str]]:
        return {**super().settings(),
                "server_optimizer": (OptimizerConfig("sgd", 1.0),
                                     "flora merges the stacked product into the base (FedAvg)")}

    def rule(self, lora: LoRAConfig, federation: FederationConfig) -> Rule:
        del federation
        return rule(lora.scaling)

    def costs(self, sizes: AdapterSizes, rank: int) -> Costs:
        """Every participant downloads the round's stacked adapters (``sum_n I_n k_n / r`` full
        adapters)."""
        return dataclasses.replace(adapter_costs(sizes, rank), stacked_download=True)
