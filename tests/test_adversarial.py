"""Adversarial word embeddings (``train.adversarial_epsilon``, the fast gradient method)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import freezing
from mtl_jax.config import TrainConfig
from mtl_jax.forward import model_forward
from mtl_jax.train import (
    WORD_EMBEDDINGS,
    build_train_step,
    create_train_state,
    fgm_perturbed,
    jit_train_step,
)

from conftest import make_fake_batch, replace_model

EPSILON = 0.5


def table(tree):
    for key in WORD_EMBEDDINGS:
        tree = tree[key]
    return np.asarray(tree)


def adversarial(config, epsilon):
    train = TrainConfig(freeze="none", adversarial_epsilon=epsilon)
    return replace_model(dataclasses.replace(config, train=train), backbone_dropout=False)


def sgd_step(model, config, epsilon):
    """One plain SGD step (rate 1): the new params are the params minus the gradient used."""
    config = adversarial(config, epsilon)
    step = build_train_step(model_forward(model, config), optax.sgd(1.0), config)
    return config, jit_train_step(step)


def test_fgm_moves_only_the_batchs_token_rows_by_epsilon_in_all(tiny_params):
    grads = jax.tree.map(jnp.zeros_like, tiny_params)
    rng = np.random.default_rng(0)
    table_grad = np.zeros_like(table(tiny_params))
    rows = np.array([3, 7, 7, 42])  # a token twice: its row's gradient is the sum
    for row in rows:
        table_grad[row] += rng.normal(size=table_grad.shape[1])
    grads["backbone"]["embeddings"]["word_embeddings"]["embedding"] = jnp.asarray(table_grad)

    moved = fgm_perturbed(tiny_params, grads, EPSILON)

    step = table(moved) - table(tiny_params)
    np.testing.assert_allclose(np.linalg.norm(step), EPSILON, rtol=1e-5)
    np.testing.assert_allclose(step, EPSILON * table_grad / np.linalg.norm(table_grad), atol=1e-6)
    untouched = np.setdiff1d(np.arange(len(step)), rows)
    assert not step[untouched].any()
    # Every other leaf is the very same array: nothing else is copied or moved.
    others = dict(moved["backbone"]["embeddings"])
    del others["word_embeddings"]
    assert all(
        a is b
        for a, b in zip(
            jax.tree.leaves(others),
            jax.tree.leaves({k: tiny_params["backbone"]["embeddings"][k] for k in others}),
            strict=True,
        )
    )
    assert moved["heads"] is tiny_params["heads"]
    assert table(tiny_params).dtype == table(moved).dtype


def test_the_step_applies_the_mean_of_the_clean_and_the_adversarial_gradient(
    tiny_config, tiny_model, tiny_params
):
    batch = make_fake_batch(tiny_config, seed=3)
    key = jax.random.key(0)
    _, plain = sgd_step(tiny_model, tiny_config, 0.0)
    _, fgm = sgd_step(tiny_model, tiny_config, EPSILON)

    def after(step, params):
        state, metrics = step(create_train_state(params, optax.sgd(1.0)), batch, key)
        return state.params, metrics

    clean, clean_metrics = after(plain, tiny_params)  # params - g
    grads = jax.tree.map(lambda p, q: p - q, tiny_params, clean)
    perturbed = fgm_perturbed(tiny_params, grads, EPSILON)
    moved, _ = after(plain, perturbed)  # perturbed - g_adv
    adversarial_grads = jax.tree.map(lambda p, q: p - q, perturbed, moved)
    expected = jax.tree.map(
        lambda p, a, b: p - 0.5 * (a + b), tiny_params, grads, adversarial_grads
    )

    got, metrics = after(fgm, tiny_params)

    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, e, atol=2e-6)
    # The adversarial gradient differs from the clean one (else the test could not fail) ...
    pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(adversarial_grads), strict=True)
    assert max(np.abs(a - b).max() for a, b in pairs) > 1e-3
    # ... and the step reports the clean pass.
    assert float(metrics["loss"]) == pytest.approx(float(clean_metrics["loss"]), rel=1e-6)


def test_training_with_adversarial_embeddings_fits_the_batch(tiny_config, tiny_model, tiny_params):
    config = adversarial(tiny_config, 1.0)
    config = dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, learning_rate=1e-3, head_learning_rate=3e-3),
    )
    optimizer = freezing.make_optimizer(config.train, tiny_params, total_steps=100)
    step = jit_train_step(build_train_step(model_forward(tiny_model, config), optimizer, config))
    state = create_train_state(tiny_params, optimizer)
    batch = make_fake_batch(config, seed=4)
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
        assert bool(metrics["finite"])
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
