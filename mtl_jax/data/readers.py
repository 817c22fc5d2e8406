"""Data files to rows: ``.tsv``/``.csv``/``.jsonl``/``.txt`` parsed into :class:`Row`.

Its one job is reading, so every bad input ends here as a :class:`UserError` naming file,
line and column and what would fix it (a wrong delimiter, an open quote, a binary or
UTF-16 file, an empty text). Rows are numbered by the line they start on in their file
(header = line 1); an empty label cell is ``None`` ("no label for this column").
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from mtl_jax.errors import UserError, where

log = logging.getLogger(__name__)

FORMATS = (".tsv", ".csv", ".jsonl", ".txt")
_DELIMITERS = {".tsv": "\t", ".csv": ","}
_DELIMITER_NAMES = {"\t": "tabs", ",": "commas", ";": "semicolons", "|": "pipes"}


class MissingColumnError(UserError):
    """A wanted column (or JSON key) the file does not have; ``column`` names it, so a
    caller that knows why the column is wanted can say so."""

    def __init__(self, message: str, column: str) -> None:
        super().__init__(message)
        self.column = column


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
        raise MissingColumnError(
            f"{where(path, 1, missing[0])}: no column '{missing[0]}' in the header; the "
            f"columns are {', '.join(repr(h) for h in header)}. Set the task's text_column / "
            "label_column / source_column to one of these, or fix the header",
            missing[0],
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
            labels[column] = parse_label(path, number, column, value)
        rows.append(Row(number, text, labels))
    for column, found in seen.items():
        if not found:
            raise MissingColumnError(
                f"{where(path, None, column)}: no object has the key '{column}'; set the "
                "task's label_column / source_column to the key that holds it, or add it",
                column,
            )
    return rows


def parse_label(path: Path, line: int, column: str, value: Any) -> str | None:
    """A JSON (or in-memory) label value as a name: ``None``/blank = no label, ints as text."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise UserError(
        f"{where(path, line, column)}: a label or source id must be a name (string) or an "
        f"integer, got {json.dumps(value)[:60]}; write it as one"
    )


def _check_texts(path: Path, rows: list[Row], column: str | None, skip_empty: bool) -> list[Row]:
    empty = [row.line for row in rows if not row.text.strip()]
    if not empty:
        return rows
    if not skip_empty:
        raise UserError(
            f"{where(path, empty[0], column)}: empty text"
            + (f" ({len(empty)} such rows in this file)" if len(empty) > 1 else "")
            + "; remove the row or fill in the sentence (or skip such rows: --skip-empty "
            "for eval/predict/embed, data.skip_empty = true for train)"
        )
    log.warning("%s: skipped %d row(s) with empty text (lines %s)", path, len(empty), empty[:10])
    kept = [row for row in rows if row.text.strip()]
    if not kept:
        raise UserError(f"{path}: every row has an empty text")
    return kept


def file_key(path: str | Path) -> str:
    """One key per file however its path is written, so a file shared by tasks is read once."""
    return os.path.realpath(os.fspath(path))


def same_file(path: str, key: str) -> bool:
    """Whether ``path`` (possibly empty: no file) is the file of :func:`file_key` ``key``."""
    return bool(path) and file_key(path) == key
