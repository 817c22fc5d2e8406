"""The fit loop: data -> jitted steps -> logs, evaluations and Orbax checkpoints.

Resume order: a checkpoint in ``<workdir>/checkpoints`` (params, optimiser state, step and
data position), else the pretrained backbone with fresh heads. Rerunning the same command
on a workdir therefore continues where it stopped and ends with the same parameters as an
uninterrupted run: the data order is a pure function of (seed, epoch), and each step's
dropout key is ``fold_in(train_key, step)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import data as data_lib
from mtl_jax import features, parallel
from mtl_jax.checkpoint import Checkpointer, write_run_files
from mtl_jax.config import Config
from mtl_jax.encoder import Backbone, load_backbone
from mtl_jax.errors import UserError
from mtl_jax.freezing import make_optimizer
from mtl_jax.metrics import summarize
from mtl_jax.model import MultiTaskModel, build_model, init_params
from mtl_jax.synthetic import make_rows
from mtl_jax.train import (
    TrainState,
    create_train_state,
    init_train_params,
    make_eval_step,
    make_train_step,
)

MIN_FREE_BYTES = 200 * 2**20  # refuse to start a run that could not write a checkpoint


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss); the last checkpoint is intact."""


@dataclasses.dataclass(frozen=True)
class RunData:
    """The config with labels resolved, and the tokenised train and dev sets."""

    config: Config
    train: data_lib.Dataset
    dev: data_lib.Dataset | None


def load_run_data(config: Config, tokenizer: Any) -> RunData:
    """Resolve labels and class weights; read (or generate) the train and dev sets."""
    if config.data.synthetic_train_rows > 0:
        _check_synthetic_tasks(config)
        train = data_lib.dataset_from_rows(
            make_rows(config.data.synthetic_train_rows, seed=1), config, tokenizer, "synthetic"
        )
        dev = None
        if config.data.synthetic_dev_rows > 0:
            dev = data_lib.dataset_from_rows(
                make_rows(config.data.synthetic_dev_rows, seed=2),
                config,
                tokenizer,
                "synthetic-dev",
            )
        return RunData(data_lib.resolve_class_weights(config, train), train, dev)
    config = data_lib.resolve_labels(config)
    train = data_lib.load_task_datasets(config, tokenizer, "train")
    dev = None
    if any(t.dev_file for t in config.tasks):
        dev = data_lib.load_task_datasets(config, tokenizer, "dev")
    return RunData(data_lib.resolve_class_weights(config, train), train, dev)


def _check_synthetic_tasks(config: Config) -> None:
    from mtl_jax.synthetic import GENRE_CUES, SENTIMENT_CUES

    known = {"genre": set(GENRE_CUES), "sentiment": set(SENTIMENT_CUES)}
    for task in config.tasks:
        if task.label_key not in known or not set(task.labels) <= known[task.label_key]:
            raise UserError(
                f"config key 'tasks.{task.name}': the built-in synthetic data has label columns "
                f"'genre' {sorted(known['genre'])} and 'sentiment' {sorted(known['sentiment'])}"
            )


def check_workdir(workdir: Path) -> None:
    """Fail before any work if the run directory cannot hold logs and checkpoints."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe.{jax.process_index()}"  # one per process
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{workdir}: run directory is not writable ({exc.strerror})") from None
    free = shutil.disk_usage(workdir).free
    if free < MIN_FREE_BYTES:
        raise UserError(
            f"{workdir}: only {free // 2**20} MiB free on its disk; a run needs at least "
            f"{MIN_FREE_BYTES // 2**20} MiB for checkpoints"
        )


@dataclasses.dataclass
class FitResult:
    state: TrainState
    config: Config
    model: MultiTaskModel
    eval: dict[str, dict[str, Any]]  # the last evaluation (empty without dev data)
    steps: int
    stopped: str  # "done", "early_stopping", "signal"
    signum: int = 0  # with stopped == "signal": SIGINT or SIGTERM (the CLI exits 128 + signum)


def total_steps(config: Config, steps_per_epoch: int) -> int:
    by_epochs = config.train.epochs * steps_per_epoch
    if config.train.max_steps > 0:
        return min(by_epochs, config.train.max_steps) if by_epochs else config.train.max_steps
    return by_epochs


def fit(
    config: Config,
    workdir: str | Path,
    *,
    backbone: Backbone | None = None,
    run_data: RunData | None = None,
    progress: bool = True,
    handle_signals: bool = True,
    on_step: Callable[[int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> FitResult:
    """Train (or resume training) the model a config describes, in ``workdir``.

    Args:
      config: the run; validated here.
      workdir: the run directory (see :mod:`mtl_jax.checkpoint` for its layout).
      backbone: an already loaded backbone (else ``config.model.backbone`` is loaded).
      run_data: already loaded data (else read from the config).
      progress: show a progress bar on stderr.
      handle_signals: on SIGINT/SIGTERM, save a checkpoint at the current step and return.
      on_step: called with the step number after each step (tests use it to crash runs).
      mesh: the devices to train on (default :func:`mtl_jax.parallel.make_mesh`: every
        device of every process). Batches are split over it; params and optimiser state
        are replicated, or sharded with ``parallel.fsdp``. With several processes only
        process 0 logs, writes metrics and the run files; all take part in checkpoints.

    Returns:
      The final state, the resolved config and model, the last evaluation and why it ended.
    """
    config.validate()
    # -- devices: before anything else touches JAX -----------------------------------------
    parallel.maybe_initialize_distributed(config.parallel.distributed)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    parallel.check_batch_sizes(config.train.batch_size, config.data.eval_batch_size, mesh.size)
    main = parallel.is_main_process()
    fsdp = config.parallel.fsdp

    workdir = Path(workdir)
    check_workdir(workdir)
    backbone = backbone or load_backbone(config.model.backbone)
    run_data = run_data or load_run_data(config, backbone.tokenizer)
    config = run_data.config
    if main:
        write_run_files(workdir, config, backbone.bert_config, backbone.tokenizer)

    model = build_model(config, backbone)
    init_key, train_key = jax.random.split(jax.random.key(config.train.seed))
    spe = data_lib.steps_per_epoch(run_data.train, config)
    n_steps = total_steps(config, spe)
    params = init_train_params(init_params(model, init_key, backbone), config)
    optimizer = make_optimizer(config.train, params, steps_per_epoch=spe, total_steps=n_steps)
    state = parallel.place_state(create_train_state(params, optimizer), mesh, fsdp)
    train_key = parallel.place_state(train_key, mesh)

    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints, "score", config=config)
    tracker = _Tracker(patience=config.train.early_stopping_patience)
    latest = checkpointer.latest_step()
    if latest is not None:
        # Targets carry this mesh's shardings: a checkpoint of any device count fits.
        target = parallel.abstract_state(state, mesh, fsdp)
        params, opt_state, meta = checkpointer.restore(latest, target.params, target.opt_state)
        state = TrainState(step=jnp.asarray(latest, jnp.int32), params=params, opt_state=opt_state)
        state = parallel.place_state(state, mesh, fsdp)
        tracker = _Tracker.from_meta(meta, config.train.early_stopping_patience)
        checkpointer.forget_best_after(latest)
    start = int(state.step)

    # A frozen, deterministic backbone is a fixed function: embed each dataset once and
    # train the heads from the cache (same state, same metrics, a fraction of the cost).
    train_cache = dev_cache = None
    if features.can_cache(config):
        train_cache = features.cache_embeddings(model, state.params, run_data.train, config)
        if run_data.dev is not None:
            dev_cache = features.cache_embeddings(model, state.params, run_data.dev, config)
        train_step = features.make_cached_train_step(model, optimizer, config)
        eval_step = features.make_cached_eval_step(model, config)
    else:
        train_step = make_train_step(model, optimizer, config)
        eval_step = make_eval_step(model, config)

    resumed_at = start if latest is not None else None
    logger = _MetricsLogger(workdir, resumed_at) if main else _NoLogger()
    stop = _StopFlag(handle_signals)
    stream = data_lib.BatchStream(
        run_data.train,
        config,
        data_lib.stream_state(run_data.train, config, start),
        epochs=math.ceil(n_steps / spe),
    )

    def evaluate(step: int) -> dict[str, dict[str, Any]]:
        if run_data.dev is None:
            return {}
        scores = evaluate_dataset(eval_step, state.params, run_data.dev, config, mesh, dev_cache)
        score = score_of(scores, config.train.best_metric)
        logger.log(step, step / spe, "dev", weighted_loss(scores, config), scores)
        if tracker.update(step, score):
            meta = {"step": step, "scores": scores}
            checkpointer.save_best(step, _host_copy(state.params), meta, score)
        return scores

    def save(step: int) -> None:
        meta = {
            "step": step,
            "data": data_lib.stream_state(run_data.train, config, step),
            **tracker.to_meta(),
        }
        # Host copies: the next step donates (frees) the device buffers an async save reads.
        checkpointer.save(step, _host_copy(state.params), _host_copy(state.opt_state), meta)

    bar = _progress(progress and main, n_steps, start)
    window = _Window()
    last_eval: dict[str, dict[str, Any]] = {}
    stopped = "done"
    step = start
    try:
        for batch in data_lib.prefetch(stream):
            if step >= n_steps:
                break
            examples = int((batch["index"] >= 0).sum())
            if train_cache is not None:
                batch = features.cached_batch(batch, train_cache, keep=("labels", "index"))
            state, metrics = train_step(state, parallel.shard_batch(batch, mesh), train_key)
            step += 1
            window.add(metrics, examples)
            if on_step is not None:
                on_step(step)
            end_of_epoch = step % spe == 0 or step == n_steps
            if step % config.train.log_every == 0 or end_of_epoch or stop.raised:
                summary = window.flush(step)  # raises TrainingError on a non-finite loss
                logger.log(
                    step,
                    step / spe,
                    "train",
                    summary["loss"],
                    summary["tasks"],
                    skipped=summary.get("skipped", 0),
                )
                bar.update_to(step, summary)
            if step % config.train.eval_every == 0 or end_of_epoch:
                last_eval = evaluate(step)
                if tracker.should_stop:
                    stopped = "early_stopping"
            if step % config.train.checkpoint_every == 0 or step == n_steps or stop.raised:
                window.check_finite(step)
                save(step)
            if stopped != "done" or stop.raised:
                stopped = "signal" if stop.raised else stopped
                break
        if step == start and start < n_steps:
            raise UserError("the training data gave no batches")
        if checkpointer.latest_step() != step:
            window.check_finite(step)
            save(step)
    finally:
        bar.close()
        stop.restore()
        try:
            checkpointer.close()  # waits for the last save; raises if a write failed
        finally:
            logger.close()
    return FitResult(state, config, model, last_eval, step, stopped, stop.signum)


def evaluate_dataset(
    eval_step: Callable,
    params: Any,
    dataset: data_lib.Dataset,
    config: Config,
    mesh: jax.sharding.Mesh | None = None,
    cache: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Accuracy, macro-F1, mean loss, count and confusion per task over a labelled dataset.

    With ``mesh``, each batch is split over its devices (see :func:`parallel.shard_batch`);
    with ``cache`` (the dataset's cached embeddings), ``eval_step`` is the cached one.
    """
    totals: dict[str, Any] = {}
    for batch in data_lib.eval_batches(dataset, config):
        if cache is not None:
            batch = features.cached_batch(batch, cache, keep=("labels", "index"))
        if mesh is not None:
            batch = parallel.shard_batch(batch, mesh)
        for task, counts in eval_step(params, batch).items():
            totals[task] = (
                counts if task not in totals else jax.tree.map(jnp.add, totals[task], counts)
            )
    scores = summarize(totals)
    return {t: s for t, s in scores.items() if s["n"] > 0}


def weighted_loss(scores: dict[str, dict[str, Any]], config: Config) -> float | None:
    """The dev counterpart of the train loss: ``sum_t w_t * CE_t`` over the scored tasks.

    Fixed weights only (learned uncertainty weights are a training device, not a measure);
    None when no task was scored.
    """
    weights = {t.name: t.loss_weight for t in config.tasks}
    terms = [weights[t] * s["loss"] for t, s in scores.items() if "loss" in s]
    return float(sum(terms)) if terms else None


def score_of(scores: dict[str, dict[str, Any]], metric: str) -> float:
    """The model-selection score: ``task/metric``, or the mean macro-F1 over tasks."""
    if metric:
        task, _, name = metric.partition("/")
        if task not in scores or name not in scores[task]:
            raise UserError(
                f"config key 'train.best_metric': {metric!r} is not an evaluation metric "
                "(use <task>/accuracy or <task>/macro_f1 of a task with dev data)"
            )
        return float(scores[task][name])
    return float(np.mean([s["macro_f1"] for s in scores.values()])) if scores else 0.0


def _host_copy(tree: Any) -> Any:
    """Full numpy copies (gathered across devices and hosts) for an async save.

    Copies, so donating the state's buffers to the next step cannot touch what is being
    written; numpy, so a checkpoint holds no device layout and restores on any mesh.
    """
    return parallel.host_copy(tree)


class _Tracker:
    """Best score so far and evaluations without improvement (saved in checkpoint meta)."""

    def __init__(self, patience: int, best: float | None = None, bad: int = 0):
        self.patience, self.best, self.bad = patience, best, bad

    @classmethod
    def from_meta(cls, meta: dict[str, Any], patience: int) -> _Tracker:
        return cls(patience, meta.get("best_score"), int(meta.get("evals_without_gain", 0)))

    def to_meta(self) -> dict[str, Any]:
        return {"best_score": self.best, "evals_without_gain": self.bad}

    def update(self, step: int, score: float) -> bool:
        if self.best is None or score > self.best:
            self.best, self.bad = score, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience


class _Window:
    """Device-side metrics of the steps since the last log, read back in one transfer."""

    def __init__(self):
        self.items: list[dict[str, jax.Array]] = []
        self.examples = 0
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, jax.Array], examples: int) -> None:
        self.items.append(metrics)
        self.examples += examples

    def check_finite(self, step: int) -> None:
        """Raise on the first non-finite step not skipped (a small read-back)."""
        flags = jax.device_get([(m["finite"], m["skipped"], m["loss"]) for m in self.items])
        first_step = step - len(flags) + 1
        for offset, (finite, skipped, loss) in enumerate(flags):
            if not bool(finite) and not int(skipped):
                raise TrainingError(
                    f"non-finite loss or gradient at step {first_step + offset} "
                    f"(loss {float(loss)}); the last checkpoint is intact. Lower the "
                    "learning rate, or set train.skip_nonfinite = true to skip such batches"
                )

    def flush(self, step: int) -> dict[str, Any]:
        if not self.items:
            return {"loss": None, "tasks": {}, "examples_per_s": 0.0}
        self.check_finite(step)
        host = jax.device_get(self.items)
        skipped = int(sum(int(m["skipped"]) for m in host))
        # Batches train.skip_nonfinite threw away have no meaningful loss: leave them out.
        host = [m for m in host if not int(m["skipped"])] or host
        elapsed = time.perf_counter() - self.started
        tasks = {}
        for name in sorted({k.split("/")[0] for m in host for k in m if "/" in k}):
            count = sum(int(m[f"{name}/count"]) for m in host)
            correct = sum(int(m[f"{name}/correct"]) for m in host)
            tasks[name] = {
                "loss": float(np.mean([m[f"{name}/loss"] for m in host])),
                "accuracy": correct / count if count else float("nan"),
            }
        summary = {
            "loss": float(np.mean([m["loss"] for m in host])),
            "tasks": tasks,
            "examples_per_s": self.examples / max(elapsed, 1e-9),
            "skipped": skipped,
        }
        self.items, self.examples, self.started = [], 0, time.perf_counter()
        return summary


class _NoLogger:
    """What processes other than the main one log: nothing."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _MetricsLogger:
    """``metrics.jsonl`` (one object per event) and TensorBoard scalars."""

    def __init__(self, workdir: Path, resumed_at: int | None):
        self.path = workdir / "metrics.jsonl"
        if resumed_at is not None and self.path.exists():
            self._drop_events_after(resumed_at)  # steps after the checkpoint are redone
        self.file = self.path.open("a", encoding="utf-8")
        self.tb = None
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # TensorBoard files are optional
            pass

    def _drop_events_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def log(
        self,
        step: int,
        epoch: float,
        split: str,
        loss: float | None,
        tasks: dict,
        skipped: int = 0,
    ) -> None:
        event: dict[str, Any] = {"step": step, "epoch": round(epoch, 4), "split": split}
        if loss is not None:
            event["loss"] = loss
        if skipped:  # batches train.skip_nonfinite threw away since the last event
            event["skipped"] = skipped
        for task, scores in tasks.items():
            for name in ("loss", "accuracy", "macro_f1"):
                if name in scores:
                    event[f"{task}/{name}"] = scores[name]
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in event.items():
                if key not in ("step", "epoch", "split") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and returns at the next step."""

    def __init__(self, enabled: bool):
        self.raised = False
        self.signum = 0
        self.previous: dict[int, Any] = {}
        if enabled:
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.raised:  # a second signal: stop now
            raise KeyboardInterrupt
        self.raised, self.signum = True, signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _progress:
    """A tqdm bar on stderr showing loss and examples/s (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update_to(self, step: int, summary: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        postfix = {"loss": f"{summary['loss']:.4f}", "ex/s": f"{summary['examples_per_s']:.0f}"}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The events of ``<workdir>/metrics.jsonl`` (a line cut by a kill is skipped)."""
    path = Path(workdir) / "metrics.jsonl"
    events = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def epoch_summaries(workdir: str | Path) -> list[dict[str, Any]]:
    """Per epoch: the last train event (loss, accuracy) merged with the dev scores."""
    rows: dict[int, dict[str, Any]] = {}
    for event in read_metrics(workdir):
        if float(event["epoch"]).is_integer():
            row = rows.setdefault(int(event["epoch"]), {"epoch": int(event["epoch"])})
            prefix = "" if event["split"] == "train" else "dev "
            for key, value in event.items():
                if key not in ("step", "epoch", "split"):
                    row[prefix + key] = value
    return [rows[k] for k in sorted(rows)]
