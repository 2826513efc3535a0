"""``fedsa`` (FedSA-LoRA, Guo et al. 2025): only ``A`` is shared; every client keeps its own ``B``.

``A`` learns what the clients share and is averaged (FedAvg of deltas, ``a_n I_n / q_n``); ``B``
is client-specific: a client starts each round from the global ``A`` and *its own* ``B_n`` (the
initial ``B``, zero, before its first round) and keeps its trained ``B_n``; it uploads and
downloads ``A`` and the heads only. The per-client ``B_n`` are the rule's client state
(``N x`` the size of ``B``, checked against memory before the run); a rule with per-client
state is personalized.

FedSA-LoRA is personalized and has no global ``B``. The held-out evaluation (a simulator-side
measurement, never sent to anyone) uses the data-weighted mean ``sum_n a_n B_n`` of the local
``B``; where the data names each held-out example's owner (the built-in data), runs also report the
personalized figure: every example scored by its owner's own ``A, B_n`` (``eval_personal_*``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from fedlora_jax.aggregation import (AdapterSizes, Costs, Message, Rule, RuleState, adapter_costs,
                                     lora_factors, map_factors, random_sketch, sketched)
from fedlora_jax.engine import FederationConfig
from fedlora_jax.lora import LoRAConfig
from fedlora_jax.strategies.base import Strategy

WEIGHTS = "weights"


def local_b_rows(trainable, weights) -> RuleState:
    """Every client's ``B`` at the initial global ``B``; the data weights, for the mean ``B``."""
    rows = {layer: jnp.broadcast_to(b, (weights.shape[0],) + b.shape)
            for layer, (_, b) in lora_factors(trainable).items()}
    # a copy of the weights: the state's buffers are donated every round
    return RuleState(server={WEIGHTS: jnp.array(weights)}, clients=rows)


def local_b_model(trainable, state: RuleState, client=None):
    """The global ``A`` with client ``client``'s own ``B``, or (``None``) the data-weighted mean
    ``sum_n a_n B_n``."""
    if client is None:
        mean = {layer: jnp.tensordot(state.server[WEIGHTS], rows, axes=1)
                for layer, rows in state.clients.items()}
        return map_factors(trainable, lambda layer, a, b: (a, mean[layer]))
    return map_factors(trainable, lambda layer, a, b: (a, state.clients[layer][client]))


def own_b_start(trainable, rows, template, k, key, *, shared: bool):
    """The global ``A`` and the client's own ``B``, under FSLoRA's random sketch."""
    trainable, sketch = random_sketch(trainable, rows, template, k, key, shared=shared)
    return map_factors(trainable, lambda layer, a, b: (a, rows[layer])), sketch


def a_message(start, delta, sketch) -> Message:
    """The deltas of ``A`` and the heads (``B``'s zeroed: it is never sent)."""
    del start, sketch
    return Message(map_factors(delta, lambda layer, a, b: (a, jnp.zeros_like(b))),
                   jnp.ones((), jnp.float32))


def keep_b(start, delta, rows) -> dict:
    """The client's trained ``B``."""
    del rows
    final = jax.tree.map(jnp.add, start, delta)
    return {layer: b for layer, (_, b) in lora_factors(final).items()}


def rule(shared_sketch: bool = True) -> Rule:
    """FedSA-LoRA's rule: ``A`` averaged, ``B`` kept per client."""
    return sketched()._replace(
        init=local_b_rows, start=functools.partial(own_b_start, shared=shared_sketch),
        message=a_message, keep=keep_b, model=local_b_model)


@dataclasses.dataclass(frozen=True)
class FedSALoRA(Strategy):
    name: str = "fedsa"
    sampling: ClassVar[str] = "uniform"

    def settings(self) -> dict[str, tuple[Any, str]]:
        return {**super().settings(),
                "federation.sketch_ratio": (1.0, "FedSA-LoRA trains the full rank")}

    def rule(self, lora: LoRAConfig, federation: FederationConfig) -> Rule:
        del lora
        return rule(federation.shared_sketch)

    def costs(self, sizes: AdapterSizes, rank: int) -> Costs:
        """``A`` and the heads each way."""
        return dataclasses.replace(adapter_costs(sizes, rank), upload_lora=float(sizes.lora_a),
                                   download_lora=sizes.lora_a)
