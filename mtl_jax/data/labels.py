"""Label names to ids: inferring a task's label set, encoding rows, balanced class weights.

A name's id is its position in the task's label tuple, so the order (sorted when inferred)
is what train and dev files and a restored checkpoint must agree on. The data-returning
functions (:func:`labels_from_files`, :func:`class_weights_from`) hand back plain values
for the caller to put into its config (``Config.with_labels``,
:func:`mtl_jax.run_setup.with_class_weights`): data never hands configs back up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from mtl_jax.config import Config
from mtl_jax.data.readers import Row, file_key, read_rows, same_file
from mtl_jax.errors import UserError, where


class Labelled(Protocol):
    """What class weights need of a dataset: its ``int32 [N, n_tasks]`` label ids."""

    labels: np.ndarray


def infer_labels(values: Iterable[str | None]) -> tuple[str, ...]:
    """Sorted distinct label names (``None`` = unlabelled, ignored).

    Sorting makes the id of each name independent of row order, so train and dev files and
    a restored checkpoint agree on the mapping.
    """
    return tuple(sorted({v for v in values if v is not None}))


def encode_labels(
    rows: Sequence[Row], labels: Sequence[str], path: str | Path, column: str
) -> np.ndarray:
    """Label ids ``int32 [len(rows)]`` for ``column``, ``-1`` where a row has no label.

    Args:
      rows: rows from :func:`read_rows` (or built in memory with :class:`Row`).
      labels: the task's label names; a name's id is its position.
      path: the rows' source, for error messages.
      column: the label column to encode.

    Raises:
      UserError: naming file, line and column on a name not in ``labels`` (e.g. a dev
        label never seen in the training file).
    """
    ids = {name: i for i, name in enumerate(labels)}
    out = np.full(len(rows), -1, dtype=np.int32)
    for i, row in enumerate(rows):
        value = row.labels.get(column)
        if value is None:
            continue
        if value not in ids:
            raise UserError(
                f"{where(path, row.line, column)}: unknown label {value!r}; the task's labels "
                f"are {', '.join(map(repr, labels))}. Fix the row, or list the label in the "
                "task's labels in the config (a dev label must also occur in training)"
            )
        out[i] = ids[value]
    return out


def labels_from_files(config: Config, skip_empty: bool = False) -> dict[str, tuple[str, ...]]:
    """The label names of every task: the config's own, else inferred from its train file.

    Labels given in the config are kept as they are (their order fixes the ids); a task
    without them gets the sorted names found in its training file. A file shared by
    several tasks is read once.

    Args:
      config: the run config.
      skip_empty: drop rows with empty text instead of raising while reading.

    Returns:
      ``{task name: label names}`` for every task, in config order.

    Raises:
      UserError: a task without labels has no ``train_file`` or fewer than two labels.
    """
    found: dict[str, tuple[str, ...]] = {}
    cache: dict[tuple[str, str], list[Row]] = {}
    for task in config.tasks:
        if task.labels:
            found[task.name] = tuple(task.labels)
            continue
        if not task.train_file:
            raise UserError(
                f"task '{task.name}': no labels in the config and no train_file to infer them "
                f"from; set tasks.{task.name}.labels or tasks.{task.name}.train_file"
            )
        key = (file_key(task.train_file), task.text_column)
        if key not in cache:
            columns = [t.label_key for t in config.tasks if same_file(t.train_file, key[0])]
            cache[key] = read_rows(
                task.train_file,
                task.text_column,
                list(dict.fromkeys(columns)),
                skip_empty=skip_empty,
            )
        labels = infer_labels(row.labels.get(task.label_key) for row in cache[key])
        if len(labels) < 2:
            raise UserError(
                f"{where(task.train_file, None, task.label_key)}: found {len(labels)} distinct "
                f"label(s) {list(labels)}; a classifier needs at least two"
            )
        found[task.name] = labels
    return found


def class_weights_from(config: Config, train: Labelled) -> dict[str, tuple[float, ...] | None]:
    """The class weights each task trains with, ``None`` for an unweighted task.

    A ``class_weighting = "balanced"`` task without weights gets sklearn's
    ``n / (K * n_c)`` over its labelled training rows (rounded to 6 digits), so every
    class contributes equally to the loss in expectation; a class with no training row
    gets 0. Weights already in the config (explicit, or a restored run's) are kept.

    Args:
      config: the run config, labels resolved (task ``i`` is column ``i`` of the labels).
      train: the training data (a :class:`~mtl_jax.data.dataset.Dataset`).

    Returns:
      ``{task name: weights per label, or None}`` for every task, in config order.
    """
    weights: dict[str, tuple[float, ...] | None] = {}
    for i, task in enumerate(config.tasks):
        if task.class_weights:
            weights[task.name] = tuple(task.class_weights)
        elif task.class_weighting == "balanced":
            labels = train.labels[:, i]
            counts = np.bincount(labels[labels >= 0], minlength=task.num_labels)
            n, k = counts.sum(), task.num_labels
            weights[task.name] = tuple(
                round(float(n / (k * c)), 6) if c > 0 else 0.0 for c in counts[:k]
            )
        else:
            weights[task.name] = None
    return weights
