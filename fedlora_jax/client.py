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
    """A model split for federated training: static structure, frozen base, initial trainables.

    ``rngs`` holds the LoRA-dropout random streams (empty without dropout); clients reseed them
    from their own key every step. ``eval_graphdef`` is the same model with dropout switched off.
    """

    graphdef: nnx.GraphDef
    base: nnx.State
    trainable: nnx.State
    sketch: nnx.State  # all-ones template: the global model's masks
    rngs: nnx.State
    eval_graphdef: nnx.GraphDef


def split_model(model: nnx.Module) -> ModelParts:
    """Splits a wrapped model by variable type (:mod:`fedlora_jax.lora`): trainables (``A``, ``B``,
    heads), sketch masks, random streams and the frozen rest, whatever the modules are named."""
    model.train()
    graphdef, trainable, sketch, rngs, base = nnx.split(model, TRAINABLE, SketchMask,
                                                        nnx.RngState, ...)
    if not jax.tree.leaves(sketch):
        raise ValueError("The model has no LoRA layers: call fedlora_jax.lora.apply_lora first.")
    model.eval()
    eval_graphdef = nnx.split(model, TRAINABLE, SketchMask, nnx.RngState, ...)[0]
    model.train()
    return ModelParts(graphdef, base, trainable, sketch, rngs, eval_graphdef)


def reseed(rngs: nnx.State, key: jax.Array) -> nnx.State:
    """Gives every random stream of ``rngs`` its own key derived from ``key``."""
    leaves, treedef = jax.tree.flatten(rngs)
    return jax.tree.unflatten(treedef, [
        jax.random.fold_in(key, i) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        else leaf for i, leaf in enumerate(leaves)])


def client_update(graphdef: nnx.GraphDef, base: nnx.State, trainable: nnx.State,
                  sketch: nnx.State, batches: dict, *, loss_fn: LossFn,
                  optimizer: optax.GradientTransformation, rngs: nnx.State | None = None,
                  key: jax.Array | None = None) -> tuple[nnx.State, dict]:
    """Trains one client for ``H = batches[...].shape[0]`` steps; returns (delta, summed metrics).

    ``key`` seeds the client's dropout (step ``h`` uses ``fold_in(key, h)``); it is required
    when ``rngs`` (the model's random streams) is not empty.
    """
    rngs = nnx.State({}) if rngs is None else rngs
    if jax.tree.leaves(rngs) and key is None:
        raise ValueError("This model uses LoRA dropout: pass the client's PRNG key.")

    def loss_of(params, batch, step_rngs):
        return loss_fn(nnx.merge(graphdef, params, sketch, step_rngs, base, copy=True), batch)

    def step(carry, xs):
        params, opt_state = carry
        h, batch = xs
        step_rngs = rngs if key is None else reseed(rngs, jax.random.fold_in(key, h))
        (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params, batch, step_rngs)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, restrict_to_sketch(updates, sketch))
        return (params, opt_state), metrics

    steps = jax.tree.leaves(batches)[0].shape[0]
    (final, _), metrics = jax.lax.scan(step, (trainable, optimizer.init(trainable)),
                                       (jnp.arange(steps), batches))
    delta = jax.tree.map(jnp.subtract, final, trainable)
    return delta, jax.tree.map(lambda m: m.sum(0), metrics)


def train_clients(graphdef: nnx.GraphDef, base: nnx.State, trainable: nnx.State,
                  sketches: nnx.State, batches: dict, *, loss_fn: LossFn,
                  optimizer: optax.GradientTransformation, rngs: nnx.State | None = None,
                  keys: jax.Array | None = None, block_size: int | None = None,
                  trainable_axis: int | None = None) -> tuple[nnx.State, dict]:
    """:func:`client_update` vmapped over a chunk: sketches, batches (and dropout ``keys``) carry
    a leading client axis ``C``; the base weights are broadcast, and so are the global trainables
    unless ``trainable_axis=0`` (each client starts from its own adapter, e.g. FedSA-LoRA's).

    ``block_size`` trains the chunk as a compiled loop over blocks of that many vmapped clients
    (``jax.lax.map``): one call either way, but on a CPU small blocks keep activations in cache.
    """
    num = jax.tree.leaves(batches)[0].shape[0]
    chex.assert_tree_shape_prefix(sketches, (num,))
    run = lambda t, s, b, k: client_update(graphdef, base, t, s, b, loss_fn=loss_fn,
                                           optimizer=optimizer, rngs=rngs, key=k)
    if block_size is None or block_size >= num:
        return jax.vmap(run, in_axes=(trainable_axis, 0, 0, 0))(trainable, sketches, batches, keys)
    if trainable_axis is None:
        return jax.lax.map(lambda xs: run(trainable, *xs), (sketches, batches, keys),
                           batch_size=block_size)
    return jax.lax.map(lambda xs: run(*xs), (trainable, sketches, batches, keys),
                       batch_size=block_size)
