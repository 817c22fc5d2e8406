"""Rows to a tokenised :class:`Dataset`: every task's files, or rows held in memory.

Its one job is building the numpy-only dataset the batchers index into: each file read
once and tokenised once, a label id (or ``-1``) per task per row, and the source (file)
each row came from, which is the unit task mixing balances. A task with ``context`` reads
each row as its window of neighbours (:mod:`mtl_jax.data.context`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtl_jax.config import Config, TaskConfig
from mtl_jax.data.context import (
    ContextKey,
    context_key,
    fitted_windows,
    source_columns,
    source_values,
)
from mtl_jax.data.labels import encode_labels
from mtl_jax.data.readers import Row, file_key, parse_label, read_rows
from mtl_jax.encoder import Tokenized, tokenize
from mtl_jax.errors import UserError, where

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Tokenised rows with a label (or ``-1``) per task; numpy only, built once per split.

    ``source[i]`` indexes ``source_names``: the file (or in-memory origin) row ``i`` came
    from; a file that tasks read with different ``context`` is one source per context.
    Sources are the units that task mixing balances.
    """

    input_ids: list[np.ndarray]  # unpadded int32 ids, [CLS] ... [SEP]
    token_type_ids: list[np.ndarray]
    lengths: np.ndarray  # int32 [N]
    labels: np.ndarray  # int32 [N, n_tasks], -1 = no label for that task
    texts: tuple[str, ...]
    lines: np.ndarray  # int32 [N], line in the source file (row number for in-memory rows)
    source: np.ndarray  # int32 [N], index into source_names
    source_names: tuple[str, ...]
    task_names: tuple[str, ...]
    truncated: int = 0  # rows cut at model.max_length

    def __len__(self) -> int:
        return len(self.input_ids)

    def source_sizes(self) -> np.ndarray:
        """Rows per source, ``int [n_sources]``."""
        return np.bincount(self.source, minlength=len(self.source_names))


def build_dataset(
    tokenizer: Any,
    max_length: int,
    texts: Sequence[str],
    labels: np.ndarray,
    lines: np.ndarray,
    source: np.ndarray,
    source_names: Sequence[str],
    task_names: Sequence[str],
) -> Dataset:
    """Tokenise ``texts`` once and pack them with their labels and origins (the one place a
    :class:`Dataset` is assembled, so every builder agrees on dtypes and shapes)."""
    tok = tokenize(tokenizer, list(texts), max_length) if texts else Tokenized([], [], 0)
    return Dataset(
        input_ids=tok.input_ids,
        token_type_ids=tok.token_type_ids,
        lengths=tok.lengths if len(tok) else np.zeros(0, np.int32),
        labels=np.asarray(labels, np.int32).reshape(len(texts), len(task_names)),
        texts=tuple(texts),
        lines=np.asarray(lines, np.int32),
        source=np.asarray(source, np.int32),
        source_names=tuple(source_names),
        task_names=tuple(task_names),
        truncated=tok.truncated,
    )


def load_task_datasets(
    config: Config, tokenizer: Any, split: str = "train", skip_empty: bool = False
) -> Dataset:
    """Read and tokenise every task's file for ``split`` into one :class:`Dataset`.

    Each distinct file is read once and is one source (one per context when its tasks read
    different ones: :func:`context_parts`). When a task has its own file, its rows get
    ``-1`` for every other task; when several tasks name the same file, a row carries all
    their labels. Labels must be resolved first (``config.with_labels(labels_from_files(config))``), so
    the ids match the model's heads.

    Args:
      config: the run config (tasks with labels; ``model.max_length``).
      tokenizer: a Hugging Face fast tokenizer.
      split: ``"train"`` (``train_file``) or ``"dev"`` (``dev_file``).
      skip_empty: drop rows with empty text instead of raising.

    Returns:
      All rows of all sources. For ``"dev"`` tasks without a dev file are unlabelled; when
      no task has one, the dataset is empty.

    Raises:
      UserError: on any bad file, row, label or column (file, line and column named), a
        training task without a ``train_file``, or tasks sharing a file with different
        ``text_column``.
    """
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    unresolved = [t.name for t in config.tasks if not t.labels]
    if unresolved:
        raise ValueError(
            f"tasks {unresolved} have no labels; call config.with_labels(labels_from_files(config)) first"
        )
    task_names = config.task_names
    parts = []
    for path, text_column, tasks in _split_files(config, split):
        rows, block = _read_source(path, text_column, tasks, task_names, skip_empty)
        parts += context_parts(
            rows, block, tasks, task_names, path, tokenizer, config.model.max_length
        )
    dataset = build_dataset(tokenizer, config.model.max_length, *_joined(parts), task_names)
    if dataset.truncated:
        log.info(
            "%s split: %d of %d rows cut at model.max_length=%d",
            split,
            dataset.truncated,
            len(dataset),
            config.model.max_length,
        )
    return dataset


def _split_files(config: Config, split: str) -> list[tuple[str, str, list[TaskConfig]]]:
    """``(path as written, text column, tasks)`` per distinct file of ``split``."""
    files: dict[str, tuple[str, str, list[TaskConfig]]] = {}
    for task in config.tasks:
        path = task.train_file if split == "train" else task.dev_file
        if not path:
            if split == "train":
                raise UserError(
                    f"task '{task.name}' has no train_file; set tasks.{task.name}.train_file"
                )
            continue
        entry = files.setdefault(file_key(path), (path, task.text_column, []))
        if entry[1] != task.text_column:
            raise UserError(
                f"{path}: tasks share this file but name different text columns "
                f"('{entry[1]}' and '{task.text_column}'); give them the same text_column"
            )
        entry[2].append(task)
    return list(files.values())


def label_columns(tasks: Sequence[TaskConfig]) -> list[str]:
    """The label columns of ``tasks``, each once (tasks may share one)."""
    return list(dict.fromkeys(t.label_key for t in tasks))


def row_columns(tasks: Sequence[TaskConfig]) -> list[str]:
    """The columns the rows of ``tasks`` carry besides the text, each once: their labels,
    then the source columns their contexts read by."""
    return list(dict.fromkeys([*label_columns(tasks), *source_columns(tasks)]))


def _read_source(
    path: str,
    text_column: str,
    tasks: Sequence[TaskConfig],
    task_names: Sequence[str],
    skip_empty: bool,
) -> tuple[list[Row], np.ndarray]:
    """One file's rows and their label ids ``int32 [rows, n_tasks]`` (``-1``: other tasks);
    a source column that a task reads its neighbours by is read as a label column."""
    rows = read_rows(path, text_column, row_columns(tasks), skip_empty=skip_empty)
    block = np.full((len(rows), len(task_names)), -1, np.int32)
    for task in tasks:
        block[:, task_names.index(task.name)] = encode_labels(
            rows, task.labels, path, task.label_key
        )
    unlabelled = np.flatnonzero((block < 0).all(axis=1))
    if unlabelled.size:
        line = rows[unlabelled[0]].line
        raise UserError(
            f"{where(path, line)}: no label in column(s) "
            f"{', '.join(map(repr, label_columns(tasks)))} ({unlabelled.size} such row(s)); fill in the label or remove the row"
        )
    return rows, block


def context_parts(
    rows: Sequence[Row],
    block: np.ndarray,
    tasks: Sequence[TaskConfig],
    task_names: Sequence[str],
    path: str,
    tokenizer: Any,
    max_length: int,
) -> list[tuple[list[Row], np.ndarray, str]]:
    """A source's rows as each context its tasks read: ``(rows, label ids, source name)``.

    Tasks reading each row alone see the rows as they are; a task with ``context`` sees
    each row as its window (:func:`~mtl_jax.data.context.fitted_windows`, over all the
    source's rows, labelled or not). When tasks sharing a file read different contexts,
    each context is a source of its own holding the rows that carry its tasks' labels, so
    a row labelled for both is seen once per context.
    """
    groups: dict[ContextKey, list[int]] = {(0, ""): []} if not tasks else {}
    for task in tasks:
        groups.setdefault(context_key(task), []).append(task_names.index(task.name))
    parts = []
    for (context, column), ids in groups.items():
        part_rows = _windowed(rows, context, column, path, tokenizer, max_length)
        part_block = block
        name = str(path) if not context else f"{path} (context {context} by '{column}')"
        if len(groups) > 1:
            part_block = np.full_like(block, -1)
            part_block[:, ids] = block[:, ids]
            keep = np.flatnonzero((part_block >= 0).any(axis=1))
            part_rows, part_block = [part_rows[i] for i in keep], part_block[keep]
        parts.append((part_rows, part_block, name))
    return parts


def _windowed(
    rows: Sequence[Row], context: int, column: str, path: str, tokenizer: Any, max_length: int
) -> list[Row]:
    """The rows with each text replaced by its window (as they are for ``context == 0``)."""
    if not context:
        return list(rows)
    lines = [row.line for row in rows]
    sources = source_values(path, lines, [row.labels.get(column) for row in rows], column)
    texts = [row.text for row in rows]
    texts = fitted_windows(tokenizer, max_length, texts, sources, context)
    return [row._replace(text=text) for row, text in zip(rows, texts, strict=True)]


def _joined(parts: Sequence[tuple[list[Row], np.ndarray, str]]) -> tuple:
    """:func:`build_dataset`'s ``texts, labels, lines, source, source_names`` from parts
    (one source each)."""
    rows = [row for part_rows, _, _ in parts for row in part_rows]
    source = [s for s, (part_rows, _, _) in enumerate(parts) for _ in part_rows]
    labels = np.concatenate([block for _, block, _ in parts]) if parts else np.zeros(0)
    names = [name for _, _, name in parts]
    return [r.text for r in rows], labels, [r.line for r in rows], source, names


def dataset_from_rows(
    rows: Sequence[Mapping[str, Any]], config: Config, tokenizer: Any, source: str = "rows"
) -> Dataset:
    """A :class:`Dataset` from in-memory rows, e.g. :func:`mtl_jax.synthetic.make_rows`.

    Each row is a mapping with the tasks' text column and label columns (a missing or
    ``None`` label is ``-1``). One source; row ``i`` is reported as ``source:i+1``.

    Raises:
      UserError: on a missing or empty text or an unknown label, naming the row.
    """
    unresolved = [t.name for t in config.tasks if not t.labels]
    if unresolved:
        raise ValueError(
            f"tasks {unresolved} have no labels; set them or resolve them from the train files first"
        )
    text_column = config.tasks[0].text_column if config.tasks else "text"
    columns = row_columns(config.tasks)
    parsed = []
    for i, row in enumerate(rows, start=1):
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where(source, i, text_column)}: missing or empty text")
        values = {c: parse_label(Path(source), i, c, row.get(c)) for c in columns}
        parsed.append(Row(i, text, values))
    block = np.full((len(parsed), len(config.tasks)), -1, np.int32)
    for k, task in enumerate(config.tasks):
        block[:, k] = encode_labels(parsed, task.labels, source, task.label_key)
    parts = context_parts(
        parsed, block, config.tasks, config.task_names, source, tokenizer, config.model.max_length
    )
    return build_dataset(tokenizer, config.model.max_length, *_joined(parts), config.task_names)
