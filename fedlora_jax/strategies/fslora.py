"""``fslora`` (FSLoRA, Fang et al. 2025): fixed per-client sketch ratios from resource tiers,
uniform sampling of ``K`` of ``N`` clients, FSLoRA's rule (random sketches scaled ``r / k``).

Clients are ranked by compute speed and split into ``len(ratios)`` near-equal tiers; the slowest
tier gets the smallest ratio (:class:`~fedlora_jax.strategies.base.TieredRanks`, shared by the
heterogeneous-rank baselines HetLoRA, FlexLoRA, FLoRA). FSLoRA's GLUE setting uses
``{1/8, 1/4, 1/2}``.
"""

from __future__ import annotations

import dataclasses

from fedlora_jax.strategies.base import TieredRanks


@dataclasses.dataclass(frozen=True)
class FSLoRA(TieredRanks):
    name: str = "fslora"
