"""The run directory and its Orbax checkpoints.

Layout of ``<workdir>``::

    config.json          the resolved config (labels included) that built the params
    bert_config.json     the backbone architecture, so a restore needs no pretrained weights
    tokenizer/           the backbone's tokenizer files
    checkpoints/<step>/  params, opt_state, meta (step, data position, rng seed), and ema
                         (the params' EMA, with train.ema_decay): last K kept
    best/<step>/         params and meta of the best evaluation so far
    metrics.jsonl        one JSON object per log or eval event
    tensorboard/         event files

Orbax writes each checkpoint into a temporary directory and renames it when complete: a run
killed mid-save leaves no half-written checkpoint for a resume. Each checkpoint's meta also
records the tasks' labels (:func:`label_stamp`): params trained for other labels are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mtl_jax.config import Config
from mtl_jax.ema import find_ema, with_ema
from mtl_jax.errors import UserError
from mtl_jax.trees import Params, first_difference, weighted_mean

CONFIG_FILE = "config.json"
BERT_CONFIG_FILE = "bert_config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
EMA_ITEM = "ema"  # a checkpoint's EMA of the params (train.ema_decay > 0)

# Orbax logs every save at INFO; keep the user's terminal for the progress bar.
logging.getLogger("absl").setLevel(logging.WARNING)


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


# -- run directory files ----------------------------------------------------------------------


def write_run_files(workdir: Path, config: Config, bert_config: Any, tokenizer: Any) -> None:
    """Write what a restore needs besides the params; refuse a workdir of another run."""
    workdir.mkdir(parents=True, exist_ok=True)
    existing = workdir / CONFIG_FILE
    if existing.exists():
        check_same_model(read_config(workdir), config, workdir)
    _atomic_write(existing, config.to_json())
    _atomic_write(workdir / BERT_CONFIG_FILE, bert_config.to_json_string(use_diff=False))
    tokenizer.save_pretrained(str(workdir / TOKENIZER_DIR))


def check_same_model(saved: Config, config: Config, workdir: Path) -> None:
    """A workdir's checkpoints only fit a config with the same model and tasks."""
    for section in ("model", "tasks"):
        old, new = saved.to_dict()[section], config.to_dict()[section]
        if old != new:
            key = _first_difference(old, new, section)
            raise UserError(
                f"{workdir}: holds a run with another config ('{key}' differs); "
                "use a new --workdir or the same config"
            )


def _first_difference(old: Any, new: Any, path: str) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}")
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                name = a.get("name", i) if isinstance(a, dict) else i
                return _first_difference(a, b, f"{path}.{name}")
    return path


def read_config(workdir: Path) -> Config:
    """A run directory's ``config.json``, parsed as data and validated like a user config."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{workdir}: not a run directory (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a JSON object, got {type(data).__name__}")
    config = Config.from_dict(data, source=str(path))
    try:
        return config.validate()
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run directory holds for inference: config, architecture, tokenizer."""

    workdir: Path
    config: Config
    bert_config: Any
    tokenizer: Any


def open_run(workdir: str | Path) -> Run:
    """Read a run directory's config, architecture and tokenizer (no params yet)."""
    from transformers import BertConfig, BertTokenizerFast

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"{workdir}: checkpoint directory not found")
    config = read_config(workdir)
    bert_file = workdir / BERT_CONFIG_FILE
    tok_dir = workdir / TOKENIZER_DIR
    if not bert_file.is_file() or not tok_dir.is_dir():
        raise UserError(f"{workdir}: incomplete run directory (no {BERT_CONFIG_FILE} or tokenizer)")
    bert_config = BertConfig.from_json_file(str(bert_file))
    tokenizer = BertTokenizerFast.from_pretrained(str(tok_dir), local_files_only=True)
    return Run(workdir, config, bert_config, tokenizer)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# -- checkpoints ------------------------------------------------------------------------------


def label_stamp(config: Config) -> dict[str, list[str]]:
    """Each task's label names in id order: what the heads' outputs of a checkpoint mean."""
    return {task.name: list(task.labels) for task in config.tasks}


def check_label_stamp(meta: dict[str, Any], config: Config, source: str | Path) -> None:
    """Refuse a checkpoint whose heads were trained for other tasks or label names."""
    saved = meta.get("labels")
    if saved is None:  # a checkpoint written before checkpoints carried their labels
        return
    wanted = label_stamp(config)
    if saved != wanted:
        task = next(t for t in sorted(set(saved) | set(wanted)) if saved.get(t) != wanted.get(t))
        raise UserError(
            f"{source}: the checkpoint was trained for other labels than the run's config "
            f"(task '{task}': checkpoint {saved.get(task)}, config {wanted.get(task)}); "
            "was the run directory mixed with another run?"
        )


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed (disk full, permissions...), or None if ``exc`` is no I/O error.

    Orbax reports a failed write from tensorstore as a ``ValueError`` carrying
    ``[os_error_code='28']``, often as the cause of another exception.
    """
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        code = re.search(r"os_error_code='?(\d+)", str(seen))
        if code:
            return os.strerror(int(code.group(1)))
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def _writing(directory: Path) -> Iterator[None]:
    """Turn a failed checkpoint write into one clean :class:`UserError` (other errors pass)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        raise UserError(
            f"{directory}: cannot write a checkpoint ({reason}); the last complete checkpoint "
            "is intact: free some space (or fix the permissions) and rerun to resume"
        ) from exc


def _first_line(exc: BaseException, limit: int = 200) -> str:
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Checkpointer:
    """One Orbax manager for the last K training states, one for the best params.

    ``save`` is asynchronous (training goes on while the arrays are written); ``close``
    waits for the last write, so call it before the process ends. A write that fails (a
    full disk) raises :class:`UserError` at the next save or at ``close``. With ``config``,
    every checkpoint records the tasks' labels and ``restore`` refuses other labels.
    """

    def __init__(
        self,
        workdir: Path,
        keep: int = 3,
        best_metric: str = "score",
        config: Config | None = None,
    ):
        ocp = _ocp()
        self.workdir = Path(workdir).absolute()  # Orbax needs absolute paths
        self.best_metric = best_metric
        self.config = config
        self.stamp = {} if config is None else {"labels": label_stamp(config)}
        self._latest = ocp.CheckpointManager(
            self.workdir / CHECKPOINTS_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
            item_names=("params", "opt_state", "meta", EMA_ITEM),
        )
        self._best = ocp.CheckpointManager(
            self.workdir / BEST_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                cleanup_tmp_directories=True,
                best_fn=lambda metrics: metrics[best_metric],
                best_mode="max",
            ),
            item_names=("params", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def save(self, step: int, params: Params, opt_state: Any, meta: dict[str, Any]) -> None:
        """A training checkpoint. An EMA of the params in ``opt_state`` is written once, as
        its own item: the weights inference reads (:func:`restore_params`)."""
        ocp = _ocp()
        ema = find_ema(opt_state)
        items = {
            "params": ocp.args.StandardSave(params),
            "opt_state": ocp.args.StandardSave(with_ema(opt_state, None)),
            "meta": ocp.args.JsonSave({**meta, **self.stamp}),
        }
        if ema is not None:
            items[EMA_ITEM] = ocp.args.StandardSave(ema)
        with _writing(self.workdir / CHECKPOINTS_DIR):
            self._latest.save(step, args=ocp.args.Composite(**items), force=True)

    def forget_best_after(self, step: int) -> None:
        """Drop best checkpoints newer than a resumed step: the rerun evaluates them again.

        A run killed after saving ``best/20`` but before ``checkpoints/20`` resumes from an
        older step; without this, its own evaluation at step 20 would collide with the
        stale one.
        """
        for stale in [s for s in self._best.all_steps() if s > step]:
            self._best.delete(stale)

    def save_best(self, step: int, params: Params, meta: dict[str, Any], score: float) -> None:
        ocp = _ocp()
        with _writing(self.workdir / BEST_DIR):
            self._best.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    meta=ocp.args.JsonSave({**meta, **self.stamp}),
                ),
                metrics={self.best_metric: float(score)},
                force=True,
            )

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any):
        """``(params, opt_state, meta)`` of a training checkpoint, shaped like the targets.

        Raises:
          UserError: the checkpoint does not fit the targets (another model's checkpoint
            in this run directory), cannot be read, or was trained for other labels.
        """
        ocp = _ocp()
        source = self.workdir / CHECKPOINTS_DIR / str(step)
        abstract_ema = find_ema(abstract_opt_state)
        saved_ema = _holds_ema(source)
        if saved_ema != (abstract_ema is not None):
            trained, now = ("with", "0") if saved_ema else ("without", "set")
            raise UserError(
                f"{source}: trained {trained} an EMA of the params, but train.ema_decay is "
                f"now {now}: set it back to the run's value or use a new --workdir"
            )
        items = {
            "params": ocp.args.StandardRestore(abstract_params),
            "opt_state": ocp.args.StandardRestore(with_ema(abstract_opt_state, None)),
            "meta": ocp.args.JsonRestore(),
        }
        if saved_ema:
            items[EMA_ITEM] = ocp.args.StandardRestore(abstract_ema)
        try:
            restored = self._latest.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, OSError) as exc:
            raise UserError(
                f"{source}: cannot resume from this checkpoint ({_first_line(exc)}); it is "
                "damaged or was written for another model: use a new --workdir"
            ) from exc
        if self.config is not None:
            check_label_stamp(dict(restored.meta), self.config, source)
        opt_state = restored.opt_state
        if saved_ema:
            opt_state = with_ema(opt_state, restored[EMA_ITEM])
        return restored.params, opt_state, restored.meta

    def close(self) -> None:
        """Wait for pending writes and release both managers, even after a failed write."""
        errors = []
        for finish in (
            self._latest.wait_until_finished,
            self._best.wait_until_finished,
            self._latest.close,
            self._best.close,
        ):
            try:
                finish()
            except Exception as exc:  # every manager is closed; the first error is raised
                errors.append(exc)
        if errors:
            with _writing(self.workdir):
                raise errors[0]


# Which params of a run inference reads: the newest checkpoint, the best evaluation, or the
# mean of every checkpoint still kept in checkpoints/ (the last ``train.keep_checkpoints``).
WHICH = ("latest", "best", "average")


def check_which(which: str) -> None:
    """UserError naming ``--which`` unless ``which`` is one of :data:`WHICH`."""
    if which not in WHICH:
        raise UserError(f"--which: expected one of {', '.join(WHICH)}, got {which!r}")


def restore_params(workdir: str | Path, which: str = "latest") -> tuple[Params, dict[str, Any]]:
    """Params (as numpy) and meta of a run's ``latest``, ``best`` or ``average`` checkpoint.

    For a run trained with ``train.ema_decay`` these are the EMA weights, the ones its
    evaluations scored (``best/`` holds only those); meta then says ``"weights": "ema"``.

    ``average``: the mean of every complete checkpoint kept in ``checkpoints/`` (a run's
    last checkpoints lie in one basin; their mean often generalises a little better), with
    the newest one's meta plus ``averaged_steps``. No opt state.
    """
    workdir = Path(workdir)
    check_which(which)
    directory = workdir.absolute() / (BEST_DIR if which == "best" else CHECKPOINTS_DIR)
    if not directory.is_dir():
        raise UserError(f"{workdir}: no {directory.name}/ directory: the run saved no checkpoint")
    manager = _ocp().CheckpointManager(directory, item_names=("params", "meta", EMA_ITEM))
    try:
        step = manager.latest_step()
        if step is None:
            raise UserError(
                f"{directory}: holds no complete checkpoint (an interrupted first save?)"
            )
        if which != "average":
            return _restore_step(manager, directory, step)
        steps, metas = sorted(manager.all_steps()), []

        def read_each():  # about one checkpoint in memory at a time, beside the running sum
            for s in steps:
                params, meta = _restore_step(manager, directory, s)
                metas.append(meta)
                yield params
                del params

        def fits(params, first, index):  # one run's checkpoints share one tree; say so if not
            check_params_fit(params, first, str(directory / str(steps[index])))

        mean = weighted_mean(read_each(), check=fits)
    finally:
        manager.close()
    return mean, {**metas[-1], "averaged_steps": steps}


def _holds_ema(step_dir: Path) -> bool:
    """Whether a checkpoint was written with an EMA of the params (its ``ema`` item)."""
    return (step_dir / EMA_ITEM).is_dir()


def _restore_step(manager: Any, directory: Path, step: int) -> tuple[Params, dict[str, Any]]:
    """One checkpoint's params (numpy) and meta; UserError naming it if unreadable."""
    ocp = _ocp()
    item = EMA_ITEM if _holds_ema(directory / str(step)) else "params"
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{item: ocp.args.StandardRestore()}, meta=ocp.args.JsonRestore()
            ),
        )
    except (ValueError, OSError) as exc:
        if not (directory / str(step)).exists():  # pruned by a run that is still training
            raise UserError(
                f"{directory / str(step)}: removed while it was read (the run is still "
                "training and keeps only its newest checkpoints); run the command again"
            ) from exc
        raise UserError(
            f"{directory / str(step)}: cannot read this checkpoint ({_first_line(exc)}); "
            "it is damaged or incomplete"
        ) from exc
    meta = dict(restored.meta) | ({"weights": "ema"} if item == EMA_ITEM else {})
    return jax.tree_util.tree_map(np.asarray, restored[item]), meta


def check_params_fit(params: Params, expected: Params, source: str) -> None:
    """Raise a clear error when checkpoint params do not fit the model built from config."""
    detail = first_difference(expected, params)
    if detail is None:
        return
    raise UserError(
        f"{source}: checkpoint params do not fit the config saved with it ({detail}); "
        "was the run directory mixed with another run?"
    )
