"""The run configuration: frozen dataclasses, loaded from TOML/YAML plus ``--set`` overrides.

Each component keeps its own config beside its code (``LoRAConfig`` in :mod:`lora`, ...); this
module assembles them into :class:`RunConfig` and turns nested dicts into it, strictly
(:mod:`fedlora_jax.fields`): an unknown key names the closest valid one, a wrong type names the
field and the expected type, and each dataclass validates its own ranges in ``__post_init__``
(:func:`fedlora_jax.fields.require`). :func:`load_config` then resolves the strategy, once.
Nothing runs before the whole config validates.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import Any

import yaml

from fedlora_jax import presets, strategies
from fedlora_jax.client import ClientConfig
from fedlora_jax.engine import FederationConfig
from fedlora_jax.fields import from_dict, require
from fedlora_jax.lora import LoRAConfig
from fedlora_jax.optim import OptimizerConfig
from fedlora_jax.wireless import SystemConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``source``: ``minilm`` (the embedded all-MiniLM-L6-v2 checkpoint), ``tiny`` (the built-in
    random-init transformer) or the path of a local Hugging Face model directory. ``dtype``: the
    weights' storage (and so compute) dtype. ``compute_dtype``: ``bfloat16`` runs every dense
    layer's matmul (LoRA's included) in bfloat16 while the weights, the adapters and the
    optimizers' states stay float32 (:func:`fedlora_jax.lora.set_compute_dtype`)."""

    source: str = "minilm"
    dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        require(self.dtype in ("float32", "bfloat16"), "model.dtype", self.dtype,
                "be 'float32' or 'bfloat16'")
        require(self.compute_dtype in ("float32", "bfloat16"), "model.compute_dtype",
                self.compute_dtype, "be 'float32' or 'bfloat16'")
        require(self.compute_dtype == "float32" or self.dtype == "float32", "model.compute_dtype",
                self.compute_dtype, "keep float32 master weights: set model.dtype='float32' "
                "(model.dtype='bfloat16' already stores and computes in bfloat16)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``source``: ``builtin`` (Python's documentation, 7 chapters), ``synthetic`` or a local file
    (TSV/CSV/JSON/JSONL classification data). ``partition``: ``natural`` (by topic, builtin only),
    ``dirichlet`` (over labels, with ``alpha``) or ``iid``. ``synthetic_per_client``: examples
    per client of the synthetic data (before the held-out split). ``label_names``: the classes of
    a file in index order; a label equal to a name gets its index, an integer label is an index
    (needed when a file mixes text and integer labels, e.g. ``pos`` and ``1``).
    ``passage_chars``: the longest passage of the builtin data, in characters (shorter passages:
    more of them, each truncated less by ``max_length``). ``validation_fraction``: the share of
    the held-out examples set apart (seeded) as a validation split, for tuning; the rest is the
    test split. ``evaluate_on``: the split a run scores, ``test`` or ``validation``."""

    source: str = "builtin"
    num_clients: int = 10
    partition: str = "natural"
    alpha: float = 0.5
    max_length: int = 40
    heldout_fraction: float = 0.3
    passage_chars: int = 160
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    label_names: tuple[str, ...] = ()
    synthetic_per_client: int = 50
    validation_fraction: float = 0.0
    evaluate_on: str = "test"

    def __post_init__(self):
        require(self.partition in ("natural", "dirichlet", "iid"), "data.partition",
                self.partition, "be 'natural', 'dirichlet' or 'iid'")
        require(self.partition != "natural" or self.source == "builtin", "data.partition",
                self.partition, "be 'dirichlet' or 'iid' for your own file",
                "'natural' needs a data set with owners (builtin)")
        require(_is_int(self.num_clients, 1), "data.num_clients", self.num_clients,
                "be a positive integer")
        require(0 < self.heldout_fraction < 1, "data.heldout_fraction", self.heldout_fraction,
                "be in (0, 1)")
        require(0 <= self.validation_fraction < 1, "data.validation_fraction",
                self.validation_fraction, "be in [0, 1)")
        require(self.evaluate_on in ("test", "validation"), "data.evaluate_on", self.evaluate_on,
                "be 'test' or 'validation'")
        require(self.evaluate_on != "validation" or self.validation_fraction, "data.evaluate_on",
                self.evaluate_on, "be 'test' without a validation split",
                "set data.validation_fraction in (0, 1)")
        require(self.alpha > 0, "data.alpha", self.alpha, "be > 0")
        require(_is_int(self.max_length, 2), "data.max_length", self.max_length,
                "be an integer >= 2")
        require(_is_int(self.passage_chars, 20), "data.passage_chars", self.passage_chars,
                "be an integer >= 20")
        require(_is_int(self.synthetic_per_client, 1), "data.synthetic_per_client",
                self.synthetic_per_client, "be a positive integer")


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and value >= low


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
    server_optimizer: OptimizerConfig = OptimizerConfig("momentum", 0.5, momentum=0.5)
    federation: FederationConfig = FederationConfig(rounds=20, participants=5.0, chunk_size=5,
                                                    sketch_ratio=0.5)
    system: SystemConfig = SystemConfig()
    bandwidth_allocation: str = "adaptive"
    strategy: str = "adaptive"
    strategy_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_every: int = 10
    checkpoint_every: int = 10
    output_dir: str = "runs/latest"

    def __post_init__(self):
        if self.federation.participants > self.data.num_clients:
            raise ValueError(f"federation.participants={self.federation.participants:g} exceeds "
                             f"data.num_clients={self.data.num_clients}: at most every client "
                             "takes part in a round; lower participants or raise num_clients.")
        require(self.bandwidth_allocation in ("adaptive", "equal"), "bandwidth_allocation",
                self.bandwidth_allocation, "be 'adaptive' or 'equal'")
        require(_is_int(self.eval_every, 1), "eval_every", self.eval_every,
                "be a positive integer")
        require(_is_int(self.checkpoint_every, 0), "checkpoint_every", self.checkpoint_every,
                "be an integer >= 0 (0: only at the end and on Ctrl-C)")


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
    settings applied. The strategy is resolved here, once: a :class:`RunConfig` built otherwise
    is checked by :func:`fedlora_jax.train.train`."""
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
