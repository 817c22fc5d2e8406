"""Data layer of the fit loop: readers, label maps, datasets, length buckets, task mixing.

Pipeline: ``read_rows`` (file -> rows, every bad input a :class:`UserError` naming file,
line and column) -> ``resolve_labels`` / ``encode_labels`` (names -> ids) -> a
:class:`Dataset` (tokenised once, numpy only) -> ``epoch_batches`` (row indices per batch,
a pure function of seed and epoch) -> ``make_batch`` (fixed-shape padded numpy dicts) ->
``BatchStream`` (resumable iterator) -> ``prefetch`` (background thread).

Why a pure index-based design rather than ``grain``:

* The data is small and in memory. Sentence corpora of 10^4-10^6 rows are tokenised once
  (the Rust tokenizer takes about a second for 20k sentences) and a batch is built by
  copying a few dozen int32 rows into a padded array, which takes microseconds. grain's
  strengths (multi-process workers for heavy per-record transforms, sharded file sources)
  buy nothing here, and a background thread (:func:`prefetch`) hides the copy.
* The order of an epoch is a pure function ``epoch_batches(dataset, config, epoch)`` of
  ``(train.seed, epoch)`` alone. Resuming needs only ``{"epoch": e, "batch": b}``, a
  two-integer JSON dict stored beside the Orbax checkpoint, instead of grain's opaque
  iterator state. Every epoch has the same number of steps, so the state is also
  ``divmod(global_step, steps_per_epoch)`` (:func:`stream_state`), which stays correct
  when batches are prefetched ahead of the step that consumes them.
* The parts this library needs (length grouping in shuffled windows, buckets capped at
  ``max_length``, three task-mixing rules, dummy rows keeping the batch shape fixed) would
  be custom grain transformations anyway; as plain numpy they are easy to test.

Conventions: rows are numbered by the line they start on in their file (header = line 1).
A missing label is ``-1`` everywhere (a row from another task's file, an empty label cell,
a padding row); losses and metrics must mask it. Padding rows have ``index == -1`` and an
all-zero attention mask.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mtl_jax.config import Config
from mtl_jax.encoder import Tokenized, tokenize
from mtl_jax.errors import UserError, where

log = logging.getLogger(__name__)

FORMATS = (".tsv", ".csv", ".jsonl", ".txt")
_DELIMITERS = {".tsv": "\t", ".csv": ","}
_DELIMITER_NAMES = {"\t": "tabs", ",": "commas", ";": "semicolons", "|": "pipes"}
# Stream tags keep the random streams of different purposes independent for one seed.
_TAG_EPOCH = 1
_TAG_CYCLE = 2


# -- readers -------------------------------------------------------------------------------


class Row(NamedTuple):
    """One input row: the line it starts on, its text, and raw label names by column."""

    line: int
    text: str
    labels: dict[str, str | None]  # None: no label in this row for that column


def read_rows(
    path: str | Path,
    text_column: str = "text",
    label_columns: Sequence[str] = (),
    *,
    skip_empty: bool = False,
) -> list[Row]:
    """Read a ``.tsv``, ``.csv``, ``.jsonl`` or ``.txt`` file into rows.

    TSV/CSV have a header row and use Python's ``csv`` quoting (a field holding a tab,
    comma, quote or newline is double-quoted). JSONL holds one object per line. A ``.txt``
    file has one sentence per line and no header, so it cannot carry labels (inference).

    An empty or whitespace-only text is an error by default: in a training file it almost
    always means a broken export, and silently dropping rows shifts every later line.
    ``skip_empty=True`` drops such rows instead and logs how many (and which lines).
    Blank lines at the very end of a file are ignored. An empty label cell (or a JSON
    ``null``/missing key) means "no label for this column" and is read as ``None``.

    Args:
      path: the file; its suffix picks the format.
      text_column: column (or JSON key) holding the sentence; unused for ``.txt``.
      label_columns: columns (or keys) holding label names.
      skip_empty: drop rows whose text is empty instead of raising.

    Returns:
      The rows in file order.

    Raises:
      UserError: naming the file, line and column, and what would fix it.
    """
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in FORMATS:
        raise UserError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(FORMATS)}"
        )
    label_columns = tuple(label_columns)
    if kind == ".txt" and label_columns:
        raise UserError(
            f"{path}: a .txt file holds one sentence per line and no labels "
            f"(columns {list(label_columns)} wanted); use a .tsv, .csv or .jsonl file"
        )
    body = _decode(path, _read_bytes(path))
    body = body.rstrip("\r\n")  # trailing blank lines are an export artefact, not rows
    if not body.strip():
        raise UserError(f"{path}: file is empty; {_expected_layout(kind, text_column)}")
    if kind == ".txt":
        rows = [Row(i, line.rstrip("\r"), {}) for i, line in enumerate(body.split("\n"), start=1)]
    elif kind == ".jsonl":
        rows = _parse_jsonl(path, body, text_column, label_columns)
    else:
        rows = _parse_delimited(path, body, _DELIMITERS[kind], text_column, label_columns)
    return _check_texts(path, rows, text_column if kind != ".txt" else None, skip_empty)


def _expected_layout(kind: str, text_column: str) -> str:
    if kind == ".txt":
        return "expected one sentence per line"
    if kind == ".jsonl":
        return f'expected one JSON object per line, e.g. {{"{text_column}": "..."}}'
    return f"expected a header row naming the columns (e.g. '{text_column}'), then one row per line"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (check the path in the task config)") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a data file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a leading BOM dropped); binary and mis-encoded files name the line."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: file is UTF-16 encoded; save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise UserError(
            f"{where(path, line)}: NUL byte found; this looks like a binary file "
            "(a spreadsheet or archive?), not UTF-8 text; export it as .tsv/.csv/.jsonl"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # utf-8-sig reports offsets after the BOM it strips.
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line_start = data.rfind(b"\n", 0, offset) + 1
        line = data.count(b"\n", 0, offset) + 1
        raise UserError(
            f"{where(path, line)}: invalid UTF-8 (byte {data[offset]:#04x} at character "
            f"{offset - line_start + 1} of the line); save the file as UTF-8"
        ) from None


def _raise_field_limit(size: int) -> None:
    """Let one csv field be as large as the whole file (the default caps fields at 128 KiB)."""
    wanted = min(max(size + 1, csv.field_size_limit()), 2**31 - 1, sys.maxsize)
    if wanted > csv.field_size_limit():
        csv.field_size_limit(wanted)


def _parse_delimited(
    path: Path, body: str, delimiter: str, text_column: str, label_columns: tuple[str, ...]
) -> list[Row]:
    _raise_field_limit(len(body))
    reader = csv.reader(io.StringIO(body, newline=""), delimiter=delimiter)
    try:
        header = [name.strip() for name in next(reader)]
    except csv.Error as exc:
        raise UserError(f"{where(path, 1)}: cannot parse the header row ({exc})") from None
    wanted = [text_column, *label_columns]
    missing = [c for c in wanted if c not in header]
    if missing:
        hint = _delimiter_hint(header, delimiter, path.suffix)
        if hint:
            raise UserError(f"{where(path, 1)}: {hint}")
        raise UserError(
            f"{where(path, 1, missing[0])}: no column '{missing[0]}' in the header; the "
            f"columns are {', '.join(repr(h) for h in header)}. Set the task's text_column / "
            "label_column to one of these, or fix the header"
        )
    for name in wanted:
        if header.count(name) > 1:
            raise UserError(f"{where(path, 1, name)}: column '{name}' appears twice in the header")
    text_at = header.index(text_column)
    label_at = {c: header.index(c) for c in label_columns}
    n = len(header)
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise UserError(
                f"{where(path, start)}: cannot parse ({exc}); check the quoting of this row"
            ) from None
        if not fields:  # a blank line
            rows.append(Row(start, "", dict.fromkeys(label_columns)))
            continue
        if len(fields) != n:
            raise UserError(
                f"{where(path, start)}: {len(fields)} field(s) but the header has {n} "
                f"({', '.join(header)}); "
                + _field_count_hint(fields, n, delimiter, start, reader.line_num)
            )
        labels = {c: (fields[i].strip() or None) for c, i in label_at.items()}
        rows.append(Row(start, fields[text_at], labels))
    if not rows:
        raise UserError(
            f"{path}: has a header row but no data rows; add one row per sentence below it"
        )
    return rows


def _delimiter_hint(header: list[str], delimiter: str, suffix: str) -> str:
    """A message when a one-field header splits on some other delimiter, else ''."""
    if len(header) != 1:
        return ""
    for other, name in _DELIMITER_NAMES.items():
        if other != delimiter and other in header[0]:
            ours = _DELIMITER_NAMES[delimiter]
            rename = {",": " rename it to .csv or", "\t": " rename it to .tsv or"}.get(other, "")
            return (
                f"the header {header[0]!r} is separated by {name}, but a {suffix} file must "
                f"use {ours}:{rename} re-save it with {ours}"
            )
    return ""


def _field_count_hint(fields: list[str], n: int, delimiter: str, start: int, end: int) -> str:
    if end > start and any("\n" in f for f in fields):
        return (
            f"a double quote opened on line {start} runs to line {end}: close it, or "
            'write a literal quote inside a quoted field as ""'
        )
    if len(fields) > n:
        return (
            f"is there a {'tab' if delimiter == chr(9) else 'comma'} inside the text? "
            'Put such a field in double quotes ("...")'
        )
    others = [name for d, name in _DELIMITER_NAMES.items() if d != delimiter and d in fields[0]]
    if len(fields) == 1 and others:
        return (
            f"this line has no {_DELIMITER_NAMES[delimiter]} but has {others[0]}: wrong delimiter?"
        )
    return "is a field missing (an empty label still needs its delimiter)?"


def _parse_jsonl(
    path: Path, body: str, text_column: str, label_columns: tuple[str, ...]
) -> list[Row]:
    rows = []
    seen = dict.fromkeys(label_columns, False)
    for number, line in enumerate(body.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            rows.append(Row(number, "", dict.fromkeys(label_columns)))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{where(path, number)}: not valid JSON ({exc.msg} at character {exc.colno}); "
                "each line must be one complete JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise UserError(
                f"{where(path, number)}: expected a JSON object {{...}}, got "
                f"{type(obj).__name__}; each line must be one object"
            )
        if text_column not in obj:
            raise UserError(
                f"{where(path, number, text_column)}: no key '{text_column}' in this object "
                f"(keys: {', '.join(map(repr, obj)) or 'none'}); set the task's text_column"
            )
        text = obj[text_column]
        if not isinstance(text, str):
            raise UserError(
                f"{where(path, number, text_column)}: the text must be a string, got "
                f"{type(text).__name__}"
            )
        labels = {}
        for column in label_columns:
            value = obj.get(column)
            seen[column] = seen[column] or column in obj
            labels[column] = _json_label(path, number, column, value)
        rows.append(Row(number, text, labels))
    for column, found in seen.items():
        if not found:
            raise UserError(
                f"{where(path, None, column)}: no object has the key '{column}'; set the "
                "task's label_column to the key that holds its labels"
            )
    return rows


def _json_label(path: Path, line: int, column: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise UserError(
        f"{where(path, line, column)}: a label must be a name (string) or an integer, got "
        f"{json.dumps(value)[:60]}"
    )


def _check_texts(path: Path, rows: list[Row], column: str | None, skip_empty: bool) -> list[Row]:
    empty = [row.line for row in rows if not row.text.strip()]
    if not empty:
        return rows
    if not skip_empty:
        raise UserError(
            f"{where(path, empty[0], column)}: empty text"
            + (f" ({len(empty)} such rows in this file)" if len(empty) > 1 else "")
            + "; remove the row or fill in the sentence (or skip such rows with skip_empty)"
        )
    log.warning("%s: skipped %d row(s) with empty text (lines %s)", path, len(empty), empty[:10])
    kept = [row for row in rows if row.text.strip()]
    if not kept:
        raise UserError(f"{path}: every row has an empty text")
    return kept


# -- label maps ----------------------------------------------------------------------------


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


def resolve_labels(config: Config, skip_empty: bool = False) -> Config:
    """Fill in each task's empty ``labels`` from its training file (sorted names).

    Labels given in the config are kept as they are (their order fixes the ids).

    Raises:
      UserError: a task without labels has no ``train_file`` or fewer than two labels.
    """
    found: dict[str, tuple[str, ...]] = {}
    cache: dict[tuple[str, str], list[Row]] = {}
    for task in config.tasks:
        if task.labels:
            continue
        if not task.train_file:
            raise UserError(
                f"task '{task.name}': no labels in the config and no train_file to infer them "
                f"from; set tasks.{task.name}.labels or tasks.{task.name}.train_file"
            )
        key = (_file_key(task.train_file), task.text_column)
        if key not in cache:
            columns = [t.label_key for t in config.tasks if _same_file(t.train_file, key[0])]
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
    return config.with_labels(found)


def resolve_class_weights(config: Config, train: Dataset) -> Config:
    """Fill in ``class_weights`` of each ``class_weighting = "balanced"`` task.

    Balanced weights are sklearn's ``n / (K * n_c)`` over the task's labelled training rows,
    so every class contributes equally to the loss in expectation; a class with no training
    row gets 0. Weights already in the config (a restored run's) are kept.
    """
    tasks = []
    for i, task in enumerate(config.tasks):
        if task.class_weighting == "balanced" and not task.class_weights:
            labels = train.labels[:, i]
            counts = np.bincount(labels[labels >= 0], minlength=task.num_labels)
            n, k = counts.sum(), task.num_labels
            weights = tuple(round(float(n / (k * c)), 6) if c > 0 else 0.0 for c in counts[:k])
            task = dataclasses.replace(task, class_weights=weights)
        tasks.append(task)
    return dataclasses.replace(config, tasks=tuple(tasks))


# -- datasets ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Tokenised rows with a label (or ``-1``) per task; numpy only, built once per split.

    ``source[i]`` indexes ``source_names``: the file (or in-memory origin) row ``i`` came
    from. Sources are the units that task mixing balances.
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


def _build_dataset(
    tokenizer: Any,
    max_length: int,
    texts: Sequence[str],
    labels: np.ndarray,
    lines: np.ndarray,
    source: np.ndarray,
    source_names: Sequence[str],
    task_names: Sequence[str],
) -> Dataset:
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

    Each distinct file is read once and is one source. When a task has its own file, its
    rows get ``-1`` for every other task; when several tasks name the same file, a row
    carries all their labels. Labels must be resolved first (:func:`resolve_labels`), so
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
        raise ValueError(f"tasks {unresolved} have no labels; call resolve_labels(config) first")
    files: dict[str, list] = {}  # file key -> [path as written, text column, tasks]
    for task in config.tasks:
        path = task.train_file if split == "train" else task.dev_file
        if not path:
            if split == "train":
                raise UserError(
                    f"task '{task.name}' has no train_file; set tasks.{task.name}.train_file"
                )
            continue
        entry = files.setdefault(_file_key(path), [path, task.text_column, []])
        if entry[1] != task.text_column:
            raise UserError(
                f"{path}: tasks share this file but name different text columns "
                f"('{entry[1]}' and '{task.text_column}'); give them the same text_column"
            )
        entry[2].append(task)
    task_names = config.task_names
    texts, lines, sources, blocks, names = [], [], [], [], []
    for s, (path, text_column, tasks) in enumerate(files.values()):
        columns = list(dict.fromkeys(t.label_key for t in tasks))
        rows = read_rows(path, text_column, columns, skip_empty=skip_empty)
        block = np.full((len(rows), len(task_names)), -1, np.int32)
        for task in tasks:
            block[:, task_names.index(task.name)] = encode_labels(
                rows, task.labels, path, task.label_key
            )
        unlabelled = np.flatnonzero((block < 0).all(axis=1))
        if unlabelled.size:
            line = rows[unlabelled[0]].line
            raise UserError(
                f"{where(path, line)}: no label in column(s) {', '.join(map(repr, columns))}"
                f" ({unlabelled.size} such row(s)); fill in the label or remove the row"
            )
        texts += [row.text for row in rows]
        lines += [row.line for row in rows]
        sources += [s] * len(rows)
        blocks.append(block)
        names.append(str(path))
    labels = np.concatenate(blocks) if blocks else np.zeros((0, len(task_names)), np.int32)
    dataset = _build_dataset(
        tokenizer, config.model.max_length, texts, labels, lines, sources, names, task_names
    )
    if dataset.truncated:
        log.info(
            "%s split: %d of %d rows cut at model.max_length=%d",
            split,
            dataset.truncated,
            len(dataset),
            config.model.max_length,
        )
    return dataset


def _file_key(path: str | Path) -> str:
    return os.path.realpath(os.fspath(path))


def _same_file(path: str, key: str) -> bool:
    return bool(path) and _file_key(path) == key


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
        raise ValueError(f"tasks {unresolved} have no labels; set them or resolve_labels first")
    text_column = config.tasks[0].text_column if config.tasks else "text"
    parsed = []
    for i, row in enumerate(rows, start=1):
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where(source, i, text_column)}: missing or empty text")
        labels = {
            t.label_key: _json_label(Path(source), i, t.label_key, row.get(t.label_key))
            for t in config.tasks
        }
        parsed.append(Row(i, text, labels))
    labels = np.full((len(parsed), len(config.tasks)), -1, np.int32)
    for k, task in enumerate(config.tasks):
        labels[:, k] = encode_labels(parsed, task.labels, source, task.label_key)
    n = len(parsed)
    return _build_dataset(
        tokenizer,
        config.model.max_length,
        [r.text for r in parsed],
        labels,
        np.arange(1, n + 1),
        np.zeros(n),
        (source,),
        config.task_names,
    )


def dataset_from_texts(
    texts: Sequence[str], tokenizer: Any, max_length: int, task_names: Sequence[str] = ()
) -> Dataset:
    """An unlabelled :class:`Dataset` for inference (every label ``-1``)."""
    n = len(texts)
    return _build_dataset(
        tokenizer,
        max_length,
        list(texts),
        np.full((n, len(task_names)), -1, np.int32),
        np.arange(1, n + 1),
        np.zeros(n),
        ("texts",),
        task_names,
    )


# -- padding into fixed shapes -------------------------------------------------------------


def bucket_lengths(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The padded lengths in use: ``buckets`` below ``max_length``, plus ``max_length``.

    A batch is padded to the smallest of these that holds its longest row, so XLA compiles
    at most ``len(result)`` sequence shapes (every new shape is a recompile).
    """
    return tuple(sorted({int(b) for b in buckets if 0 < b < max_length} | {int(max_length)}))


def inference_buckets(max_length: int) -> tuple[int, ...]:
    """Fine padded lengths for length-sorted inference: every 8 tokens up to 64, every 16 up
    to 128, every 32 up to 256, every 64 beyond, and ``max_length``.

    Sorted batches hold rows of nearly one length, so fine buckets cut the padding a coarse
    training set (16/32/64/128) leaves to a few tokens per row; each length compiles once
    per process (and is kept by the persistent compilation cache).
    """
    steps = ((64, 8), (128, 16), (256, 32))
    lengths, n = [], 8
    while n < max_length:
        lengths.append(n)
        n += next((step for limit, step in steps if n < limit), 64)
    return bucket_lengths(lengths, max_length)


def buckets_for(config: Config) -> tuple[int, ...]:
    """:func:`bucket_lengths` of a config's ``data.length_buckets`` and ``model.max_length``."""
    return bucket_lengths(config.data.length_buckets, config.model.max_length)


def make_batch(
    data: Dataset | Tokenized,
    indices: np.ndarray,
    batch_size: int,
    buckets: Sequence[int],
    task_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The library batch format for rows ``indices`` of ``data``, padded to a fixed shape.

    Rows beyond ``len(indices)`` are dummies (ids 0, attention mask 0, labels -1, index -1)
    so every batch has exactly ``batch_size`` rows; the length is the smallest bucket that
    holds the longest row.

    Args:
      data: a :class:`Dataset` (labels included) or a :class:`Tokenized` (labels -1).
      indices: at most ``batch_size`` row indices.
      batch_size: rows per batch.
      buckets: allowed padded lengths, ascending (see :func:`bucket_lengths`).
      task_names: the label keys of the batch, matched to the dataset by name (a task the
        data has no labels for is all -1); default the dataset's tasks.

    Returns:
      ``{"input_ids", "attention_mask", "token_type_ids"}`` int32 ``[B, T]``,
      ``"labels"`` ``{task: int32 [B]}`` and ``"index"`` int32 ``[B]``.
    """
    indices = np.asarray(indices, np.int64)
    if len(indices) > batch_size:
        raise ValueError(f"{len(indices)} rows do not fit a batch of {batch_size}")
    rows = [data.input_ids[i] for i in indices]
    longest = max((len(r) for r in rows), default=1)
    length = next((b for b in buckets if b >= longest), None)
    if length is None:
        raise ValueError(f"a row of {longest} tokens exceeds the largest bucket {buckets[-1]}")
    ids = np.zeros((batch_size, length), np.int32)
    types = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for k, i in enumerate(indices):
        n = len(rows[k])
        ids[k, :n] = rows[k]
        types[k, :n] = data.token_type_ids[i]
        mask[k, :n] = 1
    index = np.full(batch_size, -1, np.int32)
    index[: len(indices)] = indices
    own = tuple(getattr(data, "task_names", ()))
    names = own if task_names is None else tuple(task_names)
    labels = {}
    for name in names:
        y = np.full(batch_size, -1, np.int32)
        if name in own:  # a Tokenized, or a task this dataset has no column for: all -1
            y[: len(indices)] = data.labels[indices, own.index(name)]
        labels[name] = y
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": types,
        "labels": labels,
        "index": index,
    }


# -- training order ------------------------------------------------------------------------


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, *keys]))


def epoch_batches(dataset: Dataset, config: Config, epoch: int) -> list[np.ndarray]:
    """Row indices of every training batch of ``epoch``, in order.

    A pure function of ``(config.train.seed, epoch)`` and the dataset, which is what makes
    a run resumable mid-epoch from two integers. Task mixing across sources
    (``config.data.mixing``):

    * ``proportional``: all rows shuffled together, each row once; a source fills each
      batch in proportion to its size.
    * ``temperature``: source ``i`` gets ``N * n_i**(1/T) / sum_j n_j**(1/T)`` of the
      ``N`` rows of the epoch (``T=1`` is proportional, large ``T`` tends to uniform).
      Within an epoch a source's rows are repeated evenly (counts differ by at most one)
      and never drawn with replacement; the rows that get the extra turn rotate across
      epochs, so a down-sampled source shows every row within ``ceil(n / quota)`` epochs.
    * ``round_robin``: single-source batches, sources taking turns; a source that runs
      out drops out of the rotation, so each row appears once per epoch.

    With ``data.group_by_length``, windows of ``group_window * batch_size`` rows of the
    shuffled order are sorted by length and cut into batches, and the batches are
    shuffled (less padding, still random). Only the last batch (per source for
    ``round_robin``) can be partial.
    """
    batch_size = config.train.batch_size
    rng = _rng(config.train.seed, _TAG_EPOCH, epoch)
    sizes = dataset.source_sizes()
    members = [np.flatnonzero(dataset.source == s) for s in range(len(sizes))]
    mixing = config.data.mixing if np.count_nonzero(sizes) > 1 else "proportional"
    if mixing == "round_robin":
        per_source = [
            _cut(rng.permutation(rows), dataset.lengths, batch_size, config, rng)
            for rows in members
        ]
        batches = []
        for turn in range(max((len(b) for b in per_source), default=0)):
            batches += [b[turn] for b in per_source if turn < len(b)]
        return batches
    if mixing == "temperature":
        quotas = _temperature_quotas(sizes, config.data.mixing_temperature)
        drawn = [
            rows[_epoch_sample(len(rows), q, config.train.seed, s, epoch)]
            for s, (rows, q) in enumerate(zip(members, quotas, strict=True))
            if q
        ]
        order = np.concatenate(drawn) if drawn else np.zeros(0, np.int64)
    else:
        order = np.arange(len(dataset))
    return _cut(rng.permutation(order), dataset.lengths, batch_size, config, rng)


def _cut(
    order: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    config: Config,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Batches from a shuffled order, length-grouped in windows when configured."""
    if not config.data.group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = config.data.group_window * batch_size
    batches = []
    for w in range(0, len(order), window):
        chunk = order[w : w + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _temperature_quotas(sizes: np.ndarray, temperature: float) -> np.ndarray:
    """Rows per source summing to ``sizes.sum()``, by largest remainder of ``N * p_i``."""
    weights = np.where(sizes > 0, sizes.astype(np.float64) ** (1.0 / temperature), 0.0)
    exact = sizes.sum() * weights / weights.sum()
    quotas = np.floor(exact).astype(np.int64)
    short = int(sizes.sum() - quotas.sum())
    quotas[np.argsort(-(exact - quotas), kind="stable")[:short]] += 1
    return quotas


def _epoch_sample(n: int, quota: int, seed: int, source: int, epoch: int) -> np.ndarray:
    """``quota`` positions in ``range(n)`` for ``epoch``: each ``quota // n`` times, plus a share.

    The ``quota % n`` extra positions are distinct within the epoch and rotate through one
    permutation per cycle of ``ceil(n / extra)`` epochs, so over a cycle every row gets its
    extra turn (an up-sampled source) or is seen once (a down-sampled source).
    """
    full, extra = divmod(quota, n)
    parts = [np.arange(n)] * full
    if extra:
        cycle, turn = divmod(epoch, math.ceil(n / extra))
        perm = _rng(seed, _TAG_CYCLE, source, cycle).permutation(n)
        chunk = perm[turn * extra : (turn + 1) * extra]
        # The cycle's last turn is short: top it up from its start (disjoint from chunk).
        parts += [chunk, perm[: extra - len(chunk)]]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def steps_per_epoch(dataset: Dataset, config: Config) -> int:
    """Batches per epoch (the same for every epoch), without building the order."""
    batch_size = config.train.batch_size
    sizes = dataset.source_sizes()
    if config.data.mixing == "round_robin" and np.count_nonzero(sizes) > 1:
        return int(sum(math.ceil(n / batch_size) for n in sizes))
    return math.ceil(len(dataset) / batch_size)


def stream_state(dataset: Dataset, config: Config, step: int) -> dict[str, int]:
    """The :class:`BatchStream` state after ``step`` batches from the start of training.

    Use this (not ``stream.state()``) when batches are prefetched: the stream's own state
    runs ahead of the step the model has consumed.
    """
    epoch, batch = divmod(int(step), steps_per_epoch(dataset, config))
    return {"epoch": epoch, "batch": batch}


class BatchStream:
    """Training batches across epochs, resumable from ``state()`` (a JSON-able dict).

    ``state()`` is the position of the next batch to be returned; after the last batch of
    epoch ``e`` it is ``{"epoch": e + 1, "batch": 0}``. A stream built with
    :meth:`from_state` returns exactly the batches an uninterrupted stream would have
    returned from that point. It stops after ``epochs`` epochs (default
    ``config.train.epochs``; ``0`` = endless, for runs bounded by ``max_steps``).
    """

    def __init__(
        self,
        dataset: Dataset,
        config: Config,
        state: Mapping[str, int] | None = None,
        epochs: int | None = None,
    ):
        self.dataset = dataset
        self.config = config
        self.buckets = buckets_for(config)
        self.steps = steps_per_epoch(dataset, config)
        self.epochs = config.train.epochs if epochs is None else epochs
        if self.steps == 0:
            raise UserError("the training data has no rows; check the tasks' train files")
        state = dict(state or {"epoch": 0, "batch": 0})
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"data state {state!r}: expected {{'epoch': int, 'batch': int}}"
            ) from None
        if epoch < 0 or not 0 <= batch <= self.steps:
            raise UserError(
                f"data state {state!r} does not fit this data ({self.steps} batches per "
                "epoch); was the data, batch size or mixing changed since the checkpoint?"
            )
        self._epoch, self._batch = (epoch + 1, 0) if batch == self.steps else (epoch, batch)
        self._order: list[np.ndarray] = []
        self._order_epoch = -1

    @classmethod
    def from_state(
        cls,
        dataset: Dataset,
        config: Config,
        state: Mapping[str, int],
        epochs: int | None = None,
    ) -> BatchStream:
        """Resume at ``state`` (from :meth:`state` or :func:`stream_state`)."""
        return cls(dataset, config, state, epochs)

    def state(self) -> dict[str, int]:
        """``{"epoch": e, "batch": b}``: where the next batch comes from."""
        return {"epoch": self._epoch, "batch": self._batch}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.epochs and self._epoch >= self.epochs:
            raise StopIteration
        if self._order_epoch != self._epoch:
            self._order = epoch_batches(self.dataset, self.config, self._epoch)
            self._order_epoch = self._epoch
        indices = self._order[self._batch]
        self._batch += 1
        if self._batch == self.steps:
            self._epoch, self._batch = self._epoch + 1, 0
        return make_batch(self.dataset, indices, self.config.train.batch_size, self.buckets)


# -- inference and evaluation --------------------------------------------------------------


def inference_batches(
    tokenized: Dataset | Tokenized, batch_size: int, buckets: Sequence[int], max_length: int
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Fixed-shape batches in order of decreasing length, with the rows they hold.

    Sorting by length packs rows of similar length together (little padding); the
    longest batch comes first so an out-of-memory shows at once. Pass the outputs and the
    yielded indices to :func:`restore_order` to get them back in input order. A
    :class:`Dataset` keeps its labels in the batch (evaluation).

    Yields:
      ``(indices, batch)``: the original row indices (``int64 [k]``, ``k <= batch_size``)
      and a batch of ``batch_size`` rows whose first ``k`` are those rows.
    """
    allowed = bucket_lengths(buckets, max_length)
    lengths = np.array([len(x) for x in tokenized.input_ids], np.int64)
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        yield indices, make_batch(tokenized, indices, batch_size, allowed)


def eval_batches(dataset: Dataset, config: Config) -> Iterator[dict[str, Any]]:
    """Dev-set batches of ``data.eval_batch_size`` (labels in the batch, sorted by length)."""
    for _, batch in inference_batches(
        dataset, config.data.eval_batch_size, config.data.length_buckets, config.model.max_length
    ):
        yield batch


def restore_order(chunks: Sequence[Any], indices: Sequence[np.ndarray], n: int) -> Any:
    """Put per-batch outputs back in input order.

    Args:
      chunks: per batch, an array ``[B, ...]`` (or a dict of them, e.g. logits per task);
        rows beyond ``len(indices[k])`` are padding and dropped.
      indices: per batch, the original row indices from :func:`inference_batches`.
      n: the number of input rows.

    Returns:
      An array ``[n, ...]`` (or a dict of them) with row ``i`` the output for input ``i``.

    Raises:
      ValueError: if the indices do not cover each of the ``n`` rows exactly once.
    """
    flat = np.concatenate([np.asarray(i, np.int64) for i in indices]) if indices else []
    if len(flat) != n or not np.array_equal(np.sort(flat), np.arange(n)):
        raise ValueError(f"indices do not cover rows 0..{n - 1} exactly once")
    if chunks and isinstance(chunks[0], Mapping):
        return {k: restore_order([c[k] for c in chunks], indices, n) for k in chunks[0]}
    parts = [np.asarray(c)[: len(i)] for c, i in zip(chunks, indices, strict=True)]
    if not parts:
        return np.zeros((0,))
    out = np.empty((n, *parts[0].shape[1:]), parts[0].dtype)
    out[flat] = np.concatenate(parts)
    return out


# -- prefetch and statistics ---------------------------------------------------------------


_END = object()


def prefetch(iterator: Iterable[Any], size: int = 2) -> Iterator[Any]:
    """Yield the items of ``iterator`` in order, produced up to ``size`` ahead by a thread.

    Batch assembly then overlaps the device step (JAX releases the GIL while it waits).
    An exception in the producer is re-raised here; leaving the loop early stops the
    thread.
    """
    items: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as exc:  # handed to the consumer, re-raised there
            put((False, exc))

    thread = threading.Thread(target=produce, name="mtl_jax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=1.0)


def padding_stats(batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Real and padded token counts over batches, and the share of padding.

    Dummy rows that fill the last batch count as padding: they cost the same compute.
    """
    real = total = 0
    for batch in batches:
        mask = np.asarray(batch["attention_mask"])
        real += int(mask.sum())
        total += mask.size
    padded = total - real
    return {
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_share": padded / total if total else 0.0,
    }
