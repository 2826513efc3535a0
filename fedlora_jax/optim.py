"""Optimizers by name, for clients (local steps) and the server (applying the pseudo-gradient)."""

from __future__ import annotations

import dataclasses

import optax

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"
    learning_rate: float = 0.05
    weight_decay: float = 0.0
    momentum: float = 0.9  # for "momentum"; b1 for adam(w)
    clip_norm: float | None = None

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.name!r}; valid: {list(OPTIMIZERS)}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm!r}.")


def make_optimizer(cfg: OptimizerConfig, learning_rate=None) -> optax.GradientTransformation:
    """The optimizer of ``cfg``; ``learning_rate`` replaces its rate, e.g. by a traced per-run
    rate (packed runs: :class:`fedlora_jax.engine.PackedEngine`)."""
    lr = cfg.learning_rate if learning_rate is None else learning_rate
    opt = {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=cfg.momentum),
        "adam": lambda: optax.adam(lr, b1=cfg.momentum),
        "adamw": lambda: optax.adamw(lr, b1=cfg.momentum, weight_decay=cfg.weight_decay),
    }[cfg.name]()
    if cfg.weight_decay and cfg.name != "adamw":
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    if cfg.clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt
