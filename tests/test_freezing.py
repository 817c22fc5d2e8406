"""Parameter groups, freezing schedules and the optimiser they build, on a small param tree.

No model here: a hand-written tree with the backbone's path layout keeps every expected
label tree literal and every optimiser step fast.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import freezing
from mtl_jax.config import FreezeSpec, TrainConfig
from mtl_jax.errors import UserError

from probes import group_opt_states, trainable_mask


def _p(*shape):
    return np.full(shape, 0.5, np.float32)


def make_params():
    """Embeddings, three encoder layers, two heads and learned loss weights."""

    def layer():
        return {
            "attention": {"self": {"query": {"kernel": _p(4, 4), "bias": _p(4)}}},
            "output": {"LayerNorm": {"scale": _p(4), "bias": _p(4)}},
        }

    return {
        "backbone": {
            "embeddings": {
                "word_embeddings": {"embedding": _p(10, 4)},
                "LayerNorm": {"scale": _p(4), "bias": _p(4)},
            },
            "encoder": {"layer": {"0": layer(), "1": layer(), "2": layer()}},
        },
        "heads": {
            "genre": {"out": {"kernel": _p(4, 5), "bias": _p(5)}},
            "sentiment": {"out": {"kernel": _p(4, 2), "bias": _p(2)}},
        },
        "log_vars": {"genre": np.float32(0.0), "sentiment": np.float32(0.0)},
    }


def _layer_labels(value):
    return {
        "attention": {"self": {"query": {"kernel": value, "bias": value}}},
        "output": {"LayerNorm": {"scale": value, "bias": value}},
    }


def _labels(emb, l0, l1, l2, genre, sentiment, lw):
    """A literal tree in the shape of make_params with one value per group."""
    return {
        "backbone": {
            "embeddings": {
                "word_embeddings": {"embedding": emb},
                "LayerNorm": {"scale": emb, "bias": emb},
            },
            "encoder": {
                "layer": {"0": _layer_labels(l0), "1": _layer_labels(l1), "2": _layer_labels(l2)}
            },
        },
        "heads": {
            "genre": {"out": {"kernel": genre, "bias": genre}},
            "sentiment": {"out": {"kernel": sentiment, "bias": sentiment}},
        },
        "log_vars": {"genre": lw, "sentiment": lw},
    }


GROUPS = (
    "embeddings",
    "layer_0",
    "layer_1",
    "layer_2",
    "head:genre",
    "head:sentiment",
    "loss_weights",
)


def train_cfg(**changes) -> TrainConfig:
    base = TrainConfig(
        freeze="none",
        learning_rate=1e-2,
        head_learning_rate=1e-1,
        weight_decay=0.0,
        warmup_steps=0,
        lr_schedule="constant",
        grad_clip=0.0,
        unfreeze_unit="steps",
        unfreeze_every=2,
    )
    return dataclasses.replace(base, **changes)


def group_of_leaf(params):
    return jax.tree.leaves(freezing.param_groups(params))


def run_updates(tx, params, grads_fn, n):
    """``n`` jitted optimiser steps; returns every intermediate params (numpy) and states."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    history = [jax.tree.map(np.array, params)]
    states = [state]
    for i in range(n):
        updates, state = update(grads_fn(i), state, params)
        params = optax.apply_updates(params, updates)
        history.append(jax.tree.map(np.array, params))
        states.append(state)
    return history, states


def random_grads(params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), params)


# -- groups ----------------------------------------------------------------------------------


def test_param_groups_literal_tree():
    groups = freezing.param_groups(make_params())
    expected = _labels(*GROUPS)
    assert groups == expected
    assert freezing.group_names(groups) == tuple(sorted(GROUPS))


def test_unmatched_parameter_raises_naming_its_path():
    params = make_params()
    params["backbone"]["pooler"] = {"dense": {"kernel": _p(4, 4)}}
    with pytest.raises(UserError, match="backbone/pooler/dense/kernel"):
        freezing.param_groups(params)


def test_parameter_matching_two_rules_raises():
    rules = (*freezing.DEFAULT_RULES, (r"^heads/genre/", "genre_again"))
    with pytest.raises(UserError, match=r"heads/genre/out/\w+. matches several"):
        freezing.param_groups(make_params(), rules)


def test_custom_rules_expand_regex_groups():
    params = {"enc": {"block_3": {"w": _p(2, 2)}}, "out": {"w": _p(2, 2)}}
    rules = ((r"^enc/block_(\d+)/", r"b\1"), (r"^out/", "top"))
    assert freezing.param_groups(params, rules) == {
        "enc": {"block_3": {"w": "b3"}},
        "out": {"w": "top"},
    }


# -- schedules -------------------------------------------------------------------------------

N = None


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("none", dict.fromkeys(GROUPS, 0)),
        ("all", dict.fromkeys(GROUPS, N)),
        ("backbone", {"embeddings": N, "layer_0": N, "layer_1": N, "layer_2": N}),
        ("head:genre", {**dict.fromkeys(GROUPS, 0), "head:genre": N}),
        ("top:0", {"embeddings": N, "layer_0": N, "layer_1": N, "layer_2": N}),
        ("top:1", {"embeddings": N, "layer_0": N, "layer_1": N, "layer_2": 0}),
        ("top:2", {"embeddings": N, "layer_0": N, "layer_1": 0, "layer_2": 0}),
        ("top:3", {"embeddings": N, "layer_0": 0, "layer_1": 0, "layer_2": 0}),
        ("top:9", {"embeddings": N, "layer_0": 0, "layer_1": 0, "layer_2": 0}),
        ("gradual", {"embeddings": 12, "layer_0": 9, "layer_1": 6, "layer_2": 3}),
    ],
)
def test_unfreeze_schedule_literal(strategy, expected):
    heads = {"head:genre": 0, "head:sentiment": 0, "loss_weights": 0}
    if len(expected) == 4:  # the backbone part only: heads and loss weights train from 0
        expected = {**heads, **expected}
    assert freezing.unfreeze_schedule(strategy, GROUPS, every_steps=3) == expected
    spec = FreezeSpec.parse(strategy)  # the parsed form the config hands over
    assert freezing.unfreeze_schedule(spec, GROUPS, every_steps=3) == expected


def test_gradual_epochs_convert_with_steps_per_epoch():
    cfg = train_cfg(freeze="gradual", unfreeze_unit="epochs", unfreeze_every=2)
    schedule = freezing.freeze_schedule(cfg, make_params(), steps_per_epoch=5)
    assert schedule["layer_2"] == 10 and schedule["layer_0"] == 30
    assert schedule["embeddings"] == 40 and schedule["head:genre"] == 0
    with pytest.raises(ValueError, match="steps_per_epoch"):
        freezing.freeze_schedule(cfg, make_params(), steps_per_epoch=None)


@pytest.mark.parametrize("strategy", ["top:x", "top:-1", "top:", "head:nope", "gradually"])
def test_bad_strategies_raise_user_errors(strategy):
    with pytest.raises(UserError, match="train.freeze"):
        freezing.unfreeze_schedule(strategy, GROUPS)


def test_strategy_rejects_a_group_it_cannot_place():
    with pytest.raises(UserError, match="pooler"):
        freezing.unfreeze_schedule("backbone", [*GROUPS, "pooler"])
    assert freezing.unfreeze_schedule("none", ["pooler"]) == {"pooler": 0}
    assert freezing.group_learning_rates(train_cfg(), ["pooler"]) == {"pooler": 1e-2}


def test_trainable_mask_follows_gradual_schedule():
    cfg = train_cfg(freeze="gradual", unfreeze_every=2)
    params = make_params()
    T, F = True, False
    assert trainable_mask(params, cfg, 0) == _labels(F, F, F, F, T, T, T)
    assert trainable_mask(params, cfg, 1) == _labels(F, F, F, F, T, T, T)
    assert trainable_mask(params, cfg, 2) == _labels(F, F, F, T, T, T, T)
    assert trainable_mask(params, cfg, 5) == _labels(F, F, T, T, T, T, T)
    assert trainable_mask(params, cfg, 8) == _labels(T, T, T, T, T, T, T)


def test_backbone_trainable():
    cases = {
        "none": True,
        "all": False,
        "backbone": False,
        "head:genre": True,
        "top:0": False,
        "top:2": True,
        "gradual": True,
    }
    for strategy, expected in cases.items():
        assert freezing.backbone_trainable(train_cfg(freeze=strategy)) is expected, strategy


# -- the optimiser ---------------------------------------------------------------------------

STRATEGIES = ["none", "all", "backbone", "head:genre", "top:1", "top:2"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_params_bit_identical_trainable_move(strategy):
    cfg = train_cfg(freeze=strategy, weight_decay=0.1, grad_clip=1.0)
    params = make_params()
    tx = freezing.make_optimizer(cfg, params)
    history, _ = run_updates(tx, params, lambda i: random_grads(params, seed=i), 3)
    trainable = trainable_mask(params, cfg, 0)
    before, after = history[0], history[-1]
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert moved == trainable


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_optimizer_state_for_frozen_groups(strategy):
    cfg = train_cfg(freeze=strategy)
    params = make_params()
    state = freezing.make_optimizer(cfg, params).init(params)
    per_group = group_opt_states(state)
    schedule = freezing.freeze_schedule(cfg, params)
    groups = freezing.param_groups(params)
    assert set(per_group) == set(GROUPS)
    for group, start in schedule.items():
        float_bytes = sum(
            x.nbytes
            for x in jax.tree.leaves(per_group[group])
            if jnp.issubdtype(x.dtype, jnp.floating)
        )
        group_bytes = sum(
            p.nbytes
            for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(groups), strict=True)
            if g == group
        )
        if start is None:
            assert jax.tree.leaves(per_group[group]) == [], group
        else:
            assert float_bytes == 2 * group_bytes, group  # Adam's mu and nu, nothing else


def test_weight_decay_with_zero_gradients_spares_frozen_params():
    cfg = train_cfg(freeze="backbone", weight_decay=0.1, head_learning_rate=0.5)
    params = make_params()
    tx = freezing.make_optimizer(cfg, params)
    zeros = jax.tree.map(np.zeros_like, params)
    history, _ = run_updates(tx, params, lambda i: zeros, 1)
    before, after = history
    chex.assert_trees_all_equal(before["backbone"], after["backbone"])
    # Decoupled decay on the head matrices only: p <- p - lr * wd * p.
    np.testing.assert_allclose(after["heads"]["genre"]["out"]["kernel"], 0.5 * (1 - 0.5 * 0.1))
    np.testing.assert_array_equal(
        after["heads"]["genre"]["out"]["bias"], before["heads"]["genre"]["out"]["bias"]
    )
    np.testing.assert_array_equal(after["log_vars"]["genre"], before["log_vars"]["genre"])


def test_clip_norm_ignores_frozen_and_nonfinite_frozen_grads():
    cfg = train_cfg(freeze="backbone", grad_clip=1.0)
    params = make_params()
    groups = freezing.param_groups(params)
    tx = freezing.make_optimizer(cfg, params)
    grads = random_grads(params)
    trainable_only = jax.tree.map(
        lambda g, label: (
            g if label.startswith("head:") or label == "loss_weights" else np.zeros_like(g)
        ),
        grads,
        groups,
    )
    noisy = jax.tree.map(
        lambda g, label: (
            g if label.startswith("head:") or label == "loss_weights" else np.full_like(g, 1e6)
        ),
        grads,
        groups,
    )
    noisy["backbone"]["embeddings"]["LayerNorm"]["bias"][:] = np.nan
    state = tx.init(params)
    clean_updates, clean_state = tx.update(trainable_only, state, params)
    noisy_updates, noisy_state = tx.update(noisy, state, params)
    chex.assert_trees_all_equal(clean_updates, noisy_updates)
    expected_norm = optax.global_norm(trainable_only)
    assert float(expected_norm) > 1.0  # so the clip is active
    np.testing.assert_allclose(freezing.gate_state(noisy_state).grad_norm, expected_norm, rtol=1e-6)


def test_group_learning_rates_with_layer_decay():
    cfg = train_cfg(layer_lr_decay=0.5)
    rates = freezing.group_learning_rates(cfg, GROUPS)
    assert rates == pytest.approx(
        {
            "layer_2": 1e-2,
            "layer_1": 5e-3,
            "layer_0": 2.5e-3,
            "embeddings": 1.25e-3,
            "head:genre": 1e-1,
            "head:sentiment": 1e-1,
            "loss_weights": 1e-1,
        }
    )


def test_first_update_magnitude_is_each_groups_rate():
    # Adam's first step is -lr * g / (|g| + eps): with g = 1 everywhere it reads out lr.
    cfg = train_cfg(layer_lr_decay=0.5)
    params = make_params()
    tx = freezing.make_optimizer(cfg, params)
    ones = jax.tree.map(np.ones_like, params)
    updates, _ = tx.update(ones, tx.init(params), params)
    rates = freezing.group_learning_rates(cfg, GROUPS)
    groups = freezing.param_groups(params)
    expected = jax.tree.map(
        lambda p, g: np.full(np.shape(p), -rates[g], np.float32), params, groups
    )
    chex.assert_trees_all_close(updates, expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("schedule", "points"),
    [
        ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 500: 1.0}),
        ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.5, 110: 0.0}),
        ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.5, 110: 0.0}),
    ],
)
def test_lr_factor_warmup_then_decay(schedule, points):
    factor = freezing.lr_factor(train_cfg(lr_schedule=schedule, warmup_steps=10), total_steps=110)
    for step, value in points.items():
        assert float(factor(step)) == pytest.approx(value, abs=1e-6), step


def test_lr_schedule_reaches_the_updates():
    cfg = train_cfg(lr_schedule="linear", warmup_steps=2)
    params = make_params()
    tx = freezing.make_optimizer(cfg, params, total_steps=4)
    ones = jax.tree.map(np.ones_like, params)
    state = tx.init(params)
    seen = []
    for _ in range(4):
        updates, state = tx.update(ones, state, params)
        seen.append(float(updates["heads"]["genre"]["out"]["bias"][0]))
    # factor: 0, 0.5 (warm-up), then 1, 0.5 (linear decay to 0 at step 4); Adam ratio 1.
    np.testing.assert_allclose(seen, [0.0, -0.05, -0.1, -0.05], rtol=1e-4)


def test_gradual_gate_opens_on_schedule_without_retrace_or_reset():
    cfg = train_cfg(freeze="gradual", unfreeze_every=2)
    params = make_params()
    tx = freezing.make_optimizer(cfg, params)
    reference = freezing.make_optimizer(dataclasses.replace(cfg, freeze="backbone"), params)
    grads = [random_grads(params, seed=i) for i in range(9)]

    traced_update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    reference_update = jax.jit(reference.update)
    state, ref_state = tx.init(params), reference.init(params)
    p = params
    for step in range(9):
        updates, state = traced_update(grads[step], state, p)
        _, ref_state = reference_update(grads[step], ref_state, params)
        new_p = optax.apply_updates(p, updates)
        moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), p, new_p)
        assert moved == trainable_mask(params, cfg, step), step
        p = new_p
        per_group = group_opt_states(state)
        # Heads carry on as if nothing else had happened: moments never reset.
        reference_head = group_opt_states(ref_state)["head:genre"]
        chex.assert_trees_all_close(per_group["head:genre"], reference_head, rtol=1e-6)
        assert int(per_group["head:genre"].inner_state[0].count) == step + 1
        # A waiting layer's Adam is held at count 0; it counts from its opening step.
        adam = per_group["layer_0"].inner_state[0]
        assert int(adam.count) == max(0, step + 1 - 6), step
    assert int(freezing.gate_state(state).count) == 9


def test_late_layer_gets_a_fresh_adam_not_an_inflated_step():
    # Layer 2 opens at step 20: its first update must be -lr (fresh bias correction). Had its
    # Adam counted 20 zero-gradient steps, this step would be about half of that, and after
    # an epoch of waiting several times larger.
    cfg = train_cfg(freeze="gradual", unfreeze_every=20)
    params = make_params()
    tx = freezing.make_optimizer(cfg, params)
    ones = jax.tree.map(np.ones_like, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(21):
        updates, state = update(ones, state, params)
    np.testing.assert_allclose(
        updates["backbone"]["encoder"]["layer"]["2"]["attention"]["self"]["query"]["kernel"],
        -1e-2,
        rtol=1e-5,
    )
