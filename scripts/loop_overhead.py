"""Host overhead of the fit loop: ``train_loop`` with its hooks against a bare loop of the
same jitted step over the same batches (tiny model, so any per-step host cost shows).

    python scripts/loop_overhead.py --steps 200 --rounds 5

A/B alternating rounds from one compiled step and one starting state; prints one JSON line
with the medians and their ratio (goal <= 1.1). The fit loop's numbers include its hooks:
the window read-back every ``train.log_every`` steps and one checkpoint at the end. Each
round also runs both loops for half the steps: the difference between the two lengths is
the cost per step with the one-off costs of a run (its final checkpoint, the writers)
cancelled, reported as ``per_step_ratio``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from mtl_jax.checkpoint import Checkpointer
from mtl_jax.config_io import apply_overrides
from mtl_jax.data import prefetch
from mtl_jax.hooks import default_hooks
from mtl_jax.loop import train_loop
from mtl_jax.presets import preset
from mtl_jax.run_setup import Run, setup_run


def _config(steps: int, batch_size: int, log_every: int, extra: tuple[str, ...] = ()):
    return apply_overrides(
        preset("demo"),
        [
            'model.backbone="tiny"',
            "model.max_length=16",
            'train.freeze="none"',
            f"data.synthetic_train_rows={steps * batch_size}",
            "data.synthetic_dev_rows=0",
            "train.epochs=1",
            f"train.batch_size={batch_size}",
            f"train.log_every={log_every}",
            f"train.eval_every={10 * steps}",
            f"train.checkpoint_every={10 * steps}",
            *extra,
        ],
    )


def _fresh(run: Run, start_state, workdir: Path, n_steps: int | None = None) -> Run:
    """The same compiled steps from the same starting state, in a new run directory."""
    state = jax.tree.map(jnp.copy, start_state)
    checkpointer = Checkpointer(workdir, 1, "score", config=run.config)
    return dataclasses.replace(
        run,
        state=state,
        workdir=workdir,
        checkpointer=checkpointer,
        n_steps=n_steps or run.n_steps,
    )


def _time_fit_loop(run: Run) -> float:
    hooks = default_hooks(run, progress=False)
    started = time.perf_counter()
    result = train_loop(run, hooks, handle_signals=False)
    jax.block_until_ready(result.state)
    return time.perf_counter() - started


def _time_bare_loop(run: Run) -> float:
    state = run.state
    started = time.perf_counter()
    for step, batch in enumerate(prefetch(run.batches())):
        if step >= run.n_steps:
            break
        state, _ = run.train_step(state, run.train_batch(batch), run.train_key)
    jax.block_until_ready(state)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="config overrides, K=V")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = setup_run(
            _config(args.steps, args.batch_size, args.log_every, tuple(args.set)), root / "setup"
        )
        start_state = jax.tree.map(jnp.copy, run.state)
        _time_bare_loop(_fresh(run, start_state, root / "warm"))  # compile every bucket
        n, half = run.n_steps, run.n_steps // 2
        times: dict[tuple[str, int], list[float]] = {}
        for i in range(args.rounds):
            for steps in (n, half):
                for name, timer in (("fit", _time_fit_loop), ("bare", _time_bare_loop)):
                    fresh = _fresh(run, start_state, root / f"{name}{i}-{steps}", steps)
                    times.setdefault((name, steps), []).append(timer(fresh))
    med = {key: statistics.median(value) for key, value in times.items()}
    per_step = {name: (med[name, n] - med[name, half]) / (n - half) for name in ("fit", "bare")}
    print(
        json.dumps(
            {
                "steps": n,
                "fit_loop_ms_per_step": round(1e3 * med["fit", n] / n, 3),
                "bare_loop_ms_per_step": round(1e3 * med["bare", n] / n, 3),
                "ratio": round(med["fit", n] / med["bare", n], 3),
                "fit_ms_per_extra_step": round(1e3 * per_step["fit"], 3),
                "bare_ms_per_extra_step": round(1e3 * per_step["bare"], 3),
                "per_step_ratio": round(per_step["fit"] / per_step["bare"], 3),
                "rounds": args.rounds,
            }
        )
    )


if __name__ == "__main__":
    main()
