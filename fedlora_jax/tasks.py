"""Training objectives: ``loss(model, batch) -> (scalar, metrics)`` for each supported task.

A batch is a dict of arrays with a leading batch axis: ``input_ids`` and ``attention_mask`` (B, L),
optionally ``token_type_ids`` (B, L) (the segments of text pairs), plus ``labels`` (B,) for
classification, or an optional ``loss_mask`` (B, L) for causal LM (1 where the token is a target;
defaults to ``attention_mask``, so prompts can be excluded from the loss). The model is called
with the fields named in :data:`MODEL_INPUTS`, by name.
Metrics are sums with a ``count``, so they average correctly over clients and batches.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: Batch) -> Batch:
    """The fields of ``batch`` the model is called with, as keyword arguments."""
    return {name: batch[name] for name in MODEL_INPUTS if name in batch}


def classification_loss(model, batch: Batch) -> tuple[jax.Array, Metrics]:
    logits = model(**model_inputs(batch)).astype(jnp.float32)
    weight = batch.get("example_mask", jnp.ones(logits.shape[0], jnp.float32))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    count = weight.sum()
    correct = (logits.argmax(-1) == batch["labels"]).astype(jnp.float32)
    loss = (losses * weight).sum() / jnp.maximum(count, 1.0)
    return loss, {"loss_sum": (losses * weight).sum(), "correct": (correct * weight).sum(),
                  "count": count}


def causal_lm_loss(model, batch: Batch) -> tuple[jax.Array, Metrics]:
    logits = model(**model_inputs(batch)).astype(jnp.float32)[:, :-1]
    targets = batch["input_ids"][:, 1:]
    weight = batch.get("loss_mask", batch["attention_mask"])[:, 1:].astype(jnp.float32)
    if "example_mask" in batch:
        weight = weight * batch["example_mask"][:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    count = weight.sum()
    correct = (logits.argmax(-1) == targets).astype(jnp.float32)
    loss = (losses * weight).sum() / jnp.maximum(count, 1.0)
    return loss, {"loss_sum": (losses * weight).sum(), "correct": (correct * weight).sum(),
                  "count": count}


LOSSES: dict[str, Callable] = {"classification": classification_loss, "causal_lm": causal_lm_loss}


def get_loss(task: str) -> Callable:
    if task not in LOSSES:
        raise ValueError(f"Unknown task {task!r}; valid tasks: {sorted(LOSSES)}.")
    return LOSSES[task]


def summarize(metrics: Metrics) -> dict[str, float]:
    """Turns summed metrics into mean loss and accuracy."""
    count = max(float(metrics["count"]), 1.0)
    return {"loss": float(metrics["loss_sum"]) / count, "accuracy": float(metrics["correct"]) / count}
