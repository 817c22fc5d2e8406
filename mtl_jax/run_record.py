"""What a run depends on, saved with it, so a resume on changed inputs is refused, not silent.

A resume promises the same parameters, bit for bit, as an uninterrupted run. That only
holds when the data and the settings that shape the run are the ones its checkpoint was
trained with. ``<workdir>/run_record.json`` keeps, from the first start:

* every training and dev file the run reads: its path (as written in the config), size
  and SHA-256 of its content;
* the resolved config (every key, for the record), of which the ``data``, ``train`` and
  ``parallel`` keys are compared on resume. ``model`` and ``tasks`` are not compared here:
  the params are built from them, so :func:`mtl_jax.checkpoint.check_same_model` refuses
  any change there, with no override.

Keys in :data:`SAFE_TO_CHANGE` may change on resume: they decide when the run logs,
evaluates, saves or stops, or how it is laid out on devices, never what a step computes.
Every other change is refused (:func:`check_resume`), ``train.epochs`` and
``train.max_steps`` included: the learning-rate schedule (warm-up, linear or cosine decay)
and gradual unfreezing are laid out over the run's total length, so changing it changes
every later step. ``mtl-jax train --allow-changes`` resumes anyway; the record then lists
what changed and when (``allowed_changes``) and becomes the new reference.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

from mtl_jax.checkpoint import CHECKPOINTS_DIR
from mtl_jax.config import Config
from mtl_jax.errors import UserError

RECORD_FILE = "run_record.json"
VERSION = 1
COMPARED_SECTIONS = ("data", "train", "parallel")
SAFE_TO_CHANGE = {
    "train.eval_every": "when dev scores are computed",
    "train.log_every": "when train metrics are logged",
    "train.checkpoint_every": "when checkpoints are saved",
    "train.keep_checkpoints": "how many checkpoints are kept",
    "train.early_stopping_patience": "when the run stops, not what a step computes",
    "train.skip_nonfinite": "the documented way on after a non-finite loss",
    "train.cache_features": "the same steps, computed from cached embeddings",
    "data.eval_batch_size": "how the dev set is batched",
    "parallel.fsdp": "how params are laid out on devices (a checkpoint restores on any mesh)",
    "parallel.distributed": "how processes start",
}
WHY = {
    "train.epochs": "the learning-rate schedule and the data stream span the run's length",
    "train.max_steps": "the learning-rate schedule spans the run's length",
}
OVERRIDE = "--allow-changes"


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def file_digest(path: str | Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file, read in chunks (a 67k-line file takes milliseconds)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = f.tell()
    return {"size": size, "sha256": digest}


def data_files(config: Config) -> dict[str, list[str]]:
    """The files a run reads (as written in the config) and the config keys naming each.

    Synthetic training data (``data.synthetic_train_rows > 0``) reads no task file.
    """
    files: dict[str, list[str]] = {}
    if config.data.synthetic_train_rows > 0:
        return files
    for task in config.tasks:
        for split in ("train_file", "dev_file"):
            path = getattr(task, split)
            if path:
                files.setdefault(path, []).append(f"tasks.{task.name}.{split}")
    return files


def make_record(config: Config) -> dict[str, Any]:
    """The record of a run about to start: its files' sizes and hashes, and its config.

    A file that cannot be read is recorded with its error; the data readers then refuse it
    with their own message, and a later fresh start writes a new record.
    """
    files = []
    for path, keys in data_files(config).items():
        entry: dict[str, Any] = {"path": path, "keys": keys}
        try:
            entry.update(file_digest(path))
        except OSError as exc:
            entry["error"] = exc.strerror or str(exc)
        files.append(entry)
    return {"version": VERSION, "created": _now(), "files": files, "config": config.to_dict()}


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section in COMPARED_SECTIONS
        for key, value in config.get(section, {}).items()
    }


def _file_change(saved: dict[str, Any], now: dict[str, Any] | None) -> str | None:
    where = f"{saved['path']} ({', '.join(saved.get('keys', []))})"
    if "sha256" not in saved:
        return None  # unreadable at the start: that run never trained on it
    if now is None:
        return None  # not read any more: a changed setting or task, reported as such
    if "error" in now:
        return f"{where}: {now['error'].lower()} (it had {saved['size']} bytes)"
    if now["size"] != saved["size"]:
        return f"{where}: size {saved['size']} -> {now['size']} bytes"
    if now["sha256"] != saved["sha256"]:
        return (
            f"{where}: content changed, same size (sha256 {saved['sha256'][:12]}... -> "
            f"{now['sha256'][:12]}...)"
        )
    return None


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two records: changed files, then changed settings."""
    changes = []
    now_files = {entry["path"]: entry for entry in current.get("files", [])}
    for entry in saved.get("files", []):
        change = _file_change(entry, now_files.get(entry["path"]))
        if change:
            changes.append(change)
    old, new = _flat(saved.get("config", {})), _flat(current.get("config", {}))
    # A key newer than the record: the run trained without it, i.e. as its default (a new
    # setting defaults to the behaviour before it). A key the config no longer has: skipped.
    defaults = _flat(json.loads(json.dumps(Config().to_dict())))  # as a saved record reads
    old = {**{k: defaults[k] for k in new.keys() - old.keys() if k in defaults}, **old}
    for key in sorted(set(old) & set(new)):
        if key not in SAFE_TO_CHANGE and old[key] != new[key]:
            why = f": {WHY[key]}" if key in WHY else ""
            changes.append(
                f"config key '{key}': {json.dumps(old[key])} -> {json.dumps(new[key])}{why}"
            )
    return changes


def check_resume(
    saved: dict[str, Any],
    config: Config,
    allow_changes: bool = False,
    source: str | Path = RECORD_FILE,
) -> list[str]:
    """The changes between a run's record and a resume of it with ``config``.

    Args:
      saved: the record written when the run started (:func:`make_record`).
      config: the config of the resume.
      allow_changes: return the changes instead of raising (``--allow-changes``).
      source: the record's file, named in the error.

    Returns:
      One line per change (a file: size or hash; a key: old -> new); empty when none.

    Raises:
      UserError: something changed and ``allow_changes`` is False; the message names each
        file or key and the ways on.
    """
    changes = differences(saved, make_record(config))
    if changes and not allow_changes:
        _refuse(changes, source)
    return changes


def _refuse(changes: list[str], source: str | Path) -> None:
    raise UserError(
        f"cannot resume: {'; '.join(changes)}; the checkpoint was trained on what {source} "
        "recorded, so this would not continue that run: undo the change, use a new "
        f"--workdir, or pass {OVERRIDE} to resume anyway"
    )


def has_checkpoint(workdir: str | Path) -> bool:
    """Whether the workdir holds a complete training checkpoint (what makes a resume).

    Orbax renames a checkpoint's temporary directory to its step number when complete.
    """
    directory = Path(workdir) / CHECKPOINTS_DIR
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def read_record(workdir: str | Path) -> dict[str, Any] | None:
    """A workdir's record, or None when it has none (a run from before records)."""
    path = Path(workdir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{path}: cannot read the run record ({exc}); delete it to resume without the "
            "checks it makes"
        ) from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a run record (a JSON object); delete it to resume")
    return record


def record_run(config: Config, workdir: str | Path, allow_changes: bool = False) -> list[str]:
    """Write the run's record on a fresh start; on a resume, compare with it first.

    A workdir without a complete checkpoint starts afresh, so its record is (re)written.
    A resume whose workdir has no record (a run from before records) starts one now.

    Returns:
      The changes a resume went on with (only with ``allow_changes``; else it raised). They
      are appended to the record's ``allowed_changes`` with the time.
    """
    workdir = Path(workdir)
    current = make_record(config)
    saved = read_record(workdir) if has_checkpoint(workdir) else None
    changes: list[str] = []
    if saved is not None:
        changes = differences(saved, current)
        if changes and not allow_changes:
            _refuse(changes, workdir / RECORD_FILE)
        current["created"] = saved.get("created", current["created"])
        history = list(saved.get("allowed_changes", []))
        if changes:
            history.append({"at": _now(), "changes": changes})
        if history:
            current["allowed_changes"] = history
    path = workdir / RECORD_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(current, indent=2), encoding="utf-8")
    tmp.replace(path)
    return changes
