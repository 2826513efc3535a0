"""Federated LoRA strategies: one small module each over shared primitives (:mod:`.base`).

``get_strategy(name)`` returns a registered strategy; ``configure(cfg)`` applies the settings the
run's strategy pins and rejects those that contradict it.
"""

from __future__ import annotations

import dataclasses
import typing

from fedlora_jax import theory
from fedlora_jax.fields import closest, coerce, from_dict, require
from fedlora_jax.strategies.adaptive import Adaptive
from fedlora_jax.strategies.base import (
    Context,
    Estimates,
    Plan,
    Strategy,
    init_estimates,
    observe,
)
from fedlora_jax.strategies.fedit import FedIT
from fedlora_jax.strategies.fedsa import FedSALoRA
from fedlora_jax.strategies.ffa import FFALoRA
from fedlora_jax.strategies.fixed import Fixed
from fedlora_jax.strategies.flexlora import FlexLoRA
from fedlora_jax.strategies.flora import FLoRA
from fedlora_jax.strategies.fslora import FSLoRA
from fedlora_jax.strategies.full import Full
from fedlora_jax.strategies.hetlora import HetLoRA

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Fixed(), FedIT(), FFALoRA(), HetLoRA(), FlexLoRA(), FLoRA(), FedSALoRA(), Full(), FSLoRA(),
    Adaptive(),
    Adaptive(name="luo", sampling_only=True),
    Adaptive(name="adaptive_sketch_only", sketch_only=True),
    Adaptive(name="adaptive_equal_bw", bandwidth="equal"),
    Adaptive(name="adaptive_calibrated", noise_scale=theory.CALIBRATED_NOISE_SCALE,
             progress_power=theory.CALIBRATED_PROGRESS_POWER),
)}


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``; an unknown name lists the valid ones."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}.{closest(name, STRATEGIES, listing='strategies')}")
    return STRATEGIES[name]


def strategy_of(cfg) -> Strategy:
    """The run's strategy: ``cfg.strategy`` with the parameters in ``cfg.strategy_options``
    (e.g. ``{"pilot_rounds": 3}`` for ``adaptive``, ``{"ratios": [0.25, 0.5]}`` for ``fslora``);
    an unknown parameter names the closest valid one."""
    strategy = get_strategy(cfg.strategy)
    options = cfg.strategy_options
    require(isinstance(options, dict), "strategy_options", options,
            "be a table of the strategy's parameters", "e.g. --set strategy_options.pilot_rounds=3")
    params = {f.name for f in dataclasses.fields(strategy) if f.name != "name"}
    hints = typing.get_type_hints(type(strategy))
    values = {}
    for key, value in options.items():
        if key not in params:
            raise ValueError(f"Unknown parameter strategy_options.{key} of strategy "
                             f"{strategy.name!r}.{closest(key, params, 'strategy_options')}")
        try:
            values[key] = coerce(value, hints[key], f"strategy_options.{key}")
        except TypeError as e:
            raise ValueError(str(e)) from None
    return dataclasses.replace(strategy, **values)


def _get(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _default(cls, path: str):
    """The declared default of a dotted setting, read from the dataclass fields."""
    head, _, rest = path.partition(".")
    field = next(f for f in dataclasses.fields(cls) if f.name == head)
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return _get(value, rest) if rest else value


def _replace(cfg, path: str, value):
    head, _, rest = path.partition(".")
    return dataclasses.replace(cfg, **{head: _replace(getattr(cfg, head), rest, value)
                                       if rest else value})


def contradictions(strategy: Strategy, cfg, baseline: dict | None = None) -> list[str]:
    """Why ``cfg`` contradicts ``strategy``: settings changed from their ``baseline`` value (the
    settings before the user's own layers, e.g. defaults plus a preset, or a resumed run's saved
    config, as nested dicts; default: the dataclass defaults) to another value than the
    strategy's."""
    reasons = []
    for path, (value, why) in strategy.settings().items():
        current = _get(cfg, path)
        default = _default(type(cfg), path) if baseline is None else _lookup(baseline, path)
        if isinstance(default, dict):  # a whole section (e.g. server_optimizer), as a dict tree
            default = from_dict(type(current), default)
        if current != default and (value is None or current != value):
            wanted = "leave it unset" if value is None else f"it uses {value!r}"
            reasons.append(f"{path}={current!r} contradicts strategy {strategy.name!r}: {why} "
                           f"({wanted}, or choose a strategy that takes it, e.g. --strategy fixed).")
    return reasons


def _lookup(values: dict, path: str):
    for part in path.split("."):
        values = values[part]
    return values


def configure(cfg, strategy: Strategy | None = None):
    """``cfg`` with its strategy's pinned settings applied (contradictions are refused when the
    config is loaded: :func:`fedlora_jax.config.load_config`)."""
    strategy = strategy or strategy_of(cfg)
    for path, (value, _) in strategy.settings().items():
        if value is not None:
            cfg = _replace(cfg, path, value)
    return cfg


__all__ = ["Adaptive", "Context", "Estimates", "FFALoRA", "FLoRA", "FSLoRA", "FedIT", "FedSALoRA",
           "Fixed", "FlexLoRA", "Full", "HetLoRA", "Plan",
           "STRATEGIES", "Strategy", "configure", "contradictions", "get_strategy", "strategy_of",
           "init_estimates", "observe"]
