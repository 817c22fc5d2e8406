"""A task reading its own copy of the encoder's top layers (``tasks.<task>.own_layers``).

The tiny backbone runs 2 layers up to its pooled layer; genre's own copy of the top one
reads the states after layer 0, so only genre trains the copy and genre no longer trains
the shared layer 1.
"""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from mtl_jax import cli, export, features, freezing
from mtl_jax import forward as forward_lib
from mtl_jax.config import TrainConfig
from mtl_jax.encoder import bert_module, frozen_bert_config, load_backbone, pool
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


def test_own_layers_compute_as_the_shared_ones_in_bfloat16(own, tiny_config, tiny_backbone):
    """On CPU, bf16 dense operands under float32 activations (mtl_jax.dots), as the backbone."""
    config, _, params = own
    bf16 = dataclasses.replace(config.model, dtype="bfloat16")
    model = build_model(dataclasses.replace(config, model=bf16), tiny_backbone)
    shared = build_model(dataclasses.replace(tiny_config, model=bf16), tiny_backbone)
    batch = make_fake_batch(config, seed=1)
    logits, _ = model_forward(model)(params, batch, False, None)
    heads = {k: v for k, v in params["heads"].items()}
    heads["genre"] = {k: v for k, v in heads["genre"].items() if k != "own"}
    want, _ = model_forward(shared)(
        {"backbone": params["backbone"], "heads": heads}, batch, False, None
    )
    for task in want:
        np.testing.assert_allclose(logits[task], want[task], rtol=1e-5, atol=1e-6)


def test_pretrained_init_copies_the_pretrained_top_layer(own, tiny_backbone):
    config, model, _ = own
    weights = perturbed(init_params(model, jax.random.key(0), tiny_backbone)["backbone"], 3)
    pretrained = dataclasses.replace(tiny_backbone, params=weights)
    params = init_params(model, jax.random.key(0), pretrained)
    chex.assert_trees_all_equal(params["backbone"], weights)
    chex.assert_trees_all_equal(
        params["heads"]["genre"]["own"]["layer_0"], weights["encoder"]["layer"]["1"]
    )


@pytest.mark.parametrize("backbone_dropout", [False, True])
def test_own_layers_draw_dropout_exactly_when_the_backbone_does(own, backbone_dropout):
    """Training with BERT's dropout off, genre's own layer is as deterministic as the shared
    ones (the heads' own dropout off here): the training forward is the evaluation one."""
    config, model, params = own
    tasks = tuple(dataclasses.replace(t, dropout=0.0) for t in config.tasks)
    model_config = dataclasses.replace(config.model, backbone_dropout=backbone_dropout)
    config = dataclasses.replace(config, tasks=tasks, model=model_config)
    model = dataclasses.replace(model, head_specs=tuple((*s[:3], 0.0) for s in model.head_specs))
    batch = make_fake_batch(config, seed=8)
    trained, _ = model_forward(model, config)(params, batch, True, {"dropout": jax.random.key(4)})
    evaluated, _ = model_forward(model, config)(params, batch, False, None)
    same = np.allclose(trained["genre"], evaluated["genre"], rtol=1e-6, atol=1e-6)
    assert same is not backbone_dropout


def test_gradual_unfreezing_opens_the_own_copy_with_the_top_layer(own):
    _, _, params = own
    names = freezing.group_names(freezing.param_groups(params))
    schedule = freezing.unfreeze_schedule("gradual", names, every_steps=2)
    assert schedule["head:genre/own"] == schedule["layer_1"] == 2 and schedule["head:genre"] == 0


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


def test_a_run_with_own_layers_restores_predicts_and_exports(own, tmp_path):
    """The export's BERT gives the states its heads.json names; the exported heads, on them,
    give the run's logits."""
    config, _, params = own
    run = make_run(tmp_path / "run", tasks=config.tasks)
    trained = load_trained(str(run))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, trained.params), perturbed(params, LATEST))
    records = predict_texts(trained, ["the ship sailed on", "a kiss"])
    assert [sorted(r) for r in records] == [["genre", "sentiment", "text"]] * 2

    output = export.export_run(run, tmp_path / "exported").output
    layout = json.loads((output / "heads.json").read_text(encoding="utf-8"))
    genre, sentiment = layout["tasks"]["genre"], layout["tasks"]["sentiment"]
    assert genre["own_layers"] == 1 and sentiment["own_layers"] == 0 and "own" not in sentiment
    assert genre["own"]["hidden_state"] == 1 and genre["own"]["layers"] == ["genre.own.layer_0"]
    tensors = load_file(str(output / "heads.safetensors"))
    query = tensors["genre.own.layer_0.attention.self.query.weight"]  # PyTorch [out, in]
    kernel = trained.params["heads"]["genre"]["own"]["layer_0"]["attention"]["self"]["query"]
    np.testing.assert_array_equal(query, np.asarray(kernel["kernel"]).T)
    card = (output / "README.md").read_text(encoding="utf-8")
    assert "its own copy of the top 1 layer(s)" in card and "BertLayer(bert.config)" in card

    exported = load_backbone(str(output))
    bert = bert_module(frozen_bert_config(exported.bert_config), exported.num_layers)
    batch = make_fake_batch(config, seed=6)
    states = bert.apply(
        {"params": {k: v for k, v in exported.params.items() if k != "pooler"}},
        batch["input_ids"],
        batch["attention_mask"],
        np.zeros_like(batch["input_ids"]),
        output_hidden_states=True,
    ).hidden_states
    labels, heads, head_params = export.load_heads(output)
    chex.assert_trees_all_equal(head_params, jax.tree.map(np.asarray, trained.params["heads"]))
    embedding = pool(states[-1], batch["attention_mask"])
    below = {1: states[genre["own"]["hidden_state"]]}
    logits = heads.apply(
        {"params": head_params}, embedding, below=below, mask=batch["attention_mask"]
    )
    want, _ = model_forward(trained.model)(trained.params, batch, False, None)
    for task in labels:
        np.testing.assert_allclose(logits[task], want[task], rtol=1e-5, atol=1e-5)


def test_too_many_own_layers_stop_a_run_before_its_workdir_holds_one(tmp_path, capsys):
    """One line naming the key; the workdir stays free for the corrected command."""
    workdir = tmp_path / "run"
    argv = ["train", "--preset", "demo", "--set", 'model.backbone="tiny"', "--workdir"]
    code = cli.main([*argv, str(workdir), "--set", "tasks.genre.own_layers=3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "tasks.genre.own_layers': 3" in err, err
    assert not (workdir / "config.json").exists()
