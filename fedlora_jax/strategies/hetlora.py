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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedlora_jax.aggregation import (Message, Rule, lora_factors, normalized, product_sq_norm,
                                     rank_prefix, sketched)
from fedlora_jax.engine import FederationConfig, RoundResult
from fedlora_jax.lora import LoRAConfig
from fedlora_jax.sketch import restrict_to_sketch
from fedlora_jax.strategies.base import Plan, TieredRanks


class Pruning(NamedTuple):
    """A HetLoRA client's report: the last kept component's squared norm over the mean of its
    kept components' (:func:`component_sq_norms`)."""

    last_component_share: jax.Array


def component_sq_norms(tree) -> jax.Array:
    """``sum_layers |a_j|^2 |b_j|^2`` for every rank component ``j`` (r,): the squared norm of
    component ``j``'s rank-one product, summed over the adapted layers."""
    return sum(jnp.sum(a * a, 0) * jnp.sum(b * b, 1) for a, b in lora_factors(tree).values())


def pruning_signal(final, sketch) -> Pruning:
    """:class:`Pruning` of a client's final trainables ``final`` that kept the prefix ``sketch``."""
    kept = jax.tree.leaves(sketch)[0] > 0
    comp = jnp.where(kept, component_sq_norms(final), 0.0)
    last = comp[jnp.sum(kept) - 1]
    return Pruning(last / (comp.sum() / jnp.sum(kept)))


def padded_message(start, delta, sketch) -> Message:
    """The final adapter zero-padded to rank ``r`` (components outside the client's prefix zeroed),
    weighted by ``|A B|_F``; reports the pruning signal."""
    final = jax.tree.map(jnp.add, start, delta)
    padded = restrict_to_sketch(final, sketch)
    norm = jnp.sqrt(sum(product_sq_norm(a, b) for a, b in lora_factors(padded).values()))
    return Message(padded, norm, pruning_signal(final, sketch))


def average_is_global(trainable, server, total, weight_sum):
    """The normalized average of the padded adapters replaces the global one (no change when
    nobody took part)."""
    average = normalized(total, weight_sum)
    return jax.tree.map(lambda new, old: jnp.where(weight_sum > 0, new - old, 0.0),
                        average, trainable), server


def rule() -> Rule:
    """HetLoRA's rule: rank-prefix truncation, zero-padded norm-weighted averaging."""
    return sketched()._replace(start=rank_prefix, message=padded_message, finish=average_is_global)


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

    def rule(self, lora: LoRAConfig, federation: FederationConfig) -> Rule:
        del lora, federation
        return rule()

    def revise(self, plan: Plan, result: RoundResult) -> Plan:
        if not self.prune_below or not result.participants.size:
            return plan
        share = result.clients.rule.last_component_share
        ids = result.participants[(share < self.prune_below)
                                  & (plan.k[result.participants] > self.min_rank)]
        k = plan.k.copy()
        k[ids] -= 1
        return plan._replace(k=k)
