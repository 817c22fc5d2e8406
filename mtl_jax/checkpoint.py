"""The run directory and its Orbax checkpoints.

Layout of ``<workdir>``::

    config.json          the resolved config (labels included) that built the params
    bert_config.json     the backbone architecture, so a restore needs no pretrained weights
    tokenizer/           the backbone's tokenizer files
    checkpoints/<step>/  params, opt_state, meta (step, data position, rng seed): last K kept
    best/<step>/         params and meta of the best evaluation so far
    metrics.jsonl        one JSON object per log or eval event
    tensorboard/         event files

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
run killed mid-save leaves no half-written checkpoint that a resume could pick up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mtl_jax.config import Config
from mtl_jax.errors import UserError

CONFIG_FILE = "config.json"
BERT_CONFIG_FILE = "bert_config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"

Params = dict[str, Any]

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
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{workdir}: not a run directory (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    return Config.from_dict(data, source=str(path))


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


class Checkpointer:
    """One Orbax manager for the last K training states, one for the best params.

    ``save`` is asynchronous (training goes on while the arrays are written); ``close``
    waits for the last write, so call it before the process ends.
    """

    def __init__(self, workdir: Path, keep: int = 3, best_metric: str = "score"):
        ocp = _ocp()
        self.workdir = Path(workdir)
        self.best_metric = best_metric
        self._latest = ocp.CheckpointManager(
            self.workdir / CHECKPOINTS_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
            item_names=("params", "opt_state", "meta"),
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
        ocp = _ocp()
        self._latest.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def save_best(self, step: int, params: Params, meta: dict[str, Any], score: float) -> None:
        ocp = _ocp()
        self._best.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)
            ),
            metrics={self.best_metric: float(score)},
            force=True,
        )

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any):
        """``(params, opt_state, meta)`` of a training checkpoint, shaped like the targets."""
        ocp = _ocp()
        restored = self._latest.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.params, restored.opt_state, restored.meta

    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._latest.close()
        self._best.close()


def restore_params(workdir: str | Path, which: str = "latest") -> tuple[Params, dict[str, Any]]:
    """Params (as numpy) and meta of a run's ``latest`` or ``best`` checkpoint; no opt state."""
    ocp = _ocp()
    workdir = Path(workdir)
    directory = workdir / (CHECKPOINTS_DIR if which == "latest" else BEST_DIR)
    if which not in ("latest", "best"):
        raise UserError(f"--which: expected latest or best, got {which!r}")
    if not directory.is_dir():
        raise UserError(f"{workdir}: no {directory.name}/ directory: the run saved no checkpoint")
    manager = ocp.CheckpointManager(directory, item_names=("params", "meta"))
    try:
        step = manager.latest_step()
        if step is None:
            raise UserError(
                f"{directory}: holds no complete checkpoint (an interrupted first save?)"
            )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
    finally:
        manager.close()
    params = jax.tree_util.tree_map(np.asarray, restored.params)
    return params, dict(restored.meta)


def check_params_fit(params: Params, expected: Params, source: str) -> None:
    """Raise a clear error when checkpoint params do not fit the model built from config."""
    got = _shape_tree(params)
    want = _shape_tree(expected)
    if got != want:
        missing = sorted(set(_flat(want)) - set(_flat(got)))
        extra = sorted(set(_flat(got)) - set(_flat(want)))
        wrong = sorted(
            k for k in set(_flat(got)) & set(_flat(want)) if _flat(got)[k] != _flat(want)[k]
        )
        detail = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {extra[0]}"
            if extra
            else f"shape of {wrong[0]}"
        )
        raise UserError(
            f"{source}: checkpoint params do not fit the config saved with it ({detail}); "
            "was the run directory mixed with another run?"
        )


def _shape_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), tree)


def _flat(tree: Any) -> dict[str, Any]:
    return {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, tuple)
        )[0]
    }
