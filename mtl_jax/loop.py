"""The fit loop: step, then hooks.

:func:`fit` sets a run up (:mod:`mtl_jax.run_setup`), then :func:`train_loop` applies the
jitted step to each batch of the stream and hands the result to the hooks
(:mod:`mtl_jax.hooks`: logging, progress, evaluation with the best checkpoint and early
stopping, checkpoints). The state flows through the loop explicitly; a signal or a hook's
stop reason ends it after the hooks of that step ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from mtl_jax.config import Config
from mtl_jax.data import prefetch
from mtl_jax.encoder import Backbone
from mtl_jax.errors import UserError
from mtl_jax.evaluate import Scores
from mtl_jax.hooks import EvalHook, Hook, StepInfo, StopFlag, default_hooks
from mtl_jax.metrics_log import Window
from mtl_jax.model import MultiTaskModel
from mtl_jax.profiling import StepProfiler, profile_dir
from mtl_jax.run_setup import Run, RunData, setup_run
from mtl_jax.train import TrainState


@dataclasses.dataclass
class FitResult:
    state: TrainState
    config: Config
    model: MultiTaskModel
    eval: Scores  # the last evaluation (empty without dev data)
    steps: int
    stopped: str  # "done", "early_stopping", "signal"
    signum: int = 0  # with stopped == "signal": SIGINT or SIGTERM (the CLI exits 128 + signum)


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
    profile: tuple[int, int] | None = None,
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
      profile: ``(start, end)``: a JAX profiler trace of steps ``start..end`` (numbered as
        in ``metrics.jsonl``, from 1) in ``<workdir>/profile`` (see :mod:`mtl_jax.profiling`).

    Returns:
      The final state, the resolved config and model, the last evaluation and why it ended.
    """
    run = setup_run(config, workdir, backbone=backbone, run_data=run_data, mesh=mesh)
    hooks = default_hooks(run, progress=progress, on_step=on_step)
    return train_loop(run, hooks, handle_signals=handle_signals, profile=profile)


def train_loop(
    run: Run,
    hooks: Sequence[Hook],
    *,
    handle_signals: bool = True,
    profile: tuple[int, int] | None = None,
) -> FitResult:
    """Apply ``run.train_step`` from ``run.start`` to ``run.n_steps``, hooks after each step."""
    signals = StopFlag(handle_signals)
    profiler = StepProfiler(*profile, profile_dir(run.workdir)) if profile else None
    state, step, window, stopped = run.state, run.start, Window(), "done"

    def info() -> StepInfo:
        return StepInfo(step, state, window, run.steps_per_epoch, run.n_steps, signals)

    with contextlib.ExitStack() as closing:
        closing.callback(signals.restore)
        if profiler is not None:
            closing.callback(profiler.close)
        for hook in hooks:
            closing.callback(hook.close)  # run last to first, each even if another raised
        for batch in prefetch(run.batches()):
            if step >= run.n_steps:
                break
            examples = int((batch["index"] >= 0).sum())
            if profiler is not None:
                profiler.before(step + 1)
            state, metrics = run.train_step(state, run.train_batch(batch), run.train_key)
            step += 1
            if profiler is not None:
                profiler.after(step, metrics)
            window.add(metrics, examples)
            step_info = info()  # one view of this step for every hook
            reasons = [reason for hook in hooks if (reason := hook(step_info))]
            if signals.raised or reasons:
                stopped = "signal" if signals.raised else reasons[0]
                break
        if step == run.start and run.start < run.n_steps:
            raise UserError("the training data gave no batches")
        for hook in hooks:
            hook.finish(info())
    last_eval = next((h.last for h in hooks if isinstance(h, EvalHook)), {})
    return FitResult(state, run.config, run.model, last_eval, step, stopped, signals.signum)
