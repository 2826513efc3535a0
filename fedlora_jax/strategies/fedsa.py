"""``fedsa`` (FedSA-LoRA, Guo et al. 2025): only ``A`` is shared; every client keeps its own ``B``.

``A`` learns what the clients share and is averaged (FedAvg of deltas, ``a_n I_n / q_n``); ``B``
is client-specific: a client starts each round from the global ``A`` and *its own* ``B_n`` (the
initial ``B``, zero, before its first round) and keeps its trained ``B_n``; it uploads and
downloads ``A`` and the heads only. The per-client ``B_n`` are the aggregator's client state
(``N x`` the size of ``B``, checked against memory before the run).

FedSA-LoRA is personalized and has no global ``B``. The held-out evaluation (a simulator-side
measurement, never sent to anyone) uses the data-weighted mean ``sum_n a_n B_n`` of the local
``B``; where the data names each held-out example's owner (the built-in data), runs also report the
personalized figure: every example scored by its owner's own ``A, B_n`` (``eval_personal_*``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from fedlora_jax.aggregation import (AdapterSizes, Aggregator, AggregatorState, lora_factors,
                                     map_factors)
from fedlora_jax.engine import FederationConfig
from fedlora_jax.lora import LoRAConfig
from fedlora_jax.strategies.base import Strategy

WEIGHTS = "weights"


@dataclasses.dataclass(frozen=True)
class FedSAAggregator(Aggregator):
    personalized: ClassVar[bool] = True
    def init_state(self, trainable, weights):
        rows = {layer: jnp.broadcast_to(b, (weights.shape[0],) + b.shape)
                for layer, (_, b) in lora_factors(trainable).items()}
        # a copy of the weights: the state's buffers are donated every round
        return AggregatorState(server={WEIGHTS: jnp.array(weights)}, clients=rows)

    def global_model(self, trainable, state):
        mean = {layer: jnp.tensordot(state.server[WEIGHTS], rows, axes=1)
                for layer, rows in state.clients.items()}
        return map_factors(trainable, lambda layer, a, b: (a, mean[layer]))

    def client_model(self, trainable, state, client):
        return map_factors(trainable, lambda layer, a, b: (a, state.clients[layer][client]))

    def start(self, trainable, rows, template, k, key):
        trainable, sketch = super().start(trainable, rows, template, k, key)
        return map_factors(trainable, lambda layer, a, b: (a, rows[layer])), sketch

    def message(self, start, delta, sketch):
        del start, sketch
        return (map_factors(delta, lambda layer, a, b: (a, jnp.zeros_like(b))),
                jnp.ones((), jnp.float32))

    def keep(self, start, delta, rows):
        final = jax.tree.map(jnp.add, start, delta)
        return {layer: b for layer, (_, b) in lora_factors(final).items()}

    def uploaded_lora_params(self, sizes: AdapterSizes) -> float:
        return float(sizes.lora_a)

    def download_params(self, mask, k, rank, sizes: AdapterSizes):
        return jnp.float32(sizes.lora_a + sizes.head)


@dataclasses.dataclass(frozen=True)
class FedSALoRA(Strategy):
    name: str = "fedsa"
    sampling: ClassVar[str] = "uniform"

    def settings(self) -> dict[str, tuple[Any, str]]:
        return {**super().settings(),
                "federation.sketch_ratio": (1.0, "FedSA-LoRA trains the full rank")}

    def aggregator(self, lora: LoRAConfig, federation: FederationConfig) -> Aggregator:
        return FedSAAggregator(shared_sketch=federation.shared_sketch)
