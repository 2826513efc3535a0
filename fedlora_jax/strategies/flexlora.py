"""``flexlora`` (FlexLoRA, Bai et al. 2024): heterogeneous ranks by resource tier; the server
averages the clients' full adapter products ``A_n B_n`` and redistributes the best rank-``r``
approximation of the average by SVD, so a client of rank ``k_n`` receives the best rank-``k_n``
approximation (the first ``k_n`` components, in decreasing singular value).

The global adapter is kept as the rank-``r`` SVD factors ``A = U_r S_r^(1/2)``,
``B = S_r^(1/2) V_r^T``; heads are averaged as in FedAvg. The server's SVDs are charged to the round
(:func:`~fedlora_jax.aggregation.svd_flops` at ``system.server_flops_per_s``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from fedlora_jax.aggregation import (AdapterSizes, Costs, Rule, adapter_costs, lora_from,
                                     map_factors, product_averages, products_rule, svd_flops,
                                     truncated_svd_factors)
from fedlora_jax.engine import FederationConfig
from fedlora_jax.lora import LoRAConfig
from fedlora_jax.strategies.base import TieredRanks


def redistribute(trainable, server, total, weight_sum):
    """The update taking the global factors to the rank-``r`` SVD factors of the mean product, and
    the mean head deltas (no change when nobody took part)."""
    products, deltas = product_averages(total, weight_sum)

    def factors(layer, a, b):
        new_a, new_b = truncated_svd_factors(products[layer], a.shape[-1])
        return (jnp.where(weight_sum > 0, new_a - a, 0.0),
                jnp.where(weight_sum > 0, new_b - b, 0.0))

    # the global factors in place of the LoRA leaves, the mean head deltas elsewhere
    return map_factors(lora_from(trainable, deltas), factors), server


@dataclasses.dataclass(frozen=True)
class FlexLoRA(TieredRanks):
    name: str = "flexlora"

    def rule(self, lora: LoRAConfig, federation: FederationConfig) -> Rule:
        del lora, federation
        return products_rule(redistribute)

    def costs(self, sizes: AdapterSizes, rank: int) -> Costs:
        """The server's SVD of every layer's mean product, on top of the adapter both ways."""
        return dataclasses.replace(adapter_costs(sizes, rank), server_flops=sum(
            svd_flops(d_in, d_out) for d_in, d_out in sizes.layers))
