"""``fixed``: the federation settings as configured, every round (``q = participants / N`` with the
configured sampling scheme, one sketch ratio ``federation.sketch_ratio`` for all clients)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedlora_jax.strategies.base import Context, Estimates, Plan, Strategy, ratio_rank


@dataclasses.dataclass(frozen=True)
class Fixed(Strategy):
    name: str = "fixed"

    def settings(self) -> dict[str, tuple[Any, str]]:
        return {}

    def plan(self, round: int, ctx: Context, est: Estimates) -> Plan:
        del round, est
        return ctx.uniform(ratio_rank(ctx.sketch_ratio, ctx.rank))
