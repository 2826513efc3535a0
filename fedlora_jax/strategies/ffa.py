"""``ffa`` (FFA-LoRA, Sun et al. 2024): ``A`` frozen at its random init, only ``B`` (and heads)
trained, averaged and sent; ``K`` of ``N`` clients uniformly.

Freezing is a change of variable type (:class:`FrozenLoRA`): ``A`` then splits with the frozen base,
so clients never update it, the server never aggregates it, and the wall-clock model charges it as
base compute (forward and activation backward) with no upload: the payload is ``B`` alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from flax import nnx

from fedlora_jax.lora import lora_layers
from fedlora_jax.strategies.base import Strategy


class FrozenLoRA(nnx.Variable):
    """A LoRA factor held fixed: part of the frozen base, never trained or sent."""


@dataclasses.dataclass(frozen=True)
class FFALoRA(Strategy):
    name: str = "ffa"
    sampling: ClassVar[str] = "uniform"

    def settings(self) -> dict[str, tuple[Any, str]]:
        return {**super().settings(),
                "federation.sketch_ratio": (1.0, "FFA-LoRA trains B at the full rank")}

    def adapt_model(self, model: nnx.Module) -> None:
        for _, layer in lora_layers(model):
            layer.lora_a = FrozenLoRA(layer.lora_a[...])
