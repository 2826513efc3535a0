"""``fedit`` (FedIT, Zhang et al. 2024): FedAvg of ``A`` and ``B`` at one rank, ``K`` of ``N``
clients uniformly without replacement each round."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from fedlora_jax.strategies.base import Strategy


@dataclasses.dataclass(frozen=True)
class FedIT(Strategy):
    name: str = "fedit"
    sampling: ClassVar[str] = "uniform"

    def settings(self) -> dict[str, tuple[Any, str]]:
        return {**super().settings(),
                "federation.sketch_ratio": (1.0, "FedIT trains and uploads the full rank")}
