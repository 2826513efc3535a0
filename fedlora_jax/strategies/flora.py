"""``flora`` (FLoRA, Wang et al. 2024): every round each participant trains a fresh adapter of its
own rank ``k_n`` (resource tiers, as FSLoRA's); the server *stacks* them,
``A_stack = [w_1 A_1, ..., w_K A_K]``, ``B_stack = [B_1; ...; B_K]``, so that
``A_stack B_stack = sum_n w_n A_n B_n`` exactly (no cross terms, unlike averaging ``A`` and ``B``),
and merges the stacked product into the frozen base.

The merged products live in the aggregator's server state and are added to the base kernels the
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

from fedlora_jax.aggregation import (AdapterSizes, Aggregator, AggregatorState, ProductAggregator,
                                     lora_factors, map_factors, prefix_sketch)
from fedlora_jax.engine import FederationConfig
from fedlora_jax.lora import BaseKernel, LoRAConfig, layer_key
from fedlora_jax.optim import OptimizerConfig
from fedlora_jax.strategies.fslora import TieredRanks

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


@dataclasses.dataclass(frozen=True)
class FLoRAAggregator(ProductAggregator):
    """``scaling``: the LoRA scaling ``c`` (the merged update is ``c sum_n w_n A_n B_n``)."""

    scaling: float = 1.0

    def init_state(self, trainable, weights):
        del weights
        return AggregatorState(server={MERGED: self.zeros(trainable)[0]}, clients={})

    def client_base(self, base, server):
        return add_to_kernels(base, server[MERGED])

    def start(self, trainable, rows, template, k, key):
        """A fresh adapter: ``A`` uniform in ``+-1/sqrt(d_in)`` (PEFT's init), ``B = 0``."""
        del rows
        layers = list(lora_factors(trainable))
        keys = dict(zip(layers, jax.random.split(key, len(layers))))

        def fresh(layer, a, b):
            bound = 1.0 / math.sqrt(a.shape[0])
            return (jax.random.uniform(keys[layer], a.shape, a.dtype, -bound, bound),
                    jnp.zeros_like(b))

        return map_factors(trainable, fresh), prefix_sketch(k, template)

    def finish(self, trainable, server, total, weight_sum):
        products, deltas = self.averages(total, weight_sum)
        merged = jax.tree.map(lambda m, p: m + self.scaling * p, server[MERGED], products)
        update = map_factors(deltas, lambda layer, a, b: (jnp.zeros_like(a), jnp.zeros_like(b)))
        return update, {**server, MERGED: merged}

    def download_params(self, mask, k, rank, sizes: AdapterSizes):
        return jnp.sum(jnp.where(mask, k, 0)) / rank * sizes.lora + sizes.head


@dataclasses.dataclass(frozen=True)
class FLoRA(TieredRanks):
    name: str = "flora"

    def settings(self) -> dict[str, tuple[Any, str]]:
        return {**super().settings(),
                "server_optimizer": (OptimizerConfig("sgd", 1.0),
                                     "flora merges the stacked product into the base (FedAvg)")}

    def aggregator(self, lora: LoRAConfig, federation: FederationConfig) -> Aggregator:
        return FLoRAAggregator(scaling=lora.scaling)
