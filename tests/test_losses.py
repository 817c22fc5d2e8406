"""Masked per-task cross-entropy and the weighted / uncertainty-weighted total."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.losses import masked_cross_entropy, multitask_loss, symmetric_kl


def numpy_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy over labelled rows, by hand in float64."""
    rows = labels >= 0
    if not rows.any():
        return 0.0
    z = logits[rows].astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(rows.sum()), labels[rows]].mean())


def random_case(seed: int, batch: int = 12, classes: int = 5):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(batch, classes)) * 3).astype(np.float32)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    labels[rng.random(batch) < 0.4] = -1
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_cross_entropy_matches_numpy(seed):
    logits, labels = random_case(seed)
    loss, n = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert int(n) == int((labels >= 0).sum())
    np.testing.assert_allclose(float(loss), numpy_ce(logits, labels), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_class_weighted_cross_entropy_matches_hand_computation(seed):
    logits, labels = random_case(seed)
    weights = np.array([0.5, 2.0, 1.0, 3.0, 0.25], np.float32)
    loss, n = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), weights)
    rows = labels >= 0
    z = logits[rows].astype(np.float64)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ce = -log_probs[np.arange(rows.sum()), labels[rows]]
    w = weights[labels[rows]]
    assert int(n) == int(rows.sum())
    np.testing.assert_allclose(float(loss), (w * ce).sum() / w.sum(), rtol=1e-5)
    # Equal weights are the unweighted mean; no labelled row is a zero loss with zero grad.
    equal, _ = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), np.full(5, 3.0))
    np.testing.assert_allclose(float(equal), numpy_ce(logits, labels), rtol=1e-5)
    none = np.full_like(labels, -1)
    grad = jax.grad(lambda x: masked_cross_entropy(x, jnp.asarray(none), weights)[0])(
        jnp.asarray(logits)
    )
    assert float(masked_cross_entropy(jnp.asarray(logits), jnp.asarray(none), weights)[0]) == 0
    assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_is_torchs_mix_of_the_label_and_the_uniform_target(eps):
    # torch: (1 - eps) * CE(label) + eps * mean_k CE(k), each row counting with its weight.
    logits, labels = random_case(4)
    weights = np.array([0.5, 2.0, 1.0, 3.0, 0.25], np.float32)
    rows = labels >= 0
    z = logits[rows].astype(np.float64)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ce = -(1 - eps) * log_probs[np.arange(rows.sum()), labels[rows]] - eps * log_probs.mean(1)
    plain, _ = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), None, eps)
    np.testing.assert_allclose(float(plain), ce.mean(), rtol=1e-5)
    # With weights, torch weighs the label's term by its class and each class's share of
    # the uniform term by that class: ((1 - eps) w_y CE_y + eps mean_k w_k CE_k) / sum w_y.
    weighted, _ = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), weights, eps)
    w = weights[labels[rows]]
    nll_y = -log_probs[np.arange(rows.sum()), labels[rows]]
    row_terms = (1 - eps) * w * nll_y - eps * (log_probs * weights).mean(1)
    np.testing.assert_allclose(float(weighted), row_terms.sum() / w.sum(), rtol=1e-5)
    # Smoothing keeps a finite optimum: the gradient vanishes at logit gaps of
    # log((1 - eps + eps / K) / (eps / K)), not at infinity.
    k = logits.shape[1]
    gap = np.log((1 - eps + eps / k) / (eps / k))
    at_optimum = jnp.asarray(np.eye(k, dtype=np.float32)[labels[rows]] * gap)
    grad = jax.grad(lambda x: masked_cross_entropy(x, jnp.asarray(labels[rows]), None, eps)[0])(
        at_optimum
    )
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-6)


def test_missing_rows_do_not_change_the_loss():
    logits, labels = random_case(3)
    garbage = logits.copy()
    garbage[labels < 0] = 1e4  # a missing row's logits must not leak into the mean
    a, _ = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    b, _ = masked_cross_entropy(jnp.asarray(garbage), jnp.asarray(labels))
    assert float(a) == float(b)


def test_no_labelled_rows_gives_zero_loss_and_zero_gradient():
    logits = jnp.ones((4, 3))
    labels = jnp.full((4,), -1, jnp.int32)
    loss, n = masked_cross_entropy(logits, labels)
    grad = jax.grad(lambda x: masked_cross_entropy(x, labels)[0])(logits)
    assert float(loss) == 0.0 and int(n) == 0
    np.testing.assert_array_equal(grad, np.zeros((4, 3)))


def two_tasks():
    a_logits, a_labels = random_case(4, classes=5)
    b_logits, b_labels = random_case(5, classes=2)
    logits = {"a": jnp.asarray(a_logits), "b": jnp.asarray(b_logits)}
    labels = {"a": jnp.asarray(a_labels), "b": jnp.asarray(b_labels)}
    ce = {"a": numpy_ce(a_logits, a_labels), "b": numpy_ce(b_logits, b_labels)}
    return logits, labels, ce


def test_fixed_weights_sum():
    logits, labels, ce = two_tasks()
    total, per_task = multitask_loss(logits, labels, {"a": 0.3, "b": 2.0})
    np.testing.assert_allclose(float(total), 0.3 * ce["a"] + 2.0 * ce["b"], rtol=1e-5)
    np.testing.assert_allclose(float(per_task["a"]), ce["a"], rtol=1e-5)
    np.testing.assert_allclose(float(per_task["b"]), ce["b"], rtol=1e-5)


def test_uncertainty_weighting_formula_and_gradient():
    logits, labels, ce = two_tasks()
    s = {"a": jnp.float32(0.7), "b": jnp.float32(-0.4)}
    weights = {"a": 1.0, "b": 0.5}
    total, _ = multitask_loss(logits, labels, weights, s)
    expected = sum(
        weights[t] * (np.exp(-float(s[t])) * ce[t] + 0.5 * float(s[t])) for t in ("a", "b")
    )
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    grad = jax.grad(lambda lv: multitask_loss(logits, labels, weights, lv)[0])(s)
    for t in ("a", "b"):
        expected_grad = weights[t] * (-np.exp(-float(s[t])) * ce[t] + 0.5)
        np.testing.assert_allclose(float(grad[t]), expected_grad, rtol=1e-5)


def test_task_without_labels_leaves_its_log_var_alone():
    logits, labels, ce = two_tasks()
    labels = {**labels, "b": jnp.full_like(labels["b"], -1)}
    s = {"a": jnp.float32(0.2), "b": jnp.float32(0.9)}
    total, per_task = multitask_loss(logits, labels, {"a": 1.0, "b": 1.0}, s)
    np.testing.assert_allclose(float(total), np.exp(-0.2) * ce["a"] + 0.1, rtol=1e-5)
    assert float(per_task["b"]) == 0.0
    grad = jax.grad(lambda lv: multitask_loss(logits, labels, {"a": 1.0, "b": 1.0}, lv)[0])(s)
    assert float(grad["b"]) == 0.0


def test_multitask_loss_smooths_only_the_tasks_that_ask():
    logits = {t: jnp.asarray(random_case(i)[0]) for i, t in enumerate("ab")}
    labels = {t: jnp.asarray(random_case(i)[1]) for i, t in enumerate("ab")}
    _, plain = multitask_loss(logits, labels, {"a": 1.0, "b": 1.0})
    _, smoothed = multitask_loss(logits, labels, {"a": 1.0, "b": 1.0}, None, None, {"a": 0.2})
    a, _ = masked_cross_entropy(logits["a"], labels["a"], None, 0.2)
    assert float(smoothed["a"]) == float(a) != float(plain["a"])
    assert float(smoothed["b"]) == float(plain["b"])


def test_multitask_loss_jits():
    logits, labels, ce = two_tasks()
    total, _ = jax.jit(lambda x, y: multitask_loss(x, y, {"a": 1.0, "b": 1.0}))(logits, labels)
    np.testing.assert_allclose(float(total), ce["a"] + ce["b"], rtol=1e-5)


def test_symmetric_kl_is_both_directions_halved_over_labelled_rows():
    a, labels = random_case(5)
    b, _ = random_case(6)
    rows = labels >= 0
    la = a[rows] - np.log(np.exp(a[rows]).sum(1, keepdims=True))
    lb = b[rows] - np.log(np.exp(b[rows]).sum(1, keepdims=True))
    kl_ab = (np.exp(la) * (la - lb)).sum(1)
    kl_ba = (np.exp(lb) * (lb - la)).sum(1)
    got = float(symmetric_kl(jnp.asarray(a), jnp.asarray(b), jnp.asarray(labels)))
    np.testing.assert_allclose(got, ((kl_ab + kl_ba) / 2).mean(), rtol=1e-5)
    assert float(symmetric_kl(jnp.asarray(a), jnp.asarray(a), jnp.asarray(labels))) == 0.0
    none = jnp.full(labels.shape, -1)
    assert float(symmetric_kl(jnp.asarray(a), jnp.asarray(b), none)) == 0.0
