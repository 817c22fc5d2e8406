"""A task reading its own copy of the encoder's top layers (``tasks.<task>.own_layers``).

The tiny backbone runs 2 layers up to its pooled layer; genre's own copy of the top one
reads the states after layer 0, so only genre trains the copy and genre no longer trains
the shared layer 1.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import cli, features, freezing
from mtl_jax import forward as forward_lib
from mtl_jax.config import TrainConfig
from mtl_jax.errors import UserError
from mtl_jax.forward import forward_chunk_rows, model_forward
from mtl_jax.inference import load_trained, predict_texts
from mtl_jax.model import build_model, init_params
from mtl_jax.train import build_train_step, create_train_state, jit_train_step, make_predict_fn

from conftest import make_fake_batch
from run_helpers import LATEST, make_run, perturbed


def own_config(config, n: int = 1, task: str = "genre"):
    tasks = tuple(
        dataclasses.replace(t, own_layers=n) if t.name == task else t for t in config.tasks
    )
    return dataclasses.replace(config, tasks=tasks)


@pytest.fixture(scope="module")
def own(tiny_config, tiny_backbone):
    config = own_config(tiny_config)
    model = build_model(config, tiny_backbone)
    return config, model, init_params(model, jax.random.key(0), tiny_backbone)


@pytest.mark.parametrize("n", [1, 2])
def test_own_layers_start_as_copies_so_every_task_reads_what_it_read(
    tiny_config, tiny_backbone, tiny_model, tiny_params, n
):
    config = own_config(tiny_config, n)
    model = build_model(config, tiny_backbone)
    params = init_params(model, jax.random.key(0), tiny_backbone)
    assert model.n_layers == 2 and model.own_layers == (("genre", n),)
    layers = params["backbone"]["encoder"]["layer"]
    own = params["heads"]["genre"].pop("own")
    assert sorted(own) == [f"layer_{i}" for i in range(n)]
    for i in range(n):
        chex.assert_trees_all_equal(own[f"layer_{i}"], layers[str(model.n_layers - n + i)])
    chex.assert_trees_all_equal(params, tiny_params)  # everything else is the shared model's
    params["heads"]["genre"]["own"] = own

    batch = make_fake_batch(config, seed=1)
    logits, _ = model_forward(model)(params, batch, False, None)
    shared, _ = model_forward(tiny_model)(tiny_params, batch, False, None)
    for task in shared:
        np.testing.assert_allclose(logits[task], shared[task], rtol=1e-5, atol=1e-6)


def _grads(model, params, batch, task):
    """Gradients of a fixed linear function of one task's logits."""
    weights = jax.random.normal(jax.random.key(7), (batch["input_ids"].shape[0], 5))

    def objective(p):
        logits, _ = model_forward(model)(p, batch, False, None)
        return jnp.sum(logits[task] * weights[:, : logits[task].shape[1]])

    return jax.grad(objective)(params)


def _moves(tree) -> bool:
    return any(bool(np.any(np.asarray(x) != 0)) for x in jax.tree.leaves(tree))


def test_only_its_task_trains_its_own_layers_and_it_leaves_the_shared_top_layer(own):
    config, model, params = own
    batch = make_fake_batch(config, seed=2)
    genre = _grads(model, params, batch, "genre")
    layers = genre["backbone"]["encoder"]["layer"]
    assert _moves(genre["heads"]["genre"]["own"]) and _moves(layers["0"])
    assert not _moves(layers["1"]), "genre reads its own copy of layer 1, not the shared one"
    assert not _moves(genre["heads"]["sentiment"])

    sentiment = _grads(model, params, batch, "sentiment")
    assert not _moves(sentiment["heads"]["genre"]), "sentiment never moves genre's layers"
    assert _moves(sentiment["backbone"]["encoder"]["layer"]["1"])


@pytest.mark.parametrize(
    ("freeze", "frozen", "trained"),
    [
        ("head:genre", [("heads", "genre")], [("backbone",), ("heads", "sentiment")]),
        ("backbone", [("backbone",)], [("heads", "genre", "own"), ("heads", "sentiment")]),
    ],
)
def test_own_layers_freeze_with_their_head_and_train_at_the_backbones_rate(
    own, freeze, frozen, trained
):
    config, model, params = own
    config = dataclasses.replace(
        config,
        train=TrainConfig(
            freeze=freeze,
            learning_rate=1e-3,
            head_learning_rate=3e-2,
            warmup_steps=0,
            lr_schedule="constant",
        ),
    )
    names = freezing.group_names(freezing.param_groups(params))
    assert "head:genre/own" in names
    rates = freezing.group_learning_rates(config.train, names)
    assert rates["head:genre/own"] == 1e-3 and rates["head:genre"] == 3e-2

    optimizer = freezing.make_optimizer(config.train, params, total_steps=10)
    step = jit_train_step(build_train_step(model_forward(model, config), optimizer, config))
    state, _ = step(
        create_train_state(params, optimizer), make_fake_batch(config), jax.random.key(3)
    )
    after = jax.tree.map(np.asarray, state.params)

    def part(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    for path in frozen:
        chex.assert_trees_all_equal(part(after, path), part(params, path))
    for path in trained:
        moved = jax.tree.map(
            lambda a, b: bool(np.any(a != b)), part(after, path), part(params, path)
        )
        assert all(jax.tree.leaves(moved)), f"{'/'.join(path)} did not all train under {freeze}"


def test_chunked_evaluation_gives_the_one_pass_outputs(own, monkeypatch):
    """A long batch runs the backbone 2 rows at a time; genre's own layer reads the states
    those chunks return, as in one pass."""
    config, model, params = own
    batch = make_fake_batch(config, batch=8, seq=64, seed=4)
    assert forward_chunk_rows(8, 64) == 2
    probs, _ = jax.jit(make_predict_fn(model))(params, batch)
    monkeypatch.setattr(forward_lib, "forward_chunk_rows", lambda rows, length: rows)
    logits, _ = jax.jit(model_forward(model), static_argnums=2)(params, batch, False, None)
    for task, p in probs.items():
        np.testing.assert_allclose(p, jax.nn.softmax(logits[task]), rtol=1e-5, atol=1e-6)


def test_more_own_layers_than_the_model_runs_is_a_config_error(tiny_config, tiny_backbone):
    with pytest.raises(UserError, match=r"tasks\.genre\.own_layers': 3, but the model runs 2"):
        build_model(own_config(tiny_config, 3), tiny_backbone)
    with pytest.raises(UserError, match=r"tasks\.genre\.own_layers"):
        own_config(tiny_config, -1).validate()


def test_own_layers_train_from_token_states_never_from_the_cache(tiny_config):
    config = dataclasses.replace(own_config(tiny_config), train=TrainConfig(freeze="backbone"))
    assert not features.can_cache(config)
    assert any("tasks.genre.own_layers" in r for r in features.cache_blockers(config))


def test_a_run_with_own_layers_restores_predicts_and_refuses_export(own, tmp_path, capsys):
    config, _, params = own
    run = make_run(tmp_path / "run", tasks=config.tasks)
    trained = load_trained(str(run))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, trained.params), perturbed(params, LATEST))
    records = predict_texts(trained, ["the ship sailed on", "a kiss"])
    assert [sorted(r) for r in records] == [["genre", "sentiment", "text"]] * 2

    output = tmp_path / "exported"
    code = cli.main(["export", "--checkpoint", str(run), "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "tasks.genre.own_layers = 1" in err and "export a run trained without" in err
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
