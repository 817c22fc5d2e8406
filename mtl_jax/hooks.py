"""What the fit loop does after each step: logging, progress, evaluation, checkpoints.

A hook is called after every step with a :class:`StepInfo` and decides itself whether it is
due (levanter's ``add_hook(fn, every=N)``, CLU's periodic actions). It returns a reason to
stop (``"early_stopping"``) or None; ``finish`` runs once after the last step of a run that
was not interrupted by an error, ``close`` always. Everything a hook reads comes in through
its constructor or the step info; nothing closes over the loop's variables.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from typing import Any

from mtl_jax import parallel
from mtl_jax.checkpoint import Checkpointer
from mtl_jax.ema import eval_params
from mtl_jax.evaluate import Scores, evaluate_dataset, score_of, weighted_loss
from mtl_jax.metrics_log import MetricsLogger, NoLogger, Window
from mtl_jax.run_setup import Run
from mtl_jax.train import TrainState

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency
    tqdm = None


class StopFlag:
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


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """The loop's state after a step, as every hook sees it."""

    step: int  # steps done
    state: TrainState
    window: Window  # device metrics since the last log
    steps_per_epoch: int
    n_steps: int
    signals: StopFlag

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    @property
    def epoch_end(self) -> bool:
        return self.step % self.steps_per_epoch == 0 or self.step == self.n_steps

    @property
    def stopping(self) -> bool:
        """A signal asked the run to stop: save and log now."""
        return self.signals.raised


class Hook:
    """Base hook: due never, finishes and closes with nothing to do."""

    def __call__(self, info: StepInfo) -> str | None:
        return None

    def finish(self, info: StepInfo) -> None:
        pass

    def close(self) -> None:
        pass


class CallbackHook(Hook):
    """``fn(step)`` after every step (tests use it to crash a run at a chosen step)."""

    def __init__(self, fn: Callable[[int], None]):
        self.fn = fn

    def __call__(self, info: StepInfo) -> None:
        self.fn(info.step)


class Progress:
    """A tqdm bar on stderr showing loss and examples/s (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled and tqdm is not None:
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


class LogHook(Hook):
    """Every ``every`` steps, at epoch ends and on a signal: the train event and the bar.

    Flushing the window reads the metrics back and raises ``TrainingError`` on a
    non-finite loss.
    """

    def __init__(self, logger: MetricsLogger | NoLogger, bar: Progress, every: int):
        self.logger, self.bar, self.every = logger, bar, every

    def __call__(self, info: StepInfo) -> None:
        if info.step % self.every == 0 or info.epoch_end or info.stopping:
            summary = info.window.flush(info.step)
            skipped = summary.get("skipped", 0)
            self.logger.log(
                info.step, info.epoch, "train", summary["loss"], summary["tasks"], skipped=skipped
            )
            self.bar.update_to(info.step, summary)

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


class Tracker:
    """Best score so far and evaluations without improvement (saved in checkpoint meta)."""

    def __init__(self, patience: int, best: float | None = None, bad: int = 0):
        self.patience, self.best, self.bad = patience, best, bad

    @classmethod
    def from_meta(cls, meta: dict[str, Any], patience: int) -> Tracker:
        return cls(patience, meta.get("best_score"), int(meta.get("evals_without_gain", 0)))

    def to_meta(self) -> dict[str, Any]:
        return {"best_score": self.best, "evals_without_gain": self.bad}

    def update(self, score: float) -> bool:
        """Record a score; True when it is the best so far."""
        if self.best is None or score > self.best:
            self.best, self.bad = score, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience


class EvalHook(Hook):
    """Every ``every`` steps and at epoch ends: dev scores, the best checkpoint, early stop."""

    def __init__(self, run: Run, logger: MetricsLogger | NoLogger, tracker: Tracker, every: int):
        self.run, self.logger, self.tracker, self.every = run, logger, tracker, every
        self.last: Scores = {}

    def __call__(self, info: StepInfo) -> str | None:
        if self.run.data.dev is None or not (info.step % self.every == 0 or info.epoch_end):
            return None
        run, config = self.run, self.run.config
        params = eval_params(info.state.params, info.state.opt_state)  # the EMA if kept
        scores = evaluate_dataset(run.eval_step, params, run.data.dev, config, run.eval_batch)
        self.logger.log(info.step, info.epoch, "dev", weighted_loss(scores, config), scores)
        if self.tracker.update(score_of(scores, config.train.best_metric)):
            meta = {"step": info.step, "scores": scores}
            if params is not info.state.params:
                meta["weights"] = "ema"
            params = parallel.host_copy(params)
            run.checkpointer.save_best(info.step, params, meta, self.tracker.best)
        self.last = scores
        return "early_stopping" if self.tracker.should_stop else None


class CheckpointHook(Hook):
    """Every ``every`` steps, at the last step and on a signal (and at the end if not yet):
    params, optimiser state, data position and the tracker's state."""

    def __init__(self, run: Run, checkpointer: Checkpointer, tracker: Tracker, every: int):
        self.run, self.checkpointer, self.tracker, self.every = run, checkpointer, tracker, every

    def __call__(self, info: StepInfo) -> None:
        if info.step % self.every == 0 or info.step == info.n_steps or info.stopping:
            self._save(info)

    def finish(self, info: StepInfo) -> None:
        if self.checkpointer.latest_step() != info.step:
            self._save(info)

    def _save(self, info: StepInfo) -> None:
        info.window.check_finite(info.step)  # never checkpoint a non-finite state
        meta = {
            "step": info.step,
            "data": self.run.stream_position(info.step),
            **self.tracker.to_meta(),
        }
        # Host copies: the next step donates (frees) the device buffers an async save reads;
        # numpy, so a checkpoint holds no device layout and restores on any mesh.
        params = parallel.host_copy(info.state.params)
        opt_state = parallel.host_copy(info.state.opt_state)
        self.checkpointer.save(info.step, params, opt_state, meta)

    def close(self) -> None:
        self.checkpointer.close()  # waits for the last save; raises if a write failed


def default_hooks(
    run: Run, *, progress: bool = True, on_step: Callable[[int], None] | None = None
) -> list[Hook]:
    """The hooks of ``mtl-jax train``, in the order they run after each step."""
    train = run.config.train
    logger = MetricsLogger(run.workdir, run.start if run.resumed else None) if run.main else None
    logger = logger or NoLogger()
    tracker = Tracker.from_meta(run.restored_meta, train.early_stopping_patience)
    hooks: list[Hook] = [CallbackHook(on_step)] if on_step is not None else []
    bar = Progress(progress and run.main, run.n_steps, run.start)
    hooks.append(LogHook(logger, bar, train.log_every))
    hooks.append(EvalHook(run, logger, tracker, train.eval_every))
    hooks.append(CheckpointHook(run, run.checkpointer, tracker, train.checkpoint_every))
    return hooks
