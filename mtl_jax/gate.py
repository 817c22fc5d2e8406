"""The unfreezing gate: parameter groups that open on a step schedule in one compiled step.

:func:`unfreeze_gate` wraps a per-group optimiser (an ``optax.multi_transform``) and zeroes
the gradients and updates of closed groups; the start steps are Python constants and the
clock is an array in the state, so opening a group changes values, not the traced program.
:func:`hold_until` keeps a waiting group's own optimiser state untouched until it opens.
:mod:`mtl_jax.freezing` builds both from a config's freezing schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class GateState(NamedTuple):
    """State of :func:`unfreeze_gate`."""

    count: jax.Array  # int32: optimiser updates applied so far (the schedule's clock)
    grad_norm: jax.Array  # float32: global norm of the trainable gradient, before clipping
    inner_state: optax.OptState


def _is_open(count: jax.Array, start: int | None) -> bool | jax.Array:
    """Python constants where the answer is static, so always-open groups cost nothing."""
    if start is None:
        return False
    if start <= 0:
        return True
    return count >= start


def _apply_gates(tree: Any, labels: Any, gates: Mapping[str, bool | jax.Array]) -> Any:
    """Zero the leaves of closed groups (``where``, so a NaN in a frozen group stays out)."""

    def gate(x, label):
        is_open = gates.get(label, False)
        if is_open is True:
            return x
        if is_open is False:
            return jnp.zeros_like(x)
        return jnp.where(is_open, x, jnp.zeros_like(x))

    return jax.tree.map(gate, tree, labels)


def unfreeze_gate(
    inner: optax.GradientTransformation,
    labels: Any,
    starts: Mapping[str, int | None],
    clip_norm: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Gate each group's gradient and update by ``count >= starts[group]``.

    The counter lives in the state as an array while the start steps are Python constants,
    so unfreezing a group changes values, not the traced program: no recompilation, and the
    state of groups already training carries on. Gated gradients are zeroed *before* the
    global-norm clip, so frozen and not-yet-unfrozen groups never shrink the clip of the
    trainable ones. ``inner`` receives the counter as the extra argument ``gate_count``
    (see :func:`hold_until`).

    Args:
        inner: the per-group transformation (usually an ``optax.multi_transform``).
        labels: group name per parameter, the structure of the params.
        starts: step at which each group opens; ``None`` or a missing group never opens.
        clip_norm: clip the trainable gradient to this global norm; ``0`` = off.

    Returns:
        A transformation whose state is a :class:`GateState`.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return GateState(
            count=jnp.zeros([], jnp.int32),
            grad_norm=jnp.zeros([], jnp.float32),
            inner_state=inner.init(params),
        )

    def update(grads, state, params=None, **extra_args):
        gates = {group: _is_open(state.count, start) for group, start in starts.items()}
        grads = _apply_gates(grads, labels, gates)
        norm = optax.global_norm(grads)
        if clip_norm > 0:
            scale = jnp.where(norm < clip_norm, 1.0, clip_norm / jnp.maximum(norm, 1e-30))
            grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        updates, inner_state = inner.update(
            grads, state.inner_state, params, gate_count=state.count, **extra_args
        )
        updates = _apply_gates(updates, labels, gates)
        count = optax.safe_int32_increment(state.count)
        return updates, GateState(count, norm.astype(jnp.float32), inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def hold_until(inner: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
    """Keep ``inner``'s state untouched (and its update zero) until ``gate_count >= start``.

    Feeding zeros to Adam while a group waits would still advance its step count, and the
    bias correction of a layer unfrozen late would then inflate its first updates many
    times over. Holding the state instead gives the group a fresh Adam when it opens.
    """
    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, *, gate_count=None, **extra_args):
        if gate_count is None:
            raise ValueError("hold_until must run inside unfreeze_gate (no gate_count given)")
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        is_open = gate_count >= start
        new_state = jax.tree.map(lambda n, o: jnp.where(is_open, n, o), new_state, state)
        new_updates = jax.tree.map(lambda u: jnp.where(is_open, u, jnp.zeros_like(u)), new_updates)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update)
