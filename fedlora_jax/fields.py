"""Typed settings from parsed files, and the one way to refuse a bad one.

Generic over any frozen dataclass and imports nothing of the project, so every module can use it:
:func:`from_dict` builds a dataclass from a nested dict (an unknown key names the closest valid
one, :func:`closest`; a value of the wrong type names the field and the type, :func:`coerce`), and
:func:`require` is the range check every config's ``__post_init__`` makes, with its one-line
message ``<field> must <rule>, got <value>[: <fix>].``
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import numpy as np


def require(ok: bool, field: str, value: Any, rule: str, fix: str = "") -> None:
    """Raises ``ValueError("<field> must <rule>, got <value!r>[: <fix>].")`` unless ``ok``.

    Args:
      ok: the check; anything ``bool`` accepts (a numpy array must be all true).
      field: the dotted setting, as the user writes it (``data.num_clients``).
      value: the value given.
      rule: what the value must be, after "must" (``"be a positive integer"``).
      fix: optionally, how to mend it (``"set data.validation_fraction in (0, 1)"``).
    """
    if not np.all(ok):
        raise ValueError(f"{field} must {rule}, got {value!r}" + (f": {fix}." if fix else "."))


def closest(name: str, options, where: str = "", listing: str = "") -> str:
    """`` Did you mean 'where.option'?`` for the option nearest ``name``, else the valid ones.

    With ``listing`` (``"strategies"``), the valid ones are named in every case, in their order:
    `` Did you mean 'fedit'? Valid strategies: fixed, fedit, ...``.
    """
    prefix = f"{where}." if where else ""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    hint = f" Did you mean {prefix + match[0]!r}?" if match else ""
    if listing:
        return f"{hint} Valid {listing}: {', '.join(prefix + o for o in options)}."
    return hint or f" Valid keys: {sorted(prefix + o for o in options)}."


def coerce(value: Any, hint, where: str):
    """Converts a parsed value to the field's type ``hint``, or raises TypeError naming the field
    ``where``. Strings become lists (comma-separated), integers, numbers and booleans as a
    ``--set`` or a YAML file gives them; a dict becomes a dataclass (:func:`from_dict`)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(errors[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {value!r}.")
        return tuple(coerce(v, typing.get_args(hint)[0], where) for v in value)
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
    """Builds dataclass ``cls`` from a nested dict; ``cls()``'s defaults fill what is absent.

    Every error is a one-line ValueError naming the dotted field (``where`` prefixes the names):
    an unknown key with the closest valid one, a wrong type, or the dataclass's own check."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            name = f"{where}.{key}" if where else key
            raise ValueError(f"Unknown config key {name!r}.{closest(key, fields, where)}")
    kwargs = {}
    defaults = cls()
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            current = dataclasses.asdict(getattr(defaults, key))
            value = {**current, **value}
        try:
            kwargs[key] = coerce(value, hint, name)
        except TypeError as e:  # a user error like any other: ValueError, naming the field
            raise ValueError(str(e)) from None
    try:
        return dataclasses.replace(defaults, **kwargs)
    except (ValueError, TypeError) as e:  # the component's own check; name its section
        message = str(e)
        named = not where or message.startswith(where)
        raise ValueError(message if named else f"{where}: {message}") from None
