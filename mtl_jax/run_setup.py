"""Everything a run needs before its first step: data, model, optimiser, state, steps.

Resume order: a checkpoint in ``<workdir>/checkpoints`` (params, optimiser state, step and
data position), else the pretrained backbone with fresh heads. Rerunning the same command
on a workdir therefore continues where it stopped and ends with the same parameters as an
uninterrupted run: the data order is a pure function of (seed, epoch), and each step's
dropout key is ``fold_in(train_key, step)``.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
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
from mtl_jax.model import MultiTaskModel, build_model, init_params
from mtl_jax.synthetic import GENRE_CUES, SENTIMENT_CUES, make_rows
from mtl_jax.train import (
    TrainState,
    create_train_state,
    init_train_params,
    make_eval_step,
    make_train_step,
)

MIN_FREE_BYTES = 200 * 2**20  # refuse to start a run that could not write a checkpoint


@dataclasses.dataclass(frozen=True)
class RunData:
    """The config with labels resolved, and the tokenised train and dev sets."""

    config: Config
    train: data_lib.Dataset
    dev: data_lib.Dataset | None


def load_run_data(config: Config, tokenizer: Any) -> RunData:
    """Resolve labels and class weights; read (or generate) the train and dev sets.

    The data layer returns the labels (from the train files) and the class weights (from
    the train labels) as plain data; the config that records them is made here.
    ``data.skip_empty`` drops rows with an empty text instead of refusing the file.
    """
    if config.data.synthetic_train_rows > 0:
        _check_synthetic_tasks(config)
        train = data_lib.dataset_from_rows(
            make_rows(config.data.synthetic_train_rows, seed=1), config, tokenizer, "synthetic"
        )
        dev = None
        if config.data.synthetic_dev_rows > 0:
            rows = make_rows(config.data.synthetic_dev_rows, seed=2)
            dev = data_lib.dataset_from_rows(rows, config, tokenizer, "synthetic-dev")
        return RunData(with_class_weights(config, train), train, dev)
    skip_empty = config.data.skip_empty
    config = config.with_labels(data_lib.labels_from_files(config, skip_empty))
    train = data_lib.load_task_datasets(config, tokenizer, "train", skip_empty)
    dev = None
    if any(t.dev_file for t in config.tasks):
        dev = data_lib.load_task_datasets(config, tokenizer, "dev", skip_empty)
    return RunData(with_class_weights(config, train), train, dev)


def with_class_weights(config: Config, train: data_lib.Dataset) -> Config:
    """The config recording the class weights each task trains with (balanced -> explicit)."""
    weights = data_lib.class_weights_from(config, train)
    tasks = tuple(
        t if weights[t.name] is None else dataclasses.replace(t, class_weights=weights[t.name])
        for t in config.tasks
    )
    return dataclasses.replace(config, tasks=tasks)


def _check_synthetic_tasks(config: Config) -> None:
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


def run_keys(config: Config) -> tuple[jax.Array, jax.Array]:
    """``(init_key, train_key)``: the initial weights (the heads'; a random backbone's too)
    and the steps' dropout stream.

    Both come from ``train.seed``; ``train.init_seed`` (when >= 0) takes the init key from
    its own seed instead, so runs that differ in data order and dropout (their seeds) can
    start from one set of weights, which averaging their params needs (model soups).
    """
    init_key, train_key = jax.random.split(jax.random.key(config.train.seed))
    if config.train.init_seed >= 0:
        init_key = jax.random.split(jax.random.key(config.train.init_seed))[0]
    return init_key, train_key


def total_steps(config: Config, steps_per_epoch: int) -> int:
    """The run's length: ``epochs`` epochs, capped by ``max_steps`` when that is set."""
    by_epochs = config.train.epochs * steps_per_epoch
    if config.train.max_steps > 0:
        return min(by_epochs, config.train.max_steps) if by_epochs else config.train.max_steps
    return by_epochs


@dataclasses.dataclass
class Run:
    """A run ready for its loop: the state to continue from and the steps to apply."""

    config: Config  # labels and class weights resolved
    workdir: Path
    model: MultiTaskModel
    data: RunData
    mesh: jax.sharding.Mesh
    main: bool  # this process logs and writes the run files
    state: TrainState
    start: int  # the step the state is at
    resumed: bool
    restored_meta: dict[str, Any]  # the checkpoint's meta ({} on a fresh start)
    steps_per_epoch: int
    n_steps: int
    train_key: jax.Array
    checkpointer: Checkpointer
    train_step: Callable
    eval_step: Callable
    train_batch: Callable[[dict], dict]  # a stream batch -> what train_step reads
    eval_batch: Callable[[dict], dict]  # a dev batch -> what eval_step reads

    def batches(self) -> data_lib.BatchStream:
        """The training stream from the state's step (a pure function of seed and step)."""
        epochs = math.ceil(self.n_steps / self.steps_per_epoch)
        position = data_lib.stream_state(self.data.train, self.config, self.start)
        return data_lib.BatchStream(self.data.train, self.config, position, epochs=epochs)

    def stream_position(self, step: int) -> dict[str, int]:
        """Where the stream is after ``step`` steps (saved with each checkpoint)."""
        return data_lib.stream_state(self.data.train, self.config, step)


def setup_run(
    config: Config,
    workdir: str | Path,
    *,
    backbone: Backbone | None = None,
    run_data: RunData | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Run:
    """Validate, load data and model, restore the newest checkpoint, build the steps.

    See :func:`mtl_jax.loop.fit` for the arguments.
    """
    config.validate()
    parallel.maybe_initialize_distributed(config.parallel.distributed)  # before other JAX
    mesh = mesh if mesh is not None else parallel.make_mesh()
    parallel.check_batch_sizes(config.train.batch_size, config.data.eval_batch_size, mesh.size)
    main = parallel.is_main_process()

    workdir = Path(workdir)
    check_workdir(workdir)
    backbone = backbone or load_backbone(config.model.backbone)
    run_data = run_data or load_run_data(config, backbone.tokenizer)
    config = run_data.config
    model = build_model(config, backbone)  # its config errors before the workdir holds a run
    if main:
        write_run_files(workdir, config, backbone.bert_config, backbone.tokenizer)

    init_key, train_key = run_keys(config)
    spe = data_lib.steps_per_epoch(run_data.train, config)
    n_steps = total_steps(config, spe)
    params = init_train_params(init_params(model, init_key, backbone), config)
    optimizer = make_optimizer(config.train, params, steps_per_epoch=spe, total_steps=n_steps)
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints, "score", config=config)
    state, meta, resumed = _initial_state(
        create_train_state(params, optimizer), checkpointer, mesh, config.parallel.fsdp
    )
    train_step, eval_step, train_batch, eval_batch = _steps(
        model, optimizer, config, run_data, state, mesh
    )
    return Run(
        config=config,
        workdir=workdir,
        model=model,
        data=run_data,
        mesh=mesh,
        main=main,
        state=state,
        start=int(state.step),
        resumed=resumed,
        restored_meta=meta,
        steps_per_epoch=spe,
        n_steps=n_steps,
        train_key=parallel.place_state(train_key, mesh),
        checkpointer=checkpointer,
        train_step=train_step,
        eval_step=eval_step,
        train_batch=train_batch,
        eval_batch=eval_batch,
    )


def _initial_state(
    fresh: TrainState, checkpointer: Checkpointer, mesh: jax.sharding.Mesh, fsdp: bool
) -> tuple[TrainState, dict[str, Any], bool]:
    """The newest checkpoint's state on this mesh, else ``fresh``; with its meta."""
    state = parallel.place_state(fresh, mesh, fsdp)
    latest = checkpointer.latest_step()
    if latest is None:
        return state, {}, False
    # Targets carry this mesh's shardings: a checkpoint of any device count fits.
    target = parallel.abstract_state(state, mesh, fsdp)
    params, opt_state, meta = checkpointer.restore(latest, target.params, target.opt_state)
    state = TrainState(step=jnp.asarray(latest, jnp.int32), params=params, opt_state=opt_state)
    checkpointer.forget_best_after(latest)
    return parallel.place_state(state, mesh, fsdp), meta, True


def _steps(model, optimizer, config: Config, run_data: RunData, state: TrainState, mesh):
    """The train and eval steps, and the batch transforms that feed them.

    A frozen, deterministic backbone is a fixed function: each dataset is embedded once and
    the heads train from the cache (same state, same metrics, a fraction of the cost).
    """
    forward = None
    train_cache = dev_cache = None
    if features.can_cache(config):
        forward = features.cached_forward(model, config)
        train_cache = features.cache_embeddings(model, state.params, run_data.train, config)
        if run_data.dev is not None:
            dev_cache = features.cache_embeddings(model, state.params, run_data.dev, config)
    train_step = make_train_step(model, optimizer, config, forward)
    eval_step = make_eval_step(model, config, forward)
    return (
        train_step,
        eval_step,
        _batch_transform(train_cache, mesh),
        _batch_transform(dev_cache, mesh),
    )


def _batch_transform(cache: np.ndarray | None, mesh: jax.sharding.Mesh):
    """Swap in cached embeddings (when caching) and split the batch over the mesh."""

    def transform(batch: dict) -> dict:
        if cache is not None:
            batch = features.cached_batch(batch, cache, keep=features.STEP_KEYS)
        return parallel.shard_batch(batch, mesh)

    return transform
