"""The run configuration: frozen dataclasses, loaded from TOML/YAML plus ``--set`` overrides.

Each component keeps its own config beside its code (``LoRAConfig`` in :mod:`lora`, ...); this
module assembles them into :class:`RunConfig` and turns nested dicts into it, strictly: an unknown
key names the closest valid one, a wrong type names the field and the expected type, and each
dataclass validates its own ranges in ``__post_init__``. Nothing runs before the whole config
validates.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fedlora_jax import presets
from fedlora_jax.client import ClientConfig
from fedlora_jax.engine import FederationConfig
from fedlora_jax.lora import LoRAConfig
from fedlora_jax.optim import OptimizerConfig
from fedlora_jax.wireless import SystemConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``source``: ``minilm`` (the embedded all-MiniLM-L6-v2 checkpoint), ``tiny`` (the built-in
    random-init transformer) or the path of a local Hugging Face model directory."""

    source: str = "minilm"
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``source``: ``builtin`` (Python's documentation, 7 chapters), ``synthetic`` or a local file
    (TSV/CSV/JSON/JSONL classification data). ``partition``: ``natural`` (by topic, builtin only),
    ``dirichlet`` (over labels, with ``alpha``) or ``iid``. ``synthetic_per_client``: examples
    per client of the synthetic data (before the held-out split)."""

    source: str = "builtin"
    num_clients: int = 50
    partition: str = "natural"
    alpha: float = 0.5
    max_length: int = 48
    heldout_fraction: float = 0.3
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    synthetic_per_client: int = 50

    def __post_init__(self):
        if self.partition not in ("natural", "dirichlet", "iid"):
            raise ValueError(f"data.partition must be 'natural', 'dirichlet' or 'iid', "
                             f"got {self.partition!r}.")
        if self.partition == "natural" and self.source not in ("builtin",):
            raise ValueError("data.partition='natural' needs a data set with owners (builtin); "
                             "use 'dirichlet' or 'iid' for your own file.")
        if not isinstance(self.num_clients, int) or self.num_clients < 1:
            raise ValueError(f"data.num_clients must be a positive integer, got {self.num_clients!r}.")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"data.heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}.")
        if not self.alpha > 0:
            raise ValueError(f"data.alpha must be > 0, got {self.alpha!r}.")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"data.max_length must be an integer >= 2, got {self.max_length!r}.")
        if not isinstance(self.synthetic_per_client, int) or self.synthetic_per_client < 1:
            raise ValueError(f"data.synthetic_per_client must be a positive integer, "
                             f"got {self.synthetic_per_client!r}.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one simulated federated fine-tuning run needs.

    ``strategy`` names a registered strategy (:mod:`fedlora_jax.strategies`; ``fixed`` runs the
    federation settings as given); the settings it pins must be left at their defaults or agree.
    ``strategy_options`` sets the strategy's own parameters (its dataclass fields), e.g.
    ``--set strategy_options.pilot_rounds=3`` for ``adaptive``.
    """

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: LoRAConfig = LoRAConfig(rank=8, alpha=16.0, targets=("query", "value"))
    client: ClientConfig = ClientConfig(local_steps=2, batch_size=4)
    client_optimizer: OptimizerConfig = OptimizerConfig("adamw", 1e-3)
    server_optimizer: OptimizerConfig = OptimizerConfig("sgd", 1.0)
    federation: FederationConfig = FederationConfig(rounds=20, participants=10.0, chunk_size=4,
                                                    sketch_ratio=0.5)
    system: SystemConfig = SystemConfig()
    bandwidth_allocation: str = "adaptive"
    strategy: str = "fixed"
    strategy_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_every: int = 10
    checkpoint_every: int = 10
    output_dir: str = "runs/latest"

    def __post_init__(self):
        from fedlora_jax import strategies  # strategies import the component configs

        reasons = strategies.contradictions(strategies.strategy_of(self), self)
        if reasons:
            raise ValueError(" ".join(reasons))
        if self.bandwidth_allocation not in ("adaptive", "equal"):
            raise ValueError(f"bandwidth_allocation must be 'adaptive' or 'equal', "
                             f"got {self.bandwidth_allocation!r}.")
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"eval_every must be a positive integer, got {self.eval_every!r}.")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0 (0: only at the end and "
                             f"on Ctrl-C), got {self.checkpoint_every!r}.")


def _closest(name: str, options, where: str = "") -> str:
    prefix = f"{where}." if where else ""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return (f" Did you mean {prefix + match[0]!r}?" if match else
            f" Valid keys: {sorted(prefix + o for o in options)}.")


def _coerce(value: Any, hint, where: str):
    """Converts a parsed value to the field's type, or raises naming the field."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(errors[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {value!r}.")
        return tuple(_coerce(v, typing.get_args(hint)[0], where) for v in value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a table of settings, got {value!r}.")
        return from_dict(hint, value, where)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise TypeError(f"{where} must be an integer, got {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where} must be an integer, got {value!r}.")
        return value
    if hint is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{where} must be a number, got {value!r}.") from None
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{where} must be a string, got {value!r}.")
        return value
    return value


def from_dict(cls, values: dict, where: str = ""):
    """Builds dataclass ``cls`` from a nested dict; defaults fill what is absent."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            name = f"{where}.{key}" if where else key
            raise ValueError(f"Unknown config key {name!r}.{_closest(key, fields, where)}")
    kwargs = {}
    defaults = cls()
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            current = dataclasses.asdict(getattr(defaults, key))
            value = {**current, **value}
        try:
            kwargs[key] = _coerce(value, hint, name)
        except TypeError as e:  # a user error like any other: ValueError, naming the field
            raise ValueError(str(e)) from None
    try:
        return dataclasses.replace(defaults, **kwargs)
    except (ValueError, TypeError) as e:  # the component's own check; name its section
        message = str(e)
        named = not where or message.startswith(where)
        raise ValueError(message if named else f"{where}: {message}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``federation.rounds=40`` -> (['federation', 'rounds'], 40); values parse as YAML scalars."""
    if "=" not in item:
        raise ValueError(f"--set {item!r} must look like section.key=value.")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw else ""


def load_config(path: str | None = None, overrides: list[str] = (), base: RunConfig | None = None,
                preset: str | None = None) -> RunConfig:
    """Layers ``base`` (default: :class:`RunConfig`), a named preset, a TOML/YAML/JSON file and
    ``--set`` overrides, in that order; validates everything before returning."""
    values: dict = dataclasses.asdict(base or RunConfig())
    if preset is not None:
        _merge(values, presets.values(preset))
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"Config file {file} does not exist.")
        text = file.read_text()
        loaded = (tomllib.loads(text) if file.suffix == ".toml" else
                  json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)) or {}
        _merge(values, loaded)
    for item in overrides:
        keys, value = parse_override(item)
        _merge(values, _nest(keys, value))
    if preset is not None and (missing := presets.missing(preset, values)):
        raise ValueError(f"Preset {preset!r} needs: " + "; ".join(missing) + ".")
    return from_dict(RunConfig, values)


def _nest(keys: list[str], value) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
