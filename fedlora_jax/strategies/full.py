"""``full``: full participation at full rank (``q = 1``, ``k = r``): the fewest rounds, the slowest
rounds (the slowest client and the whole band's congestion every round)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from fedlora_jax.strategies.base import Context, Estimates, Plan, Strategy


@dataclasses.dataclass(frozen=True)
class Full(Strategy):
    name: str = "full"
    sampling: ClassVar[str] = "full"

    def settings(self) -> dict[str, tuple[Any, str]]:
        return {**super().settings(),
                "federation.sketch_ratio": (1.0, "full participation trains the full rank"),
                "federation.participants": (None, "every client takes part in every round")}

    def plan(self, round: int, ctx: Context, est: Estimates) -> Plan:
        del round, est
        n = ctx.num_clients
        return Plan(np.ones(n, np.float32), np.full(n, ctx.rank, np.int32))
