"""Measuring: compile counts, step timing, memory, the machine, and the PyTorch baseline.

Nothing here asserts anything about speed: benchmarks report, tests check.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_s",
}


# -- measuring -----------------------------------------------------------------------------


class CompileLog:
    """Counts XLA compilations and their time while installed (``jax.monitoring`` events).

    Each backend compile is one distinct (function, shapes) program.
    """

    def __init__(self):
        self.totals = dict.fromkeys(_COMPILE_EVENTS.values(), 0.0)
        self.compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        name = _COMPILE_EVENTS.get(event)
        if name is None:
            return
        self.totals[name] += duration
        self.compiles += name == "backend_s"

    @contextlib.contextmanager
    def count(self) -> Iterator[dict[str, float]]:
        """Yields a dict filled on exit: ``compiles`` and ``compile_s`` inside the block."""
        before, n = dict(self.totals), self.compiles
        out: dict[str, float] = {}
        try:
            yield out
        finally:
            out["compiles"] = self.compiles - n
            out["compile_s"] = sum(self.totals[k] - before[k] for k in self.totals)


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Count, min, median and max of a list of times."""
    return {
        "n": len(times),
        "min": min(times),
        "median": statistics.median(times),
        "max": max(times),
    }


def step_summary(times: Sequence[float], steps: int, sync: bool) -> dict[str, float]:
    """:func:`summarize` of per-step times, or the mean step of one pipelined total."""
    if sync:
        return summarize(times)
    return {"n": steps, **dict.fromkeys(("min", "median", "max"), times[0] / steps)}


def time_steps(
    step: Callable[[Any, dict], tuple[Any, dict]],
    state: Any,
    batches: Iterable[dict],
    sync: bool = True,
) -> tuple[Any, list[float], list[dict]]:
    """Run ``step`` over ``batches``; per-step wall times, each from asking for the batch
    to the step's result (so a data pipeline that cannot keep up shows).

    With ``sync=False`` steps are only dispatched and the loop waits once at the end: the
    returned times are then one total, the pipelined cost of all steps.
    """
    times, fed = [], []
    batches = iter(batches)
    t_all = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        state, metrics = step(state, batch)
        if sync:
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
        fed.append(batch)
    if not sync:
        jax.block_until_ready(state)
        times = [time.perf_counter() - t_all]
    return state, times, fed


def token_counts(batches: Sequence[dict]) -> dict[str, int]:
    """Real (unmasked) and padded token counts over batches, for padding shares."""
    real_tokens = sum(int(np.asarray(b["attention_mask"]).sum()) for b in batches)
    padded = sum(int(np.asarray(b["attention_mask"]).size) for b in batches)
    return {"real_tokens": real_tokens, "padded_tokens": padded}


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_name() -> str:
    """``platform:kind`` of the first device, so result lines say where they ran."""
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '') or d}"


# -- the PyTorch baseline --------------------------------------------------------------------


def bench_dir() -> str:
    """``$BENCH_DIR``, else ``../shared/bench`` beside the repository (as the scripts sit)."""
    if os.environ.get("BENCH_DIR"):
        return os.environ["BENCH_DIR"]
    repo = Path(__file__).resolve().parents[2]  # scripts/bench/measure.py
    return str(repo.parent / "shared" / "bench")


def run_baseline(python: str, script: str, args: Sequence[str], timeout: float = 3600) -> dict:
    """Run a shared baseline script with another interpreter; its one JSON line, parsed."""
    path = os.path.join(bench_dir(), script)
    # Through a shell that forks: a child of this (large) process would inherit its peak RSS
    # in ru_maxrss, and the baseline's reported peak memory would be ours.
    command = ["sh", "-c", '"$0" "$@"; exit $?', python, path, *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}): {tail}")
    return json.loads(lines[-1])


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours / theirs``, or None when either is missing, zero or not finite."""
    if not ours or not theirs or not math.isfinite(ours) or not math.isfinite(theirs):
        return None
    return ours / theirs
