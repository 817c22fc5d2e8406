"""A row read with its neighbours: the text a task with ``context > 0`` sees.

One Brown sentence carries little genre signal ("He nodded."), while the passage around it
does (docs/model_quality.md, round 11). A task's ``context`` joins each row with up to that
many rows before and after it *from the same source text* (the task's ``source_column``;
empty: the whole file is one text), in file order. The label and the row's place stay its
own, so each row is still scored once. Only the text is read, never a label: a dev row's
window holds the dev book's neighbouring sentences, which any reader of that book has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtl_jax.errors import UserError, where

ContextKey = tuple[int, str]  # (neighbours per side, source column); (0, "") = the row alone


def windows(texts: Sequence[str], sources: Sequence[str], context: int) -> list[str]:
    """Each text joined (by a space) with up to ``context`` neighbours on each side that
    share its source.

    A source's rows need not be contiguous: a row's neighbours are its source's rows
    before and after it, in order.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if len(texts) != len(sources):
        raise ValueError(f"{len(texts)} texts but {len(sources)} sources")
    if context == 0:
        return list(texts)
    by_source: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        by_source.setdefault(source, []).append(i)
    joined = [""] * len(texts)
    for members in by_source.values():
        for k, i in enumerate(members):
            around = members[max(0, k - context) : k + context + 1]
            joined[i] = " ".join(texts[j] for j in around)
    return joined


def context_key(task: Any) -> ContextKey:
    """What a task reads besides its row; tasks with equal keys read the same texts."""
    return (task.context, task.source_column) if task.context else (0, "")


def source_values(
    path: str, lines: Sequence[int], values: Sequence[str | None], column: str
) -> list[str]:
    """The rows' source texts from ``column`` (``""`` everywhere when ``column`` is empty:
    the whole file is one text).

    Raises:
      UserError: a row without a source, naming its line and the column.
    """
    if not column:
        return [""] * len(lines)
    for line, value in zip(lines, values, strict=True):
        if value is None:
            raise UserError(
                f"{where(path, line, column)}: no source text: a task reading its rows with "
                f"their neighbours needs every row's '{column}' (fill it in, or set the "
                "task's source_column to '' to read the whole file as one text)"
            )
    return [str(v) for v in values]
