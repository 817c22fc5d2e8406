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

from mtl_jax.encoder import tokenize
from mtl_jax.errors import UserError, where

ContextKey = tuple[int, str]  # (neighbours per side, source column); (0, "") = the row alone


def windows(
    texts: Sequence[str],
    sources: Sequence[str],
    context: int,
    lengths: Sequence[int] | None = None,
    budget: int | None = None,
) -> list[str]:
    """Each text joined (by a space) with up to ``context`` neighbours on each side that
    share its source.

    A source's rows need not be contiguous: a row's neighbours are its source's rows
    before and after it, in order. With ``lengths`` (tokens per text) and a ``budget``,
    neighbours join nearest first, the one before then the one after, only while the
    window fits: a window is whole sentences and always holds its own row, which a cut
    at the model's length would lose whenever the sentences before it are long.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if len(texts) != len(sources):
        raise ValueError(f"{len(texts)} texts but {len(sources)} sources")
    if context == 0:
        return list(texts)
    sizes = [0] * len(texts) if lengths is None else list(lengths)
    room = float("inf") if budget is None else budget
    by_source: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        by_source.setdefault(source, []).append(i)
    joined = [""] * len(texts)
    for members in by_source.values():
        for k, i in enumerate(members):
            first, last, used = k, k, sizes[i]
            for _ in range(context):
                if first > 0 and used + sizes[members[first - 1]] <= room:
                    first, used = first - 1, used + sizes[members[first - 1]]
                if last + 1 < len(members) and used + sizes[members[last + 1]] <= room:
                    last, used = last + 1, used + sizes[members[last + 1]]
            joined[i] = " ".join(texts[j] for j in members[first : last + 1])
    return joined


def fitted_windows(
    tokenizer: Any, max_length: int, texts: Sequence[str], sources: Sequence[str], context: int
) -> list[str]:
    """:func:`windows` that fit ``max_length`` tokens with ``[CLS]`` and ``[SEP]``
    (WordPiece splits at spaces, so a window's tokens are its sentences' tokens)."""
    if context == 0:
        return list(texts)
    lengths = tokenize(tokenizer, list(texts), max_length).lengths - 2
    return windows(texts, sources, context, lengths.tolist(), max_length - 2)


def context_key(task: Any) -> ContextKey:
    """What a task reads besides its row; tasks with equal keys read the same texts."""
    return (task.context, task.source_column) if task.context else (0, "")


def source_columns(tasks: Sequence[Any]) -> dict[str, str]:
    """``{source column: a task reading by it}`` over the tasks with ``context``: the
    columns a file must have beside the text and labels."""
    return {column: t.name for t in tasks if (column := context_key(t)[1])}


def source_values(
    path: str,
    lines: Sequence[int],
    values: Sequence[str | None],
    column: str,
    fix: str = 'or set source_column = "" to read the whole file as one text',
) -> list[str]:
    """The rows' source texts from ``column`` (``""`` everywhere when ``column`` is empty:
    the whole file is one text).

    Raises:
      UserError: a row without a source, naming its line, the column and ``fix``.
    """
    if not column:
        return [""] * len(lines)
    for line, value in zip(lines, values, strict=True):
        if value is None:
            raise UserError(
                f"{where(path, line, column)}: no source text; rows are read with their "
                f"neighbours from the same '{column}' (this one as a neighbour too), so "
                f"every row needs one: fill it in, {fix}"
            )
    return [str(v) for v in values]
