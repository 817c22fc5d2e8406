"""Configs from outside the code: a TOML or JSON file, and ``--set dotted.key=value`` strings.

Both end in :meth:`Config.from_dict`, so a file and a ``--set`` are checked by the same
rules and their errors name the file or the key.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtl_jax.config import Config
from mtl_jax.errors import UserError
from mtl_jax.from_plain import parse_value


def load_config(path: str | Path) -> Config:
    """Read a ``.toml`` or ``.json`` config file; errors name the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read config file ({exc})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise UserError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a table of sections, got {type(data).__name__}")
    return Config.from_dict(data, source=str(path))


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Apply ``--set dotted.key=value`` strings; a task is addressed by name (tasks.genre.x)."""
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        value = parse_value(raw.strip())
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):  # the tasks list, addressed by task name
                match = [t for t in node if t.get("name") == part]
                if not match:
                    names = [t.get("name") for t in node]
                    raise UserError(f"--set {key}: no task named '{part}' (tasks: {names})")
                node = match[0]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise UserError(f"--set {key}: unknown key '{'.'.join(parts[: i + 1])}'")
        if not isinstance(node, dict) or parts[-1] not in node:
            raise UserError(f"--set {key}: unknown key '{key}'")
        node[parts[-1]] = value
    return Config.from_dict(data, source="--set")
