"""Confusion-matrix metrics against scikit-learn, missing labels and classes included."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import log_loss as sk_log_loss

from mtl_jax.metrics import accuracy, confusion_matrix, eval_counts, macro_f1, summarize


def random_case(seed: int, n: int = 40, k: int = 6):
    """Labels and predictions where some classes never occur on one side or on either."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 3], size=n).astype(np.int32)  # 2, 4, 5 never true
    preds = rng.choice([0, 1, 2, 3], size=n).astype(np.int32)  # 4, 5 never predicted
    labels[rng.random(n) < 0.2] = -1
    valid = rng.random(n) > 0.1
    return labels, preds, valid, k


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_sklearn(seed):
    labels, preds, valid, k = random_case(seed)
    cm = confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), k, jnp.asarray(valid))
    keep = (labels >= 0) & valid
    y, p = labels[keep], preds[keep]
    np.testing.assert_array_equal(cm, sk_confusion_matrix(y, p, labels=list(range(k))))
    assert cm.dtype == jnp.int32
    np.testing.assert_allclose(float(accuracy(cm)), accuracy_score(y, p), rtol=1e-6)
    np.testing.assert_allclose(float(macro_f1(cm)), f1_score(y, p, average="macro"), rtol=1e-6)


def test_summed_batches_equal_one_pass():
    labels, preds, _, k = random_case(7, n=60)
    whole = confusion_matrix(labels, preds, k)
    parts = sum(
        confusion_matrix(labels[i : i + 16], preds[i : i + 16], k) for i in range(0, 60, 16)
    )
    np.testing.assert_array_equal(whole, parts)


def test_confusion_jits_and_ignores_missing_labels():
    labels = jnp.array([0, -1, 1, 1, -1], jnp.int32)
    preds = jnp.array([0, 1, 0, 1, 1], jnp.int32)
    cm = jax.jit(confusion_matrix, static_argnums=2)(labels, preds, 2)
    np.testing.assert_array_equal(cm, [[1, 0], [1, 1]])


def test_empty_matrix_scores_zero():
    cm = jnp.zeros((3, 3), jnp.int32)
    assert float(accuracy(cm)) == 0.0
    assert float(macro_f1(cm)) == 0.0


def test_summarize_gives_plain_python():
    labels, preds, _, k = random_case(1)
    keep = labels >= 0
    out = summarize({"genre": confusion_matrix(labels, preds, k)})
    json.dumps(out)  # plain floats, ints and lists only
    genre = out["genre"]
    assert set(genre) == {"accuracy", "macro_f1", "n", "confusion"}
    assert isinstance(genre["accuracy"], float) and isinstance(genre["n"], int)
    assert genre["n"] == int(keep.sum())
    assert genre["accuracy"] == pytest.approx(accuracy_score(labels[keep], preds[keep]))
    assert genre["macro_f1"] == pytest.approx(f1_score(labels[keep], preds[keep], average="macro"))
    assert (
        genre["confusion"]
        == sk_confusion_matrix(labels[keep], preds[keep], labels=list(range(k))).tolist()
    )


def test_eval_counts_loss_equals_sklearn_log_loss():
    rng = np.random.default_rng(3)
    k, n = 4, 50
    logits = rng.normal(size=(n, k)).astype(np.float32)
    labels = rng.integers(-1, k, size=n)
    valid = rng.random(n) > 0.2
    halves = [
        eval_counts(labels[s], jnp.asarray(logits[s]), valid[s])
        for s in (slice(0, 20), slice(20, n))
    ]
    total = jax.tree.map(jnp.add, *halves)
    scores = summarize({"genre": total})["genre"]
    keep = (labels >= 0) & valid
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert scores["n"] == keep.sum()
    expected = sk_log_loss(labels[keep], probs[keep], labels=list(range(k)))
    assert scores["loss"] == pytest.approx(expected, rel=1e-5)
    assert scores["accuracy"] == pytest.approx(np.mean(probs[keep].argmax(1) == labels[keep]))
