"""Local training of one client, written once and vmapped over a chunk of clients.

A client starts from the global trainable state (adapter and heads), takes ``H`` optax steps on its
own minibatches with its sketch mask in place, and returns its update ``delta = X_H - X_0``. Updates
are restricted to the sketch's support, so a client never moves a rank component it does not hold.
Clients are stateless: a fresh optimizer state every round, as in FSLoRA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedlora_jax.lora import TRAINABLE, SketchMask
from fedlora_jax.sketch import restrict_to_sketch

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Local work per round: ``local_steps`` minibatches of ``batch_size`` examples."""

    local_steps: int = 5
    batch_size: int = 8

    def __post_init__(self):
        for name in ("local_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"client.{name} must be a positive integer, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """A model split for federated training: static structure, frozen base, initial trainables."""

    graphdef: nnx.GraphDef
    base: nnx.State
    trainable: nnx.State
    sketch: nnx.State  # all-ones template: the global model's masks


def split_model(model: nnx.Module) -> ModelParts:
    graphdef, trainable, sketch, base = nnx.split(model, TRAINABLE, SketchMask, ...)
    if not jax.tree.leaves(sketch):
        raise ValueError("The model has no LoRA layers: call fedlora_jax.lora.apply_lora first.")
    return ModelParts(graphdef, base, trainable, sketch)


def client_update(graphdef: nnx.GraphDef, base: nnx.State, trainable: nnx.State,
                  sketch: nnx.State, batches: dict, *, loss_fn: LossFn,
                  optimizer: optax.GradientTransformation) -> tuple[nnx.State, dict]:
    """Trains one client for ``H = batches[...].shape[0]`` steps; returns (delta, summed metrics)."""

    def loss_of(params, batch):
        return loss_fn(nnx.merge(graphdef, params, sketch, base), batch)

    def step(carry, batch):
        params, opt_state = carry
        (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, restrict_to_sketch(updates, sketch))
        return (params, opt_state), metrics

    (final, _), metrics = jax.lax.scan(step, (trainable, optimizer.init(trainable)), batches)
    delta = jax.tree.map(jnp.subtract, final, trainable)
    return delta, jax.tree.map(lambda m: m.sum(0), metrics)


def train_clients(graphdef: nnx.GraphDef, base: nnx.State, trainable: nnx.State,
                  sketches: nnx.State, batches: dict, *, loss_fn: LossFn,
                  optimizer: optax.GradientTransformation, block_size: int | None = None
                  ) -> tuple[nnx.State, dict]:
    """:func:`client_update` vmapped over a chunk: sketches and batches carry a leading client
    axis ``C``; the base weights and the global trainables are broadcast, not copied.

    ``block_size`` trains the chunk as a compiled loop over blocks of that many vmapped clients
    (``jax.lax.map``): one call either way, but on a CPU small blocks keep activations in cache.
    """
    num = jax.tree.leaves(batches)[0].shape[0]
    chex.assert_tree_shape_prefix(sketches, (num,))
    run = lambda s, b: client_update(graphdef, base, trainable, s, b, loss_fn=loss_fn,
                                     optimizer=optimizer)
    if block_size is None or block_size >= num:
        return jax.vmap(run)(sketches, batches)
    return jax.lax.map(lambda xs: run(*xs), (sketches, batches), batch_size=block_size)
