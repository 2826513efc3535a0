"""``fslora`` (FSLoRA, Fang et al. 2025): fixed per-client sketch ratios from resource tiers,
uniform sampling of ``K`` of ``N`` clients.

Clients are ranked by compute speed and split into ``len(ratios)`` near-equal tiers; the slowest
tier gets the smallest ratio. FSLoRA's GLUE setting uses ``{1/8, 1/4, 1/2}``. The tiers are shared
by the heterogeneous-rank baselines (:class:`TieredRanks`: HetLoRA, FlexLoRA, FLoRA), so all of
them give a client the same compute and upload budget and differ only in how they aggregate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from fedlora_jax.engine import ratio_to_rank
from fedlora_jax.strategies.base import Context, Estimates, Plan, Strategy


@dataclasses.dataclass(frozen=True)
class TieredRanks(Strategy):
    """Uniform ``K`` of ``N`` sampling; client ranks ``k_n = ratio * r`` by compute tier."""

    ratios: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2)
    sampling: ClassVar[str] = "uniform"

    def __post_init__(self):
        if not self.ratios or any(not 0 < r <= 1 for r in self.ratios):
            raise ValueError(f"{self.name} ratios must be a non-empty tuple in (0, 1], "
                             f"got {self.ratios!r}.")

    def settings(self) -> dict[str, tuple[Any, str]]:
        return {**super().settings(),
                "federation.sketch_ratio": (None, f"{self.name} sets each client's ratio from "
                                                  f"its compute tier {self.ratios}")}

    def plan(self, round: int, ctx: Context, est: Estimates) -> Plan:
        del round, est
        return ctx.uniform(tier_ranks(np.asarray(ctx.profile.flops_per_s), self.ratios, ctx.rank))


@dataclasses.dataclass(frozen=True)
class FSLoRA(TieredRanks):
    name: str = "fslora"


def tier_ranks(speeds: np.ndarray, ratios: tuple[float, ...], rank: int) -> np.ndarray:
    """Kept ranks by compute tier: the ``i``-th slowest of ``len(ratios)`` tiers gets the
    ``i``-th smallest ratio."""
    tier = np.empty(speeds.size, np.int64)
    tier[np.argsort(speeds, kind="stable")] = np.arange(speeds.size) * len(ratios) // speeds.size
    return ratio_to_rank(np.sort(np.asarray(ratios))[tier], rank)
