"""An exponential moving average (EMA) of the params, kept in the optimiser state.

Fine-tuning scores jump from one evaluation to the next (SST-2 dev by up to 2 points 1,000
steps apart); the EMA of the weights is the usual remedy and is what ``train.ema_decay > 0``
evaluates, keeps as ``best/`` and exports. It lives in the optimiser state, as the last
transformation of the chain, so the train step stays one pure update, and resuming,
donation and sharding (leaf by leaf, like the params) need nothing new.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class EmaState(NamedTuple):
    """``ema``: the params' moving average, the same tree, shapes and dtypes."""

    ema: Any


def params_ema(decay: float) -> optax.GradientTransformation:
    """Updates pass through unchanged; the state tracks ``ema += (1 - decay) * (new - ema)``.

    ``new`` is the params after this step's update, so this must be the last link of an
    ``optax.chain``. It starts at the initial params (pretrained weights are a meaningful
    start, so no bias correction); written as a step towards ``new``, an EMA of a param
    that never changes (a frozen group) stays bit-identical to it.
    """
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1), got {decay}")

    def init(params):
        # A copy: the state is donated with the params, and one buffer cannot be both.
        return EmaState(ema=jax.tree.map(lambda p: jnp.array(p, copy=True), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("params_ema needs the params: call update(updates, state, params)")
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: e + ((1 - decay) * (p - e)).astype(e.dtype), state.ema, new)
        return updates, EmaState(ema=ema)

    return optax.GradientTransformation(init, update)


def find_ema(opt_state: Any) -> Any | None:
    """The params' EMA inside an optimiser state however it is wrapped, else None."""
    found = [
        s.ema
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
        if isinstance(s, EmaState)
    ]
    if len(found) > 1:
        raise ValueError(
            f"expected at most one EmaState in the optimiser state, found {len(found)}"
        )
    return found[0] if found else None


def eval_params(params: Any, opt_state: Any) -> Any:
    """The params a run evaluates and exports: the EMA when it keeps one, else ``params``."""
    ema = find_ema(opt_state)
    return params if ema is None else ema
