"""The run configuration: frozen dataclasses, loaded from TOML/YAML plus ``--set`` overrides.

Each component keeps its own config beside its code (``LoRAConfig`` in :mod:`lora`, ...); this
module assembles them into :class:`RunConfig` and turns nested dicts into it, strictly: an unknown
key names the closest valid one, a wrong type names the field and the expected type, and each
dataclass validates its own ranges in ``__post_init__``. Nothing runs before the whole config
validates.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
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
    per client of the synthetic data (before the held-out split). ``label_names``: the classes of
    a file in index order; a label equal to a name gets its index, an integer label is an index
    (needed when a file mixes text and integer labels, e.g. ``pos`` and ``1``).
    ``validation_fraction``: the share of the held-out examples set apart (seeded) as a validation
    split, for tuning; the rest is the test split. ``evaluate_on``: the split a run scores, ``test``
    or ``validation``."""

    source: str = "builtin"
    num_clients: int = 50
    partition: str = "natural"
    alpha: float = 0.5
    max_length: int = 64
    heldout_fraction: float = 0.2
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    label_names: tuple[str, ...] = ()
    synthetic_per_client: int = 50
    validation_fraction: float = 0.0
    evaluate_on: str = "test"

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
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got "
                             f"{self.validation_fraction!r}.")
        if self.evaluate_on not in ("test", "validation"):
            raise ValueError(f"data.evaluate_on must be 'test' or 'validation', "
                             f"got {self.evaluate_on!r}.")
        if self.evaluate_on == "validation" and not self.validation_fraction:
            raise ValueError("data.evaluate_on='validation' needs a validation split: set "
                             "data.validation_fraction in (0, 1).")
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
    client_optimizer: OptimizerConfig = OptimizerConfig("adamw", 5e-3)
    server_optimizer: OptimizerConfig = OptimizerConfig("sgd", 1.0)
    federation: FederationConfig = FederationConfig(rounds=20, participants=10.0, chunk_size=4,
                                                    sketch_ratio=0.5)
    system: SystemConfig = SystemConfig()
    bandwidth_allocation: str = "adaptive"
    strategy: str = "adaptive"
    strategy_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_every: int = 5
    checkpoint_every: int = 10
    output_dir: str = "runs/latest"

    def __post_init__(self):
        from fedlora_jax import strategies  # strategies import the component configs

        strategies.strategy_of(self)  # the strategy exists and its options are valid
        if self.federation.participants > self.data.num_clients:
            raise ValueError(f"federation.participants={self.federation.participants:g} exceeds "
                             f"data.num_clients={self.data.num_clients}: at most every client "
                             "takes part in a round; lower participants or raise num_clients.")
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
    ``--set`` overrides, in that order; validates everything, refuses settings of the file and
    overrides that contradict the strategy, and returns the config with the strategy's pinned
    settings applied."""
    from fedlora_jax import strategies  # strategies import the component configs

    before = baseline(base, preset)
    values = copy.deepcopy(before)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"Config file {file} does not exist.")
        loaded = _read_settings(file)
        if not isinstance(loaded, dict):
            raise ValueError(f"Config file {file} must hold a table of settings (section: "
                             f"key: value), got {type(loaded).__name__}.")
        _merge(values, loaded)
    for item in overrides:
        keys, value = parse_override(item)
        _merge(values, _nest(keys, value))
    if preset is not None and (missing := presets.missing(preset, values)):
        raise ValueError(f"Preset {preset!r} needs: " + "; ".join(missing) + ".")
    _resolve_files(values, before)
    cfg = from_dict(RunConfig, values)
    strategy = strategies.strategy_of(cfg)
    if reasons := strategies.contradictions(strategy, cfg, before):
        raise ValueError(" ".join(reasons))
    return strategies.configure(cfg, strategy)


def _resolve_files(values: dict, before: dict) -> None:
    """Model and data files as absolute paths (a run resumes from any directory); a data file
    whose partition was left at ``natural`` (owners exist only in the built-in data) is split
    ``iid``."""
    for section, builtin in (("model", ("minilm", "tiny")), ("data", ("builtin", "synthetic"))):
        settings = values.get(section)
        source = settings.get("source") if isinstance(settings, dict) else None
        if not isinstance(source, str) or source in builtin:
            continue
        if os.path.exists(source):
            settings["source"] = os.path.abspath(source)
        if section == "data" and settings.get("partition") == before["data"]["partition"] == "natural":
            settings["partition"] = "iid"


def baseline(base: RunConfig | None = None, preset: str | None = None) -> dict:
    """The settings before the user's own layers (file, options, ``--set``): ``base`` (default:
    :class:`RunConfig`'s defaults) with a named preset over it, as a :func:`to_dict` tree."""
    values = json.loads(json.dumps(dataclasses.asdict(base or RunConfig())))
    if preset is not None:
        _merge(values, presets.values(preset))
    return values


def _read_settings(file: Path):
    """A TOML, JSON or YAML file's settings; a syntax error names the file, line and column."""
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".toml":
            return tomllib.loads(text) or {}
        if file.suffix == ".json":
            return json.loads(text) or {}
        return yaml.safe_load(text) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"Config file {file} is not UTF-8 text (byte {e.start}); save it as "
                         "UTF-8.") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"Config file {file}: invalid TOML: {e}; fix the syntax there.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"Config file {file}, line {e.lineno}, column {e.colno}: invalid JSON "
                         f"({e.msg}); fix the syntax there.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"Config file {file}{where}: invalid YAML ({problem}); fix the syntax "
                         "there (indentation, 'key: value').") from None


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


# Settings a resumed run may change: they alter neither a saved array's shape nor what the earlier
# rounds were (the run's identity); every other setting must equal the checkpoint's.
RESUMABLE = ("federation.rounds", "client_optimizer.learning_rate",
             "server_optimizer.learning_rate", "eval_every", "checkpoint_every",
             "federation.chunk_size", "federation.block_size", "federation.devices")


def differences(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted setting -> ``(old, new)`` for every leaf setting that differs between two
    :func:`to_dict` trees (lists and tuples compare equal element-wise)."""
    changed = {}
    for key in dict.fromkeys([*old, *new]):
        a, b, name = old.get(key), new.get(key), prefix + key
        if isinstance(a, dict) and isinstance(b, dict) and name != "strategy_options":
            changed.update(differences(a, b, name + "."))
        elif _plain(a) != _plain(b):
            changed[name] = (_plain(a), _plain(b))
    return changed


def _plain(value):
    return json.loads(json.dumps(value))  # tuples as lists, as config.json holds them
