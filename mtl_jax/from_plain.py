"""Frozen dataclasses from plain JSON/TOML data, naming the exact key on any mismatch.

Config files, ``--set`` overrides and a run directory's ``config.json`` all arrive as plain
dicts, lists and scalars. :func:`build` turns them into typed dataclasses field by field so
an error names the key (``tasks.genre.dropout``), the type it expects and the source file;
a general-purpose validation library would report list indices and its own type names
instead. :func:`to_plain` goes the other way, and :func:`to_toml` writes it as TOML.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from collections.abc import Mapping
from typing import Any

import tomli_w

from mtl_jax.errors import UserError

_SCALAR_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def build(cls: type, data: Any, prefix: str = "", source: str = "config") -> Any:
    """Dataclass ``cls`` from the mapping ``data``; unknown, missing or mistyped keys raise.

    Args:
        cls: a dataclass whose fields are bool, int, float, str, tuples of those, nested
            dataclasses, or tuples of dataclasses (a ``[[name]]`` array of tables, whose
            entries are named in errors by their ``name`` key).
        data: the plain data.
        prefix: the dotted key of ``data`` (``"train."``), for messages.
        source: where the data came from (a file name, ``--set``), for messages.
    """
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(
            f"{source}: unknown config key '{prefix}{unknown[0]}' "
            f"(known keys here: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in data.items():
        key, hint = f"{prefix}{name}", hints[name]
        (item_type, *_) = typing.get_args(hint) or (None,)
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value, f"{key}.", source)
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(item_type):
            if not isinstance(value, list):
                raise UserError(f"{source}: '{key}' must be a list of [[{key}]] tables")
            kwargs[name] = tuple(
                build(item_type, item, f"{key}.{_label(item, i)}.", source)
                for i, item in enumerate(value)
            )
        else:
            kwargs[name] = _coerce(value, hint, key, source)
    missing = [n for n, f in fields.items() if n not in kwargs and _is_required(f)]
    if missing:
        raise UserError(f"{source}: missing config key '{prefix}{missing[0]}'")
    return cls(**kwargs)


def to_plain(value: Any) -> Any:
    """Tuples as lists, recursively: what JSON and TOML writers take."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def to_toml(data: Mapping[str, Any]) -> str:
    """``[section]`` tables and ``[[name]]`` arrays of tables, each list on one line.

    ``tomli_w`` writes every value, so strings are escaped exactly as TOML needs (a JSON
    writer would emit surrogate pairs for non-BMP characters, which TOML rejects); the
    layout is ours because ``tomli_w`` puts each list item on its own line, which makes a
    printed config several times longer.
    """
    lines: list[str] = []
    for name, body in data.items():  # tables first: TOML gives later keys to a [[table]]
        if isinstance(body, Mapping):
            lines += _toml_table(f"[{name}]", body)
    for name, body in data.items():
        if isinstance(body, list):
            for item in body:
                lines += _toml_table(f"[[{name}]]", item)
    return "\n".join(lines)


def _toml_table(header: str, body: Mapping[str, Any]) -> list[str]:
    return [header, *(f"{key} = {_toml_value(value)}" for key, value in body.items()), ""]


def _toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


def parse_value(raw: str) -> Any:
    """A ``--set`` value: a JSON or TOML literal when it parses as one, else the bare string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _label(item: Any, index: int) -> Any:
    return item.get("name", index) if isinstance(item, Mapping) else index


def _is_required(field: dataclasses.Field) -> bool:
    no_default = field.default is dataclasses.MISSING
    return no_default and field.default_factory is dataclasses.MISSING


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """``value`` as the field type ``hint`` (lists become tuples, ints floats), else raise."""
    if typing.get_origin(hint) is tuple:
        if isinstance(value, (list, tuple)):
            (item_type, _) = typing.get_args(hint)
            return tuple(_coerce(v, item_type, key, source) for v in value)
    elif isinstance(value, _SCALAR_TYPES.get(hint, ())) and (
        hint is bool or not isinstance(value, bool)  # True is an int to Python, not to TOML
    ):
        return float(value) if hint is float else value
    raise UserError(f"{source}: config key '{key}' expects {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )
