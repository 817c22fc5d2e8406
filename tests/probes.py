"""Inspection helpers only tests need: what trains at a step, per-group optimiser state,
waiting for a checkpointer's pending writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from mtl_jax.checkpoint import Checkpointer
from mtl_jax.config import TrainConfig
from mtl_jax.freezing import DEFAULT_RULES, Rule, freeze_schedule, gate_state, param_groups


def trainable_mask(
    params: Any,
    train_cfg: TrainConfig,
    step: int,
    steps_per_epoch: int | None = None,
    rules: Sequence[Rule] = DEFAULT_RULES,
) -> Any:
    """Which parameters train at optimiser step ``step``: a bool pytree shaped like ``params``
    (the schedule :func:`mtl_jax.freezing.make_optimizer` reads)."""
    schedule = freeze_schedule(train_cfg, params, steps_per_epoch, rules)
    return jax.tree.map(
        lambda g: schedule[g] is not None and step >= schedule[g], param_groups(params, rules)
    )


def group_opt_states(opt_state: Any) -> dict[str, Any]:
    """Per-group optimiser state of a :func:`mtl_jax.freezing.make_optimizer` state."""
    return dict(gate_state(opt_state).inner_state.inner_states)


def wait_for_writes(checkpointer: Checkpointer) -> None:
    """Block until both of a checkpointer's managers finished their pending writes."""
    checkpointer._latest.wait_until_finished()
    checkpointer._best.wait_until_finished()


def traced_steps(logdir: Path, name: str = "train") -> list[int]:
    """Step numbers of the ``name`` annotations in the one trace under ``logdir``, read as
    TensorBoard's profile plugin reads them."""
    (xplane,) = Path(logdir).glob("plugins/profile/*/*.xplane.pb")
    data = jax.profiler.ProfileData.from_file(str(xplane))
    return sorted(
        int(dict(event.stats)["step_num"])
        for plane in data.planes
        for line in plane.lines
        for event in line.events
        if event.name == name
    )
