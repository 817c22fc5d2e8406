"""Accuracy and macro-F1 from confusion matrices, in ``jnp``.

Evaluation sums one confusion matrix per task over batches (integer adds, exact, and
shardable), and every score is read from the final matrix, so a score never depends on how
the data was split into batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def confusion_matrix(
    labels: jax.Array,
    preds: jax.Array,
    num_labels: int,
    valid: jax.Array | None = None,
) -> jax.Array:
    """``[num_labels, num_labels]`` int32 counts, rows = true label, columns = prediction.

    Args:
        labels: ``[batch]`` int; ``-1`` (no label for this task) is not counted.
        preds: ``[batch]`` int predictions in ``[0, num_labels)``.
        num_labels: the task's number of classes (static).
        valid: optional ``[batch]`` bool; ``False`` rows (batch padding) are not counted.

    Returns:
        The confusion matrix, in sklearn's orientation.
    """
    labels = jnp.asarray(labels)
    preds = jnp.asarray(preds)
    keep = (labels >= 0) & (labels < num_labels) & (preds >= 0) & (preds < num_labels)
    if valid is not None:
        keep = keep & jnp.asarray(valid).astype(bool)
    index = jnp.where(keep, labels * num_labels + preds, 0)
    counts = jnp.zeros(num_labels * num_labels, jnp.int32).at[index].add(keep.astype(jnp.int32))
    return counts.reshape(num_labels, num_labels)


def eval_counts(
    labels: jax.Array,
    logits: jax.Array,
    valid: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """One batch's additive evaluation counts for one task.

    Returns ``{"confusion": [K, K] int32, "loss_sum": float32}``: the confusion matrix of
    the argmax predictions and the summed cross-entropy over the same counted rows (label
    not ``-1``, ``valid`` if given). Both add across batches, so :func:`summarize` of the
    totals never depends on the batching.
    """
    labels = jnp.asarray(labels)
    num_labels = logits.shape[-1]
    cm = confusion_matrix(labels, logits.argmax(-1), num_labels, valid)
    keep = (labels >= 0) & (labels < num_labels)
    if valid is not None:
        keep = keep & jnp.asarray(valid).astype(bool)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(keep, labels, 0)
    )
    return {"confusion": cm, "loss_sum": jnp.where(keep, ce, 0.0).sum()}


def accuracy(cm: jax.Array) -> jax.Array:
    """Fraction of counted rows on the diagonal; ``0`` for an empty matrix."""
    cm = jnp.asarray(cm)
    total = cm.sum()
    return jnp.where(total > 0, jnp.trace(cm) / jnp.maximum(total, 1), 0.0)


def macro_f1(cm: jax.Array) -> jax.Array:
    """Unweighted mean F1 over the classes that occur as a label or as a prediction.

    That is sklearn's ``f1_score(y, p, average="macro")``: a class absent from both sides
    is left out of the mean rather than counted as 0 (or 1). ``0`` for an empty matrix.
    """
    cm = jnp.asarray(cm)
    tp = jnp.diag(cm).astype(jnp.float32)
    support = (cm.sum(axis=1) + cm.sum(axis=0)).astype(jnp.float32)  # 2tp + fp + fn
    present = support > 0
    f1 = jnp.where(present, 2.0 * tp / jnp.maximum(support, 1.0), 0.0)
    n_present = present.sum()
    return jnp.where(n_present > 0, f1.sum() / jnp.maximum(n_present, 1), 0.0)


@jax.jit
def _scores(cm: jax.Array) -> dict[str, jax.Array]:
    return {"accuracy": accuracy(cm), "macro_f1": macro_f1(cm)}


def summarize(confusions: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Plain-Python scores per task, ready for JSON and logs.

    Args:
        confusions: ``{task: [K, K]}`` summed confusion matrices, or ``{task: counts}``
            with counts the summed :func:`eval_counts` (which adds the mean ``loss``).

    Returns:
        ``{task: {"accuracy": float, "macro_f1": float, "n": int, "confusion": [[int]]}}``,
        plus ``"loss"`` (mean cross-entropy over the counted rows) from :func:`eval_counts`.
    """
    out = {}
    for task, counts in confusions.items():
        loss_sum = None
        if isinstance(counts, Mapping):
            counts, loss_sum = counts["confusion"], counts["loss_sum"]
        # Scored where the counts live, then one explicit read-back (no hidden transfers).
        host = jax.device_get({"cm": counts, **_scores(counts)})
        cm = np.asarray(host["cm"], dtype=np.int64)
        n = int(cm.sum())
        out[task] = {
            "accuracy": float(host["accuracy"]),
            "macro_f1": float(host["macro_f1"]),
            "n": n,
            "confusion": cm.tolist(),
        }
        if loss_sum is not None:
            out[task]["loss"] = float(jax.device_get(loss_sum)) / max(n, 1)
    return out
