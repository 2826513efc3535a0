"""``hetlora`` (HetLoRA, Cho et al. 2024): heterogeneous ranks by resource tier, truncation of the
global adapter to a client's rank, zero-padding and norm-weighted aggregation, rank self-pruning.

- A client of rank ``k_n`` trains the first ``k_n`` components of the global adapter, unscaled
  (:func:`~fedlora_jax.aggregation.prefix_sketch`); ranks start from compute tiers as FSLoRA's.
- It sends its final adapter zero-padded to the global rank ``r``; the server averages the padded
  adapters (heads included) with weights ``a_n I_n / q_n |A_n B_n|_F`` normalized among the
  participants ("sparsity-weighted aggregation"): components a low-rank client does not hold are
  pulled toward zero by its padding.
- Self-pruning (our formulation of the rule): after a round, a participant whose last kept
  component carries less than ``prune_below`` times the mean squared norm of its kept components
  (``|a_j|^2 |b_j|^2`` summed over layers) drops that component for the following rounds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedlora_jax.aggregation import (Aggregator, TruncatingAggregator, lora_factors, normalized,
                                     product_sq_norm)
from fedlora_jax.engine import FederationConfig, RoundResult
from fedlora_jax.lora import LoRAConfig
from fedlora_jax.sketch import restrict_to_sketch
from fedlora_jax.strategies.base import Plan
from fedlora_jax.strategies.fslora import TieredRanks


def component_sq_norms(tree) -> jax.Array:
    """``sum_layers |a_j|^2 |b_j|^2`` for every rank component ``j`` (r,): the squared norm of
    component ``j``'s rank-one product, summed over the adapted layers."""
    return sum(jnp.sum(a * a, 0) * jnp.sum(b * b, 1) for a, b in lora_factors(tree).values())


@dataclasses.dataclass(frozen=True)
class HetLoRAAggregator(TruncatingAggregator):
    def message(self, start, delta, sketch):
        # zero-padding to rank r: the components outside the client's prefix are zeroed
        padded = restrict_to_sketch(jax.tree.map(jnp.add, start, delta), sketch)
        norm = jnp.sqrt(sum(product_sq_norm(a, b) for a, b in lora_factors(padded).values()))
        return padded, norm

    def report(self, start, delta, sketch):
        final = jax.tree.map(jnp.add, start, delta)
        kept = jax.tree.leaves(sketch)[0] > 0
        comp = jnp.where(kept, component_sq_norms(final), 0.0)
        last = comp[jnp.sum(kept) - 1]
        return {"last_component_share": last / (comp.sum() / jnp.sum(kept))}

    def finish(self, trainable, server, total, weight_sum):
        average = normalized(total, weight_sum)
        return jax.tree.map(lambda new, old: jnp.where(weight_sum > 0, new - old, 0.0),
                            average, trainable), server


@dataclasses.dataclass(frozen=True)
class HetLoRA(TieredRanks):
    """Attributes: ``ratios`` (rank tiers, slowest clients smallest), ``prune_below`` (pruning
    threshold, 0 disables pruning), ``min_rank``."""

    name: str = "hetlora"
    prune_below: float = 0.5
    min_rank: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.prune_below < 0 or self.min_rank < 1:
            raise ValueError("hetlora: need prune_below >= 0 and min_rank >= 1.")

    def aggregator(self, lora: LoRAConfig, federation: FederationConfig) -> Aggregator:
        return HetLoRAAggregator()

    def revise(self, plan: Plan, result: RoundResult) -> Plan:
        if not self.prune_below or not result.participants.size:
            return plan
        share = result.reports["last_component_share"]
        ids = result.participants[(share < self.prune_below)
                                  & (plan.k[result.participants] > self.min_rank)]
        k = plan.k.copy()
        k[ids] -= 1
        return plan._replace(k=k)
