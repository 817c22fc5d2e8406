"""Freezing as data: parameter groups, unfreezing schedules and the optimiser they imply.

A parameter's *group* comes from a list of ``(regex, group)`` rules over its "/"-joined path
(``backbone/encoder/layer/3/...`` -> ``layer_3``). A freezing *strategy* (the string in
``TrainConfig.freeze``) becomes a *schedule*: for every group, the optimiser step at which it
starts training (``0`` = from the start, ``None`` = never). :func:`make_optimizer` turns that
schedule into one ``optax.multi_transform`` whose labels are the groups:

* a group that never trains gets ``optax.set_to_zero()``: no Adam moments, no weight decay;
* a group that trains gets AdamW with its own learning rate (layer-wise decay for the
  backbone, ``head_learning_rate`` for heads and learned loss weights, ``learning_rate``
  for a task's own copy of the encoder's top layers, group ``head:<task>/own``);
* a group that starts later (gradual unfreezing) is held by :mod:`mtl_jax.gate`, whose
  state carries the step counter, so the schedule runs inside one compiled step and never
  rebuilds the optimiser (which would reset the state of groups already training).

Strategies (``TrainConfig.freeze``, parsed once into a :class:`~mtl_jax.config.FreezeSpec`):

* ``none``: everything trains.
* ``all``: nothing trains (an evaluation or a dry run through the training loop).
* ``backbone``: heads and loss weights train; embeddings and encoder layers are frozen.
  A task's own copy of the top layers (``head:<task>/own``) belongs to its head here and
  under ``top:<k>``: it trains.
* ``head:<task>``: that task's head (and its own top layers, if any) is frozen, everything
  else trains.
* ``top:<k>``: heads, loss weights and the top ``k`` encoder layers *that the model runs*
  train. ``k`` counts encoder layers only: the embeddings stay frozen for every ``k`` (use
  ``none`` to train them). A ``k`` above the layer count trains all layers, because the model
  often runs fewer layers than its checkpoint has (pooling ``hidden_states[-2]`` of a
  6-layer MiniLM runs 5), and ``top:6`` written for that checkpoint means "all of them".
  ``top:0`` is the same as ``backbone``.
* ``gradual``: ULMFiT-style top-down unfreezing. Heads and loss weights train from step 0;
  the top encoder layer (and every task's own copy of the top layers) joins after
  ``unfreeze_every`` units, the next one after
  ``2 * unfreeze_every`` and so on; the embeddings join last, one period after the bottom
  layer. A unit is an epoch (``steps_per_epoch`` steps) or a step (``unfreeze_unit``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_jax.config import FreezeSpec, TrainConfig
from mtl_jax.ema import params_ema
from mtl_jax.errors import UserError
from mtl_jax.gate import GateState, hold_until, unfreeze_gate
from mtl_jax.trees import Params, find_node

Rule = tuple[str, str]
Schedule = dict[str, int | None]

EMBEDDINGS = "embeddings"
LOSS_WEIGHTS = "loss_weights"
HEAD_PREFIX = "head:"
LAYER_PREFIX = "layer_"
OWN_SUFFIX = "/own"  # head:<task>/own: a task's own copy of the encoder's top layers

# Group templates may refer to regex groups (``\1``), expanded with ``re.Match.expand``.
DEFAULT_RULES: tuple[Rule, ...] = (
    (r"^backbone/embeddings/", EMBEDDINGS),
    (r"^backbone/encoder/layer/(\d+)/", LAYER_PREFIX + r"\1"),
    (r"^heads/([^/]+)/own/", HEAD_PREFIX + r"\1" + OWN_SUFFIX),
    (r"^heads/([^/]+)/(?!own/)", HEAD_PREFIX + r"\1"),
    (r"^log_vars/", LOSS_WEIGHTS),
)

_LAYER_GROUP = re.compile(rf"^{LAYER_PREFIX}(\d+)$")


# -- groups ----------------------------------------------------------------------------------


def param_path(path: Sequence[Any]) -> str:
    """The "/"-joined name of a pytree key path, as the freezing rules see it."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def group_of(path: str, rules: Sequence[Rule] = DEFAULT_RULES) -> str:
    """The group of one parameter path; exactly one rule must match it.

    Raises:
        UserError: no rule or more than one rule matches, naming the path and the rules, so
            a new parameter can never silently fall into the wrong (or no) group.
    """
    matches = [(pattern, group, m) for pattern, group in rules if (m := re.search(pattern, path))]
    if not matches:
        patterns = ", ".join(pattern for pattern, _ in rules)
        raise UserError(f"parameter '{path}' matches no freezing rule (rules: {patterns})")
    if len(matches) > 1:
        patterns = ", ".join(pattern for pattern, _, _ in matches)
        raise UserError(f"parameter '{path}' matches several freezing rules: {patterns}")
    _, group, match = matches[0]
    return match.expand(group)


def param_groups(params: Params, rules: Sequence[Rule] = DEFAULT_RULES) -> Any:
    """A pytree of group names with the structure of ``params``.

    These are also the labels of :func:`make_optimizer`'s ``optax.multi_transform``.

    Args:
        params: the parameter pytree (nested dicts of arrays).
        rules: ``(regex, group)`` pairs over "/"-joined paths; every parameter must match
            exactly one.

    Returns:
        The same tree with each leaf replaced by its group name.
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: group_of(param_path(p), rules), params)


def group_names(groups: Any) -> tuple[str, ...]:
    """The distinct group names of a group tree, sorted."""
    return tuple(sorted(set(jax.tree.leaves(groups))))


def layer_index(group: str) -> int | None:
    """``i`` for an encoder layer group ``layer_<i>``, else None."""
    match = _LAYER_GROUP.match(group)
    return int(match.group(1)) if match else None


def _is_head_side(group: str) -> bool:
    return group.startswith(HEAD_PREFIX) or group == LOSS_WEIGHTS


def _is_own_layers(group: str) -> bool:
    return group.startswith(HEAD_PREFIX) and group.endswith(OWN_SUFFIX)


def _layers_top_down(groups: Iterable[str]) -> list[str]:
    """Encoder layer groups, the top layer (highest index) first."""
    layers = [g for g in groups if layer_index(g) is not None]
    return sorted(layers, key=layer_index, reverse=True)


def _check_known(groups: Iterable[str], strategy: str) -> None:
    for group in groups:
        if not (_is_head_side(group) or group == EMBEDDINGS or layer_index(group) is not None):
            raise UserError(
                f"freezing strategy '{strategy}' does not know parameter group '{group}' "
                f"(known: {EMBEDDINGS}, {LAYER_PREFIX}<i>, {HEAD_PREFIX}<task>, {LOSS_WEIGHTS})"
            )


# -- strategies ------------------------------------------------------------------------------


def unfreeze_schedule(
    strategy: FreezeSpec | str, groups: Iterable[str], every_steps: int = 1
) -> Schedule:
    """The step at which each group starts training under a freezing strategy.

    Args:
        strategy: a :class:`FreezeSpec` (or its string, ``none | all | backbone |
            head:<task> | top:<k> | gradual``, parsed by :meth:`FreezeSpec.parse`).
        groups: the group names present in the params.
        every_steps: for ``gradual``, steps between two unfreezings (already converted from
            epochs by the caller).

    Returns:
        ``{group: step}``; ``0`` trains from the start, ``None`` never trains.

    Raises:
        UserError: a malformed strategy, a ``head:<task>`` with no such head, or a group
            the strategy cannot place.
    """
    spec = FreezeSpec.parse(strategy) if isinstance(strategy, str) else strategy
    groups = sorted(set(groups))
    if spec.kind == "none":
        return dict.fromkeys(groups, 0)
    if spec.kind == "all":
        return dict.fromkeys(groups, None)
    _check_known(groups, str(spec))
    if spec.kind == "backbone":
        return {g: 0 if _is_head_side(g) else None for g in groups}
    if spec.kind == "head":
        frozen = HEAD_PREFIX + spec.head
        if frozen not in groups:
            heads = [g for g in groups if g.startswith(HEAD_PREFIX) and not _is_own_layers(g)]
            raise UserError(f"config key 'train.freeze': '{spec}' is not one of {heads}")
        return {g: None if g in (frozen, frozen + OWN_SUFFIX) else 0 for g in groups}
    if spec.kind == "top":
        trained = set(_layers_top_down(groups)[: spec.top_k])
        return {g: 0 if _is_head_side(g) or g in trained else None for g in groups}
    if every_steps < 1:  # gradual
        raise ValueError(f"gradual unfreezing needs every_steps >= 1, got {every_steps}")
    schedule: Schedule = {g: 0 for g in groups if _is_head_side(g)}
    layers = _layers_top_down(groups)
    for rank, group in enumerate(layers):
        schedule[group] = (rank + 1) * every_steps
    for group in filter(_is_own_layers, groups):  # copies of the top layers join with it
        schedule[group] = every_steps
    if EMBEDDINGS in groups:
        schedule[EMBEDDINGS] = (len(layers) + 1) * every_steps
    return {g: schedule[g] for g in groups}


def unfreeze_interval(train_cfg: TrainConfig, steps_per_epoch: int | None) -> int:
    """Steps between two gradual unfreezings, converting epochs with ``steps_per_epoch``."""
    if train_cfg.unfreeze_unit == "steps":
        return train_cfg.unfreeze_every
    gradual = train_cfg.freeze_spec.kind == "gradual"
    if gradual and (steps_per_epoch is None or steps_per_epoch < 1):
        raise ValueError(
            f"gradual unfreezing every N epochs needs steps_per_epoch >= 1, got {steps_per_epoch}"
        )
    return train_cfg.unfreeze_every * max(steps_per_epoch or 1, 1)


def freeze_schedule(
    train_cfg: TrainConfig,
    params: Params,
    steps_per_epoch: int | None = None,
    rules: Sequence[Rule] = DEFAULT_RULES,
) -> Schedule:
    """:func:`unfreeze_schedule` for a config's strategy and the groups present in ``params``."""
    names = group_names(param_groups(params, rules))
    every = unfreeze_interval(train_cfg, steps_per_epoch)
    return unfreeze_schedule(train_cfg.freeze_spec, names, every)


def backbone_trainable(train_cfg: TrainConfig) -> bool:
    """False when no backbone group can ever train under the config's strategy.

    The model then stops gradients at the pooled embedding, and XLA drops the backbone's
    backward pass instead of computing gradients ``set_to_zero`` would throw away.
    """
    return train_cfg.freeze_spec.trains_backbone


# -- learning rates --------------------------------------------------------------------------


def group_learning_rates(train_cfg: TrainConfig, groups: Iterable[str]) -> dict[str, float]:
    """Peak learning rate per group.

    Encoder layer ``i`` gets ``learning_rate * layer_lr_decay ** (top - i)`` where ``top`` is
    the highest layer present, and the embeddings one step below the bottom layer
    (``decay ** (top + 1)``): lower layers hold more general features and move less. Heads
    and learned loss weights get ``head_learning_rate``; a task's own copy of the top layers
    (``head:<task>/own``, all of them) the top layer's, ``learning_rate``. A group
    of custom rules that is none of these gets the undecayed ``learning_rate``.
    """
    groups = sorted(set(groups))
    indices = [i for g in groups if (i := layer_index(g)) is not None]
    top = max(indices, default=-1)
    rates = {}
    for group in groups:
        if _is_own_layers(group):
            rates[group] = train_cfg.learning_rate
        elif _is_head_side(group):
            rates[group] = train_cfg.head_learning_rate
        elif (i := layer_index(group)) is not None:
            rates[group] = train_cfg.learning_rate * train_cfg.layer_lr_decay ** (top - i)
        elif group == EMBEDDINGS:
            rates[group] = train_cfg.learning_rate * train_cfg.layer_lr_decay ** (top + 1)
        else:
            rates[group] = train_cfg.learning_rate
    return rates


def lr_factor(train_cfg: TrainConfig, total_steps: int | None = None) -> optax.Schedule:
    """Multiplier in ``[0, 1]`` of every peak rate: linear warm-up, then the chosen decay.

    ``linear`` and ``cosine`` reach 0 at ``total_steps``; ``constant`` holds 1.
    """
    warmup = train_cfg.warmup_steps
    if train_cfg.lr_schedule == "constant":
        decay = optax.constant_schedule(1.0)
    else:
        if not total_steps or total_steps < 1:
            raise ValueError(
                f"lr_schedule '{train_cfg.lr_schedule}' needs total_steps >= 1, got {total_steps}"
            )
        span = max(total_steps - warmup, 1)
        if train_cfg.lr_schedule == "linear":
            decay = optax.linear_schedule(1.0, 0.0, span)
        elif train_cfg.lr_schedule == "cosine":
            decay = optax.cosine_decay_schedule(1.0, span)
        else:
            raise UserError(
                f"config key 'train.lr_schedule': unknown {train_cfg.lr_schedule!r} "
                "(constant | linear | cosine)"
            )
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), decay], [warmup])


def decay_mask(params: Params) -> Any:
    """Weight decay on matrices only: no decay on biases, LayerNorm scales or scalars."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _shifted(factor: optax.Schedule, peak: float, start: int) -> Callable[[jax.Array], jax.Array]:
    """A group's rate by its own Adam count, which starts at 0 when the group opens."""
    return lambda count: peak * factor(count + start)


# -- the optimiser ---------------------------------------------------------------------------


def make_optimizer(
    train_cfg: TrainConfig,
    params: Any,
    steps_per_epoch: int | None = None,
    total_steps: int | None = None,
    rules: Sequence[Rule] = DEFAULT_RULES,
) -> optax.GradientTransformationExtraArgs:
    """The whole optimiser a config describes, as one pure ``optax`` transformation.

    ``unfreeze_gate(multi_transform({group: tx}, groups))`` with, per group:
    ``set_to_zero()`` when it never trains (no state, no decay); AdamW (decoupled decay on
    matrices only, inside the branch so a frozen group is never decayed) with a warm-up and
    decay schedule scaled by the group's peak rate when it trains; and the same wrapped in
    :func:`hold_until` when it starts later. All groups follow one global schedule clock.
    With ``train.ema_decay > 0`` it is chained with :func:`mtl_jax.ema.params_ema`, whose
    state holds the params' moving average (updated only for the groups that ever train).

    Args:
        train_cfg: rates, decay, schedule, clip and freezing strategy.
        params: the params it will optimise (their structure fixes the labels; add
            ``log_vars`` before calling this).
        steps_per_epoch: converts ``unfreeze_every`` epochs to steps (gradual only).
        total_steps: where a ``linear`` or ``cosine`` schedule reaches 0.
        rules: the parameter group rules.

    Returns:
        An ``optax.GradientTransformationExtraArgs``; its state is a :class:`GateState`
        (``(GateState, EmaState)`` with an EMA; find them with :func:`find_gate_state` and
        :func:`mtl_jax.ema.find_ema`).
    """
    groups = param_groups(params, rules)
    names = group_names(groups)
    starts = unfreeze_schedule(
        train_cfg.freeze_spec, names, unfreeze_interval(train_cfg, steps_per_epoch)
    )
    rates = group_learning_rates(train_cfg, names)
    trains = any(start is not None for start in starts.values())
    factor = lr_factor(train_cfg, total_steps) if trains else None
    transforms = {}
    for group in names:
        start = starts[group]
        if start is None:
            transforms[group] = optax.set_to_zero()
            continue
        tx = optax.adamw(
            _shifted(factor, rates[group], start),
            weight_decay=train_cfg.weight_decay,
            mask=decay_mask,
        )
        transforms[group] = hold_until(tx, start) if start > 0 else tx
    inner = optax.multi_transform(transforms, groups)
    gated = unfreeze_gate(inner, groups, starts, clip_norm=train_cfg.grad_clip)
    if train_cfg.ema_decay > 0:
        trains = jax.tree.map(lambda group: starts[group] is not None, groups)
        return optax.chain(gated, params_ema(train_cfg.ema_decay, tracked=trains))
    return gated


def find_gate_state(opt_state: Any) -> GateState | None:
    """The :class:`GateState` inside an optimiser state however it is wrapped, else None."""
    return find_node(opt_state, GateState)


def gate_state(opt_state: Any) -> GateState:
    """The :class:`GateState` of a :func:`make_optimizer` state."""
    state = find_gate_state(opt_state)
    if state is None:
        raise ValueError("no GateState in this optimiser state (not built by make_optimizer)")
    return state
