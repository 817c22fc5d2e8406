"""A profiler over a range of steps: one JAX trace that TensorBoard and Perfetto can read.

Tracing every step of a run costs memory and makes traces too large to open, and the first
steps are dominated by compiles; so a run traces only the steps a user names
(``--profile START:END``). :class:`StepProfiler` starts ``jax.profiler`` before step START,
stops it after step END and marks every traced step with a ``StepTraceAnnotation``, which is
what TensorBoard's profile plugin (xprof) uses to split a trace into steps.

``jax.profiler.start_trace(logdir)`` writes ``<logdir>/plugins/profile/<run>/<host>.xplane.pb``
(open it with ``tensorboard --logdir <logdir>`` and the profile plugin, or xprof) and
``<host>.trace.json.gz`` beside it (Chrome trace format: ``ui.perfetto.dev`` opens it).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import jax

from mtl_jax.errors import UserError

PROFILE_SUBDIR = "profile"
_RANGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_profile_range(text: str, flag: str = "--profile") -> tuple[int, int]:
    """``"START:END"`` -> ``(start, end)``: the first and the last traced step, inclusive.

    Args:
      text: the flag's value, two non-negative integers with ``END >= START``.
      flag: the flag's name, for the error message.

    Returns:
      ``(start, end)``.

    Raises:
      UserError: naming the flag, the value and the expected form.
    """
    match = _RANGE.match(str(text))
    if match is None:
        raise UserError(
            f"{flag} {text!r}: expected START:END, two step numbers such as 10:20 "
            "(the first and the last traced step)"
        )
    start, end = int(match.group(1)), int(match.group(2))
    if end < start:
        raise UserError(f"{flag} {text!r}: END must be >= START (expected START:END, e.g. 10:20)")
    return start, end


def profile_dir(workdir: str | os.PathLike) -> str:
    """Where a run's trace goes: ``<workdir>/profile`` (a TensorBoard ``--logdir``)."""
    return os.path.join(os.fspath(workdir), PROFILE_SUBDIR)


class StepProfiler:
    """Traces steps ``start..end`` (inclusive) of a loop into ``logdir``, once.

    Call protocol, for each step number ``step`` of the loop, in order::

        profiler.before(step)                # starts the trace at the first step in range
        state, metrics = train_step(state, batch, key)
        profiler.after(step, metrics)        # at step >= end: waits for metrics, stops
        ...
        profiler.close()                     # at exit (also on error): stops an open trace

    or ``with profiler.step(step): ...`` around the step (no wait on its outputs).
    The trace starts at the first step with ``start <= step <= end``, so a run resumed
    inside the range still traces the rest of it; steps before or after the range run
    without any profiler call. Only one trace per profiler: it never restarts.

    Args:
      start: the first traced step.
      end: the last traced step (``>= start``).
      logdir: the trace's directory (TensorBoard ``--logdir``); created by jax.
      name: the step annotation's name (``"train"``: TensorBoard's step view).
    """

    def __init__(self, start: int, end: int, logdir: str | os.PathLike, name: str = "train"):
        if not 0 <= start <= end:
            raise ValueError(f"StepProfiler: need 0 <= start <= end, got {start}:{end}")
        self.start, self.end, self.logdir, self.name = start, end, os.fspath(logdir), name
        self.active = False
        self.done = False
        self._annotation: Any = None

    def before(self, step: int) -> None:
        """Start the trace if ``step`` is the first one in range; open the step's annotation."""
        if not self.active and not self.done and self.start <= step <= self.end:
            jax.profiler.start_trace(self.logdir)
            self.active = True
        if self.active:
            self._annotation = jax.profiler.StepTraceAnnotation(self.name, step_num=step)
            self._annotation.__enter__()

    def after(self, step: int, outputs: Any = None) -> None:
        """Close the step's annotation; after step ``end``, wait for ``outputs`` and stop.

        Steps are dispatched asynchronously: pass the step's outputs (e.g. its metrics) so
        the trace holds the device work of the last step, not only its dispatch.
        """
        if self._annotation is not None:
            annotation, self._annotation = self._annotation, None
            annotation.__exit__(None, None, None)
        if self.active and step >= self.end:
            if outputs is not None:
                jax.block_until_ready(outputs)
            self._stop()

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """``before(step)``, the block, ``after(step)`` (also if the block raises)."""
        self.before(step)
        try:
            yield
        finally:
            self.after(step)

    def close(self) -> None:
        """Stop a trace still open (the loop ended, or failed, before step ``end``)."""
        if self._annotation is not None:
            annotation, self._annotation = self._annotation, None
            annotation.__exit__(None, None, None)
        if self.active:
            self._stop()

    def _stop(self) -> None:
        """Stop the trace; jax writes it out here, so this is where its cost falls."""
        self.active, self.done = False, True
        jax.profiler.stop_trace()

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
