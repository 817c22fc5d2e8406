"""The params' EMA (``train.ema_decay``): its arithmetic, frozen groups, and that a run
evaluates, keeps, exports and resumes the EMA rather than the raw weights."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from test_resume import SETS, STEPS, Crash, assert_trees_identical, crash_at, run_fit

from mtl_jax import freezing
from mtl_jax.checkpoint import Checkpointer, restore_params
from mtl_jax.config_io import apply_overrides
from mtl_jax.ema import eval_params, find_ema, params_ema
from mtl_jax.encoder import load_backbone
from mtl_jax.errors import UserError
from mtl_jax.evaluate import evaluate_dataset
from mtl_jax.export import export_run
from mtl_jax.forward import model_forward, model_params
from mtl_jax.metrics_log import read_metrics
from mtl_jax.presets import preset
from mtl_jax.run_setup import load_run_data
from mtl_jax.train import (
    build_train_step,
    create_train_state,
    init_train_params,
    make_eval_step,
    make_train_step,
)

from conftest import make_fake_batch, replace_model


def test_the_ema_follows_its_recursion_and_a_constant_param_stays_bit_identical():
    decay = 0.9
    params = {"moving": jnp.array([1.0, -2.0, 0.5]), "frozen": jnp.array([0.1, 0.3])}
    tx = optax.chain(
        optax.multi_transform(
            {"sgd": optax.sgd(0.5), "zero": optax.set_to_zero()},
            {"moving": "sgd", "frozen": "zero"},
        ),
        params_ema(decay),
    )
    state = tx.init(params)
    expected = np.asarray(params["moving"], np.float64)
    for step in range(4):
        grads = {k: jnp.full_like(p, step + 1.0) for k, p in params.items()}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        d = min(decay, (2 + step) / (11 + step))  # warmed up: this is update step + 1
        expected = d * expected + (1 - d) * np.asarray(params["moving"], np.float64)
        ema = find_ema(state)
        np.testing.assert_allclose(ema["moving"], expected, rtol=1e-6, atol=1e-6)
        assert np.array_equal(ema["frozen"], params["frozen"])  # bit for bit, every step
    assert eval_params(params, state) is find_ema(state)
    assert eval_params(params, tx.init(params)[0]) is params  # no EMA kept: the params


def test_params_ema_rejects_a_decay_outside_0_1():
    with pytest.raises(ValueError, match="decay"):
        params_ema(1.0)
    config = apply_overrides(preset("demo"), ["train.ema_decay=1.0"])
    with pytest.raises(UserError, match="train.ema_decay"):
        config.validate()


def test_train_step_keeps_the_ema_with_the_backbone_frozen_bit_for_bit(
    tiny_config, tiny_model, tiny_params
):
    """Through the real optimiser and step: the frozen backbone's EMA is the backbone
    itself, the heads' EMA is the recursion over the params of every step."""
    decay = 0.8
    train = dataclasses.replace(
        tiny_config.train, freeze="backbone", ema_decay=decay, head_learning_rate=1e-2
    )
    config = replace_model(dataclasses.replace(tiny_config, train=train), backbone_dropout=False)
    params = init_train_params(tiny_params, config)
    optimizer = freezing.make_optimizer(config.train, params, total_steps=10)
    step = make_train_step(tiny_model, optimizer, config)
    state = create_train_state(params, optimizer)
    key = jax.random.key(0)
    expected = jax.tree.map(lambda x: np.asarray(x, np.float64), params["heads"])
    for i in range(3):
        state, _ = step(state, make_fake_batch(config, seed=i), key)
        heads = jax.tree.map(lambda x: np.asarray(x, np.float64), state.params["heads"])
        d = min(decay, (2 + i) / (11 + i))
        expected = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, expected, heads)
    ema = find_ema(state.opt_state)
    assert_trees_identical(ema["backbone"], state.params["backbone"])
    assert_trees_identical(state.params["backbone"], params["backbone"])
    jax.tree.map(
        lambda e, x: np.testing.assert_allclose(e, x, rtol=1e-5, atol=1e-7), ema["heads"], expected
    )
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: not np.allclose(a, b), ema["heads"], state.params["heads"])
    )
    assert any(moved)  # the EMA lags the params: it is not a copy of them


def test_the_ema_costs_the_step_nothing_for_a_group_that_never_trains(
    tiny_config, tiny_model, tiny_params
):
    """With the backbone frozen, the compiled step's EMA work (3 flops a param) covers the
    heads only: a frozen MiniLM backbone's EMA would cost a cached step several times its
    own work."""

    def step_flops(ema_decay):
        train = dataclasses.replace(tiny_config.train, freeze="backbone", ema_decay=ema_decay)
        config = dataclasses.replace(tiny_config, train=train)
        params = init_train_params(tiny_params, config)
        optimizer = freezing.make_optimizer(config.train, params, total_steps=10)
        step = jax.jit(build_train_step(model_forward(tiny_model, config), optimizer, config))
        state = create_train_state(params, optimizer)
        lowered = step.lower(state, make_fake_batch(config), jax.random.key(0))
        return lowered.compile().cost_analysis()["flops"]

    def size(tree):
        return sum(x.size for x in jax.tree.leaves(tree))

    heads, backbone = size(tiny_params["heads"]), size(tiny_params["backbone"])
    extra = step_flops(0.9) - step_flops(0.0)
    assert 3 * heads <= extra < 3 * heads + backbone  # all params tracked: 3 * (heads + backbone)


EMA_SETS = [*SETS, "train.ema_decay=0.7"]


@pytest.fixture(scope="module")
def ema_setup():
    config = apply_overrides(preset("demo"), EMA_SETS).validate()
    backbone = load_backbone("tiny")
    return config, backbone, load_run_data(config, backbone.tokenizer)


@pytest.fixture(scope="module")
def ema_run(ema_setup, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ema") / "run"
    return run_fit(ema_setup, workdir), workdir


def test_a_run_evaluates_and_saves_the_ema_not_the_raw_params(ema_setup, ema_run):
    config, _, run_data = ema_setup
    result, workdir = ema_run
    ema = find_ema(result.state.opt_state)
    eval_step = make_eval_step(result.model, config)
    on_ema = evaluate_dataset(eval_step, model_params(ema), run_data.dev, config)
    on_raw = evaluate_dataset(eval_step, model_params(result.state.params), run_data.dev, config)
    assert result.eval == on_ema  # the run's last evaluation scored the EMA
    assert on_raw["genre"]["loss"] != on_ema["genre"]["loss"]

    latest, meta = restore_params(workdir, "latest")  # what eval, predict and export read
    assert meta["weights"] == "ema"
    assert_trees_identical(latest, jax.tree.map(np.asarray, ema))
    best, best_meta = restore_params(workdir, "best")
    assert best_meta["weights"] == "ema"
    dev_events = [e for e in read_metrics(workdir) if e["split"] == "dev"]
    best_event = next(e for e in dev_events if e["step"] == best_meta["step"])
    scored = evaluate_dataset(eval_step, model_params(best), run_data.dev, config)
    assert scored["genre"]["macro_f1"] == pytest.approx(best_event["genre/macro_f1"])


def test_a_crashed_ema_run_resumes_bit_identical(ema_setup, ema_run, tmp_path):
    reference, ref_dir = ema_run
    run = tmp_path / "crashed"
    with pytest.raises(Crash):
        run_fit(ema_setup, run, on_step=crash_at(11))
    result = run_fit(ema_setup, run)
    assert_trees_identical(result.state.opt_state, reference.state.opt_state)  # EMA included
    assert_trees_identical(result.state.params, reference.state.params)
    assert read_metrics(run) == read_metrics(ref_dir)


def test_a_checkpoint_holds_the_ema_once_and_refuses_a_resume_without_it(ema_setup, ema_run):
    config, _, _ = ema_setup
    result, workdir = ema_run
    step_dir = workdir / "checkpoints" / str(STEPS)
    saved = ocp.PyTreeCheckpointer().restore(step_dir / "opt_state")
    n_saved = sum(np.size(x) for x in jax.tree.leaves(saved))
    n_params = sum(np.size(x) for x in jax.tree.leaves(result.state.params))
    # Adam's two moments are twice the params; an EMA inside opt_state would add a third.
    assert 2 * n_params <= n_saved < 2.5 * n_params
    assert (step_dir / "ema").is_dir()

    params = jax.eval_shape(lambda p: p, result.state.params)
    plain = dataclasses.replace(config.train, ema_decay=0.0)
    no_ema = jax.eval_shape(freezing.make_optimizer(plain, params, total_steps=STEPS).init, params)
    checkpointer = Checkpointer(workdir)
    try:
        with pytest.raises(UserError, match=r"train\.ema_decay"):
            checkpointer.restore(STEPS, params, no_ema)
    finally:
        checkpointer.close()


def test_an_export_says_it_holds_the_ema(ema_run, tmp_path):
    _, workdir = ema_run
    export_run(workdir, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "mtl_jax.json").read_text())
    assert meta["run"]["weights"] == "ema"
    assert "EMA" in (tmp_path / "out" / "README.md").read_text()
