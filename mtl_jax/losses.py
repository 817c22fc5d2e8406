"""Multi-task losses over partially labelled batches.

A mixed batch carries every task's label column, with ``-1`` where a row has no label for
that task. Each task's cross-entropy is a mean over its *labelled* rows only, so a task's
loss scale does not depend on how many rows of the batch happen to belong to it.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def masked_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy over the rows whose label is not ``-1``.

    Args:
        logits: ``[batch, num_labels]``.
        labels: ``[batch]`` int, ``-1`` = no label for this row.
        class_weights: optional ``[num_labels]``; each row counts with its label's weight,
            and the mean divides by the summed weights (``torch``'s ``CrossEntropyLoss(
            weight=...)``), so the loss scale does not depend on the batch's class mix.
        label_smoothing: ``eps`` in ``[0, 1)``: the target puts ``1 - eps`` on the label and
            spreads ``eps`` evenly over all classes, so a confident logit stops paying off
            before it saturates; with class weights each class's share of ``eps`` counts
            with its own weight (``torch``'s ``label_smoothing`` and ``weight`` together).

    Returns:
        ``(loss, n_labelled)``: the float32 (weighted) mean over labelled rows (``0`` when
        there are none, with a zero gradient rather than a NaN) and the int32 count of
        those rows.
    """
    mask = labels >= 0
    safe_labels = jnp.where(mask, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(log_probs, safe_labels[:, None], axis=-1)[:, 0]
    n = mask.sum().astype(jnp.int32)
    per_class = (
        jnp.ones(logits.shape[-1], jnp.float32)
        if class_weights is None
        else jnp.asarray(class_weights, jnp.float32)
    )
    w = jnp.where(mask, per_class[safe_labels], 0.0)
    rows = w * nll
    if label_smoothing:  # torch: each class's share of eps counts with its own weight
        uniform = -(log_probs * per_class).mean(-1)
        rows = (1 - label_smoothing) * rows + label_smoothing * uniform
    total_w = w.sum()  # n without class weights
    total = jnp.where(mask, rows, 0.0).sum()
    return jnp.where(total_w > 0, total / jnp.where(total_w > 0, total_w, 1.0), 0.0), n


def multitask_loss(
    logits: Mapping[str, jax.Array],
    labels: Mapping[str, jax.Array],
    weights: Mapping[str, float],
    log_vars: Mapping[str, jax.Array] | None = None,
    class_weights: Mapping[str, jax.Array] | None = None,
    label_smoothing: Mapping[str, float] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the per-task losses, optionally with learned uncertainty weights.

    Fixed weights: ``total = sum_t w_t * CE_t``.

    Uncertainty weighting (Kendall, Gal & Cipolla 2018, classification form): with
    ``s_t = log sigma_t^2`` learned per task,
    ``total = sum_t w_t * [n_t > 0] * (exp(-s_t) * CE_t + s_t / 2)``. The ``s_t / 2`` term
    (``log sigma_t``) stops every ``s_t`` from growing without bound; its optimum is
    ``exp(-s_t) = 1 / (2 CE_t)``, so a task with a large loss is down-weighted. A task with
    no labelled row in the batch contributes nothing, not even its ``s_t / 2``, which would
    otherwise drag ``s_t`` down on batches that say nothing about that task. ``w_t``
    (``TaskConfig.loss_weight``) stays a fixed prior on top; ``w_t = 0`` switches a task off.

    Args:
        logits: ``{task: [batch, num_labels]}``; every task here needs labels and a weight.
        labels: ``{task: [batch]}`` int, ``-1`` = missing.
        weights: ``{task: w_t}``.
        log_vars: ``{task: s_t}`` scalars (``params["log_vars"]``), or None for fixed weights.
        class_weights: ``{task: [num_labels]}`` for the tasks whose rows are weighted by
            class (see :func:`masked_cross_entropy`); other tasks weigh rows equally.
        label_smoothing: ``{task: eps}`` for the tasks trained on smoothed targets (see
            :func:`masked_cross_entropy`); other tasks on their one-hot labels.

    Returns:
        ``(total, {task: CE_t})`` with ``CE_t`` the unweighted masked mean cross-entropy.
    """
    total = jnp.zeros([], jnp.float32)
    per_task = {}
    for task, task_logits in logits.items():
        ce, n = masked_cross_entropy(
            task_logits,
            labels[task],
            (class_weights or {}).get(task),
            (label_smoothing or {}).get(task, 0.0),
        )
        per_task[task] = ce
        if log_vars is None:
            term = ce
        else:
            s = jnp.asarray(log_vars[task], jnp.float32)
            term = jnp.where(n > 0, jnp.exp(-s) * ce + 0.5 * s, 0.0)
        total = total + weights[task] * term
    return total, per_task


def symmetric_kl(logits_a: jax.Array, logits_b: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the labelled rows of ``(KL(p_a || p_b) + KL(p_b || p_a)) / 2``.

    R-Drop's consistency term (Liang et al. 2021) between two dropout passes over the same
    rows; rows whose ``labels`` are ``-1`` do not count, as in :func:`masked_cross_entropy`.
    Both directions summed are ``sum_k (p_a - p_b)(log p_a - log p_b)``.
    """
    log_a = jax.nn.log_softmax(logits_a.astype(jnp.float32))
    log_b = jax.nn.log_softmax(logits_b.astype(jnp.float32))
    kl = 0.5 * ((jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b)).sum(-1)
    mask = labels >= 0
    return jnp.where(mask, kl, 0.0).sum() / jnp.maximum(mask.sum(), 1).astype(jnp.float32)
