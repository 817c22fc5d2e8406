"""The jitted train, eval and predict steps on the tiny model.

Compiles are the cost here, so each step program is built once per module and shared.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import forward as forward_lib
from mtl_jax import freezing
from mtl_jax.config import TrainConfig
from mtl_jax.forward import forward_chunk_rows, model_forward
from mtl_jax.train import (
    LEAN_COMPILE_OPTIONS,
    build_eval_step,
    build_train_step,
    create_train_state,
    init_train_params,
    jit_train_step,
    make_eval_step,
    make_predict_fn,
    step_compiler_options,
)

from conftest import make_fake_batch, replace_model
from probes import group_opt_states, trainable_mask

EVERY = 2  # gradual: layer_1 opens at step 2, layer_0 at 4, the embeddings at 6
HEAD_DENSE_LAYERS = 5  # genre: dense_0, dense_1, out; sentiment: dense_0, out


def with_train(config, **changes):
    base = TrainConfig(
        learning_rate=1e-3,
        head_learning_rate=3e-3,
        warmup_steps=0,
        lr_schedule="constant",
        unfreeze_unit="steps",
        unfreeze_every=EVERY,
    )
    return dataclasses.replace(config, train=dataclasses.replace(base, **changes))


def to_numpy(tree):
    return jax.tree.map(np.array, tree)


def moved_groups(before, after, groups) -> set[str]:
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    return {g for c, g in zip(jax.tree.leaves(changed), jax.tree.leaves(groups), strict=True) if c}


def assert_frozen_identical(before, after, mask):
    for b, a, m in zip(
        jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(mask), strict=True
    ):
        if not m:
            assert np.array_equal(a, b, equal_nan=True)


@pytest.fixture(scope="module")
def gradual(tiny_config, tiny_model, tiny_params):
    """Gradual unfreezing with learned task weights and skipped non-finite steps: one step
    program, traced at most once for the whole module (compiles are this file's cost)."""
    config = with_train(
        tiny_config, freeze="gradual", uncertainty_weighting=True, skip_nonfinite=True
    )
    # BERT's dropout masks are a third of this step's compile time on CPU; the heads' stay.
    config = replace_model(config, backbone_dropout=False)
    params = init_train_params(tiny_params, config)
    optimizer = freezing.make_optimizer(config.train, params, total_steps=100)
    step = jit_train_step(
        chex.assert_max_traces(
            build_train_step(model_forward(tiny_model, config), optimizer, config), n=1
        )
    )
    return config, params, optimizer, step


def test_param_groups_of_the_real_model(tiny_params):
    groups = freezing.param_groups(tiny_params)
    assert freezing.group_names(groups) == (
        "embeddings",
        "head:genre",
        "head:sentiment",
        "layer_0",
        "layer_1",
    )
    assert groups["backbone"]["encoder"]["layer"]["1"]["output"]["dense"]["kernel"] == "layer_1"
    assert groups["heads"]["genre"]["norm_0"]["scale"] == "head:genre"


def test_init_train_params_adds_log_vars(tiny_config, tiny_params):
    config = with_train(tiny_config, uncertainty_weighting=True)
    params = init_train_params(tiny_params, config)
    assert params["log_vars"] == {"genre": 0.0, "sentiment": 0.0}
    assert params["log_vars"]["genre"].dtype == jnp.float32
    assert "log_vars" not in init_train_params(params, with_train(tiny_config))
    restored = {**params, "log_vars": {"genre": np.float32(0.5)}}  # kept; missing ones added
    assert init_train_params(restored, config)["log_vars"] == {"genre": 0.5, "sentiment": 0.0}
    assert "log_vars" not in tiny_params


def test_gradual_unfreezing_on_schedule_without_retrace_or_reset(gradual):
    config, params, optimizer, step = gradual
    groups = freezing.param_groups(params)
    batch = make_fake_batch(config, seed=1)
    batch["text"] = np.array(["a string column the jit cannot take"] * 8)  # must be dropped
    state = create_train_state(params, optimizer)
    opens = {"layer_1": EVERY, "layer_0": 2 * EVERY, "embeddings": 3 * EVERY}
    for i in range(8):
        before = to_numpy(state.params)
        state, metrics = step(state, batch, jax.random.key(0))
        after = to_numpy(state.params)
        mask = trainable_mask(params, config.train, i)
        assert_frozen_identical(before, after, mask)
        trainable = {
            g for m, g in zip(jax.tree.leaves(mask), jax.tree.leaves(groups), strict=True) if m
        }
        assert moved_groups(before, after, groups) == trainable, i
        assert bool(metrics["finite"]) and int(metrics["skipped"]) == 0
        per_group = group_opt_states(state.opt_state)
        # Heads train from step 0 and are never reset; a layer's Adam counts from its opening.
        assert int(per_group["head:genre"].inner_state[0].count) == i + 1
        for group, start in opens.items():
            assert int(per_group[group].inner_state[0].count) == max(0, i + 1 - start), group
    assert int(state.step) == 8


def test_loss_decreases_and_task_weights_move(gradual):
    config, params, optimizer, step = gradual
    batch = make_fake_batch(config, seed=2)
    state = create_train_state(params, optimizer)
    task_losses = []
    for _ in range(30):
        state, metrics = step(state, batch, jax.random.key(1))
        task_losses.append(sum(float(metrics["tasks"][t]["loss"]) for t in ("genre", "sentiment")))
    assert np.mean(task_losses[-5:]) < 0.7 * np.mean(task_losses[:5]), task_losses
    for task in ("genre", "sentiment"):
        labelled = int((batch["labels"][task] >= 0).sum())
        assert int(metrics["tasks"][task]["count"]) == labelled
        assert 0 <= int(metrics["tasks"][task]["correct"]) <= labelled
        # Uncertainty weighting learns s_t: it leaves 0 and is reported.
        assert abs(float(state.params["log_vars"][task])) > 1e-2
        assert "log_var" in metrics["tasks"][task]
    assert float(metrics["grad_norm"]) > 0 and float(metrics["update_norm"]) > 0


def test_nonfinite_step_is_skipped_and_counted(gradual):
    config, params, optimizer, step = gradual
    poisoned = jax.tree.map(np.array, params)
    poisoned["heads"]["genre"]["out"]["bias"][:] = np.nan
    state = create_train_state(poisoned, optimizer)
    opt_before = to_numpy(state.opt_state)
    state, metrics = step(state, make_fake_batch(config), jax.random.key(0))
    assert not bool(metrics["finite"]) and int(metrics["skipped"]) == 1
    chex.assert_trees_all_equal(to_numpy(state.params), poisoned)
    chex.assert_trees_all_equal(to_numpy(state.opt_state), opt_before)
    assert int(state.step) == 1


def _dot_count(fn, *args) -> int:
    def count(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "dot_general"
            for sub in jax.core.jaxprs_in_params(eqn.params):
                n += count(sub)
        return n

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_frozen_backbone_drops_the_backbone_backward_pass(tiny_config, tiny_model, tiny_params):
    """With no backbone group trainable, the step's only matmuls beyond the forward pass are
    the heads' backward ones (a BERT backward would add several per layer)."""
    batch = {k: v for k, v in make_fake_batch(tiny_config).items() if k != "index"}
    forward = _dot_count(
        build_eval_step(model_forward(tiny_model, tiny_config)), tiny_params, batch
    )
    assert forward >= 2 * 6 + HEAD_DENSE_LAYERS  # q, k, v, out, ffn in/out per layer
    config = with_train(tiny_config, freeze="backbone")
    optimizer = freezing.make_optimizer(config.train, tiny_params, total_steps=10)
    state = create_train_state(tiny_params, optimizer)
    train_step = build_train_step(model_forward(tiny_model, config), optimizer, config)
    backward = _dot_count(train_step, state, batch, jax.random.key(0)) - forward
    assert 0 < backward <= 2 * HEAD_DENSE_LAYERS


def test_forward_chunks_hold_an_inference_batchs_tokens_and_divide_the_batch():
    assert forward_chunk_rows(32, 128) == 4 and forward_chunk_rows(32, 64) == 8
    assert forward_chunk_rows(32, 16) == 32  # short rows: one pass
    assert forward_chunk_rows(24, 128) == 3 and forward_chunk_rows(9, 64) == 1
    for rows, length in [(32, 128), (24, 128), (9, 64), (10, 32), (7, 128)]:
        chunk = forward_chunk_rows(rows, length)
        assert rows % chunk == 0 and (chunk == 1 or chunk * length <= rows * 16)


def _one_pass(monkeypatch):
    monkeypatch.setattr(forward_lib, "forward_chunk_rows", lambda rows, length: rows)


def test_chunked_forward_gives_the_one_pass_outputs(
    tiny_config, tiny_model, tiny_params, monkeypatch
):
    """A long batch is embedded 2 rows at a time (4 chunks of 8 x 64), rows back in order."""
    batch = make_fake_batch(tiny_config, batch=8, seq=64, seed=3)
    assert forward_chunk_rows(8, 64) == 2
    probs, embedding = jax.jit(make_predict_fn(tiny_model))(tiny_params, batch)
    counts = make_eval_step(tiny_model, tiny_config)(tiny_params, batch)
    _one_pass(monkeypatch)  # new jitted functions below, so they trace the one-pass path
    one_pass = jax.jit(model_forward(tiny_model), static_argnums=2)
    logits_1, aux_1 = one_pass(tiny_params, batch, False, None)
    counts_1 = make_eval_step(tiny_model, tiny_config)(tiny_params, batch)
    np.testing.assert_allclose(embedding, aux_1["embedding"], rtol=1e-5, atol=1e-6)
    for task, p in probs.items():
        np.testing.assert_allclose(p, jax.nn.softmax(logits_1[task]), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(counts[task]["confusion"], counts_1[task]["confusion"])


def test_frozen_step_in_chunks_trains_the_heads_as_one_pass_does(
    tiny_config, tiny_model, tiny_params, monkeypatch
):
    """Frozen, deterministic backbone: chunked and one-pass steps give the same update (the
    heads' dropout masks included) and leave the backbone bit for bit; no loop is
    differentiated, so the step's extra matmuls are the heads' backward ones alone."""
    config = replace_model(with_train(tiny_config, freeze="backbone"), backbone_dropout=False)
    batch = make_fake_batch(config, batch=8, seq=64, seed=5)
    optimizer = freezing.make_optimizer(config.train, tiny_params, total_steps=10)
    key = jax.random.key(1)

    def one_step(model):
        state = create_train_state(tiny_params, optimizer)
        step = jit_train_step(build_train_step(model_forward(model, config), optimizer, config))
        return step(state, batch, key)

    chunked, metrics = one_step(tiny_model)
    pure = build_train_step(model_forward(tiny_model, config), optimizer, config)
    state = create_train_state(tiny_params, optimizer)
    inputs = {k: v for k, v in batch.items() if k != "index"}
    forward = _dot_count(build_eval_step(model_forward(tiny_model, config)), tiny_params, inputs)
    assert 0 < _dot_count(pure, state, inputs, key) - forward <= 2 * HEAD_DENSE_LAYERS
    assert "scan" in str(jax.make_jaxpr(pure)(state, inputs, key))  # the chunks' loop
    _one_pass(monkeypatch)
    pure = build_train_step(model_forward(tiny_model, config), optimizer, config)
    assert "scan" not in str(jax.make_jaxpr(pure)(state, inputs, key))
    single, metrics_1 = one_step(tiny_model)
    chex.assert_trees_all_close(
        to_numpy(chunked.params), to_numpy(single.params), rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_equal(
        to_numpy(chunked.params["backbone"]), to_numpy(tiny_params["backbone"])
    )
    np.testing.assert_allclose(metrics["loss"], metrics_1["loss"], rtol=1e-5)
    assert float(metrics["grad_norm"]) > 0


def test_frozen_step_in_chunks_keeps_berts_dropout(tiny_config, tiny_model, tiny_params):
    """The default frozen setting (BERT's dropout on): each chunk draws its own masks, the
    backbone stays bit for bit, and the loss is not the dropout-free one."""
    config = with_train(tiny_config, freeze="backbone")
    batch = make_fake_batch(config, batch=8, seq=64, seed=6)
    optimizer = freezing.make_optimizer(config.train, tiny_params, total_steps=10)
    losses = []
    for c in (config, replace_model(config, backbone_dropout=False)):
        step = jit_train_step(build_train_step(model_forward(tiny_model, c), optimizer, c))
        state, metrics = step(create_train_state(tiny_params, optimizer), batch, jax.random.key(2))
        losses.append(float(metrics["loss"]))
        chex.assert_trees_all_equal(
            to_numpy(state.params["backbone"]), to_numpy(tiny_params["backbone"])
        )
    assert np.isfinite(losses).all() and losses[0] != losses[1]


def test_a_frozen_step_compiles_lean_on_cpu_and_a_full_step_does_not(tiny_config):
    frozen = with_train(tiny_config, freeze="backbone")
    full = with_train(tiny_config, freeze="none")
    if jax.default_backend() == "cpu":
        assert step_compiler_options(frozen) == LEAN_COMPILE_OPTIONS
    assert step_compiler_options(replace_model(full, remat=False)) is None
    assert "xla_cpu_use_fusion_emitters" not in (step_compiler_options(full) or {})


def test_eval_and_predict_agree(tiny_config, tiny_model, tiny_params):
    batch = make_fake_batch(tiny_config, seed=4)
    batch["valid"] = np.arange(8) < 6  # the last two rows pad a short batch
    probs, embedding = make_predict_fn(tiny_model)(tiny_params, batch)
    counts = make_eval_step(tiny_model, tiny_config)(tiny_params, batch)
    assert embedding.shape == (8, 32)
    for task in tiny_config.tasks:
        p = np.asarray(probs[task.name])
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
        labels = batch["labels"][task.name]
        keep = (labels >= 0) & batch["valid"]
        expected = np.zeros((task.num_labels, task.num_labels), np.int32)
        np.add.at(expected, (labels[keep], p.argmax(axis=1)[keep]), 1)
        np.testing.assert_array_equal(counts[task.name]["confusion"], expected)
        assert counts[task.name]["confusion"].dtype == jnp.int32
        # The loss sum is the cross-entropy of the predicted probabilities, counted rows only.
        hand = -np.log(p[np.flatnonzero(keep), labels[keep]]).sum()
        np.testing.assert_allclose(counts[task.name]["loss_sum"], hand, rtol=1e-5)
