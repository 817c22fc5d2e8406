"""Test helper: the ``mtl-jax`` CLI, sending itself a signal at a chosen point of a run.

    python tests/signal_cli.py POINT STEP SIGNAL -- <mtl-jax arguments>

POINT is where the signal goes off:

* ``step``: right after train step STEP is dispatched (it may still be running);
* ``eval``: after the first batch of the evaluation that follows step STEP;
* ``save``: right after the asynchronous checkpoint write of step STEP has started.

At ``step`` and ``eval`` the checkpoint writes already started are let finish first, so a
test knows which checkpoints exist (a kill in the middle of a write is the ``save`` point).

SIGNAL is ``KILL``, ``TERM`` or ``INT``. The package knows nothing of this: the points are
reached by wrapping library functions here, so a test kills a real run at a precise point
without a hook in the library. Used by ``tests/test_resume.py``.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    point, at, name, sep, *argv = sys.argv[1:]
    if point not in ("step", "eval", "save") or sep != "--":
        raise SystemExit(__doc__)
    at, sig = int(at), getattr(signal, "SIG" + name)

    from mtl_jax import checkpoint, cli, hooks, run_setup

    from probes import wait_for_writes

    current = [0]  # the number of the last step dispatched
    checkpointers = []

    def fire(where: str, step: int) -> None:
        if where == point and step == at:
            if where != "save":
                for checkpointer in checkpointers:
                    wait_for_writes(checkpointer)
            os.kill(os.getpid(), sig)

    make_train_step = run_setup.make_train_step

    def patched_make_train_step(*args, **kwargs):
        train_step = make_train_step(*args, **kwargs)

        def step(state, batch, key):
            number = int(state.step) + 1  # read before the call donates the state
            out = train_step(state, batch, key)
            current[0] = number
            fire("step", number)
            return out

        return step

    evaluate_dataset = hooks.evaluate_dataset

    def patched_evaluate_dataset(eval_step, *args, **kwargs):
        def first_batch_fires(params, batch):
            out = eval_step(params, batch)
            fire("eval", current[0])
            return out

        return evaluate_dataset(first_batch_fires, *args, **kwargs)

    init = checkpoint.Checkpointer.__init__

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        checkpointers.append(self)

    save = checkpoint.Checkpointer.save

    def patched_save(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        fire("save", step)

    run_setup.make_train_step = patched_make_train_step
    hooks.evaluate_dataset = patched_evaluate_dataset
    checkpoint.Checkpointer.__init__ = patched_init
    checkpoint.Checkpointer.save = patched_save
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
