"""The feature cache: cached head training equals the full frozen-backbone step."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import data as data_lib
from mtl_jax import features, freezing
from mtl_jax.config import TrainConfig
from mtl_jax.errors import UserError
from mtl_jax.losses import masked_cross_entropy, symmetric_kl
from mtl_jax.model import MultiTaskModel, build_model
from mtl_jax.synthetic import make_rows
from mtl_jax.train import (
    build_train_step,
    create_train_state,
    init_train_params,
    jit_train_step,
    make_eval_step,
    make_train_step,
    rdrop_pairs,
)

STEPS = 5


@pytest.fixture(scope="module")
def config(tiny_config):
    """Frozen deterministic backbone, learned task weights, head dropout on (genre)."""
    train = TrainConfig(
        freeze="backbone",
        batch_size=8,
        head_learning_rate=1e-2,
        lr_schedule="constant",
        uncertainty_weighting=True,
    )
    model = dataclasses.replace(tiny_config.model, backbone_dropout=False)
    config = dataclasses.replace(tiny_config, model=model, train=train)
    assert config.task("genre").dropout > 0  # the cached heads must draw the same masks
    return config


@pytest.fixture(scope="module")
def dataset(config, tiny_backbone):
    return data_lib.dataset_from_rows(make_rows(37, seed=3), config, tiny_backbone.tokenizer)


@pytest.fixture(scope="module")
def cache(config, tiny_model, tiny_params, dataset):
    return features.cache_embeddings(tiny_model, tiny_params, dataset, config)


def test_cache_rows_are_the_per_row_embeddings(config, tiny_model, tiny_params, dataset, cache):
    assert cache.shape == (len(dataset), 32) and cache.dtype == np.float32
    assert len(set(dataset.lengths.tolist())) > 3  # several lengths, sorted into buckets

    @jax.jit
    def embed_one(ids, types, mask):
        emb, _ = tiny_model.apply(
            {"params": tiny_params}, ids, mask, types, method=MultiTaskModel.embed
        )
        return emb[0]

    for i in range(len(dataset)):
        n = int(dataset.lengths[i])
        ids, types, mask = (np.zeros((1, config.model.max_length), np.int32) for _ in range(3))
        ids[0, :n], types[0, :n], mask[0, :n] = dataset.input_ids[i], 0, 1
        np.testing.assert_allclose(cache[i], embed_one(ids, types, mask), rtol=1e-5, atol=1e-5)


def test_cached_batch_gathers_rows_and_zeros_padding(cache):
    batch = {"index": np.array([3, 0, 7, -1, -1], np.int32), "labels": {}}
    out = features.cached_batch(batch, cache)
    np.testing.assert_array_equal(out["embedding"][:3], cache[[3, 0, 7]])
    np.testing.assert_array_equal(out["embedding"][3:], 0.0)
    assert out["index"] is batch["index"] and "embedding" not in batch


def test_cached_step_equals_full_frozen_step(
    config, tiny_model, tiny_params, dataset, cache, monkeypatch
):
    params = init_train_params(tiny_params, config)
    optimizer = freezing.make_optimizer(config.train, params, total_steps=100)
    full_step = make_train_step(tiny_model, optimizer, config)
    forward = features.cached_forward(tiny_model, config)
    pure_cached_step = build_train_step(forward, optimizer, config)
    cached_step = jit_train_step(chex.assert_max_traces(pure_cached_step, n=1), forward.step_keys)
    stream = data_lib.BatchStream(dataset, config, epochs=2)
    batches = [next(stream) for _ in range(STEPS)]
    assert len({b["input_ids"].shape[1] for b in batches}) > 1  # one trace over all lengths
    assert any((b["index"] < 0).any() for b in batches)  # the short last batch is padded

    key = jax.random.key(7)
    full = create_train_state(params, optimizer)
    cached = create_train_state(params, optimizer)
    for batch in batches:
        full, full_metrics = full_step(full, batch, key)
        fed = features.cached_batch(batch, cache)
        fed["text"] = np.array(["a string key the step must drop"] * len(batch["index"]))
        cached, cached_metrics = cached_step(cached, fed, key)
        chex.assert_trees_all_equal_structs(cached_metrics, full_metrics)
        chex.assert_trees_all_close(cached_metrics, full_metrics, rtol=1e-5, atol=1e-5)

    assert int(cached.step) == STEPS
    chex.assert_trees_all_equal_structs(cached, full)
    # atol 5e-5: Adam divides by sqrt(v), so a near-zero gradient's last-bit difference between
    # the two programs (their kernels differ by CPU: AMX vs AVX-512) moves a weight ~1e-5
    chex.assert_trees_all_close(cached.params["heads"], full.params["heads"], rtol=1e-5, atol=5e-5)
    chex.assert_trees_all_close(cached.params["log_vars"], full.params["log_vars"], atol=1e-5)
    start = jax.tree.map(np.asarray, params["backbone"])
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, cached.params["backbone"]), start)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, full.params["backbone"]), start)
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), params["heads"], cached.params["heads"]
    )
    assert all(jax.tree.leaves(moved))


def test_cached_eval_equals_full_eval(config, tiny_model, tiny_params, dataset, cache):
    full = make_eval_step(tiny_model, config)
    cached = make_eval_step(tiny_model, config, features.cached_forward(tiny_model, config))
    for batch in data_lib.eval_batches(dataset, config):
        expected = full(tiny_params, batch)
        got = jax.tree.map(np.asarray, cached(tiny_params, features.cached_batch(batch, cache)))
        expected = jax.tree.map(np.asarray, expected)
        # The same predictions, counted exactly (integer leaves); float sums may differ in the
        # last bit, since the two programs' kernels differ by CPU (AMX vs AVX-512, as above).
        chex.assert_trees_all_equal_structs(got, expected)
        for value, want in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            if np.issubdtype(want.dtype, np.integer):
                np.testing.assert_array_equal(value, want)
            else:
                np.testing.assert_allclose(value, want, rtol=1e-6)


@pytest.mark.parametrize(
    ("freeze", "dropout", "enabled", "expected"),
    [
        ("backbone", False, True, True),
        ("all", False, True, True),
        ("top:0", False, True, True),
        ("backbone", True, True, False),
        ("none", False, True, False),
        ("top:1", False, True, False),
        ("gradual", False, True, False),
        ("backbone", False, False, False),
    ],
)
def test_can_cache(config, freeze, dropout, enabled, expected):
    cfg = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, backbone_dropout=dropout),
        train=dataclasses.replace(config.train, freeze=freeze, cache_features=enabled),
    )
    assert features.can_cache(cfg) is expected


def test_token_cutoff_blocks_the_cache(config):
    cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, token_cutoff=0.1))
    assert features.can_cache(config) and not features.can_cache(cfg)
    assert features.cache_blockers(cfg) == [
        "train.token_cutoff > 0 hides different tokens at every step"
    ]


def test_cached_step_refuses_a_trainable_or_random_backbone(config, tiny_model, tiny_params):
    for cfg in (
        dataclasses.replace(config, train=dataclasses.replace(config.train, freeze="none")),
        dataclasses.replace(config, model=dataclasses.replace(config.model, backbone_dropout=True)),
        dataclasses.replace(config, train=dataclasses.replace(config.train, token_cutoff=0.1)),
    ):
        with pytest.raises(UserError, match="cached embeddings"):
            features.cached_forward(tiny_model, cfg)


def _dot_count(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for sub in jax.core.jaxprs_in_params(eqn.params):
            n += _dot_count(sub)
    return n


def test_cached_step_runs_no_backbone(config, tiny_model, tiny_params):
    """Only the heads' matmuls: 5 dense layers forward, at most 2 each backward."""
    params = init_train_params(tiny_params, config)
    optimizer = freezing.make_optimizer(config.train, params, total_steps=10)
    state = create_train_state(params, optimizer)
    step = build_train_step(features.cached_forward(tiny_model, config), optimizer, config)
    batch = {
        "embedding": jnp.zeros((8, 32)),
        "labels": {t.name: jnp.zeros(8, jnp.int32) for t in config.tasks},
    }
    assert _dot_count(jax.make_jaxpr(step)(state, batch, jax.random.key(0)).jaxpr) <= 3 * 5


def random_batch(config, seed: int) -> dict:
    """16 rows of random embeddings with a random label for every task (numpy, mutable)."""
    rng = np.random.default_rng(seed)
    labels = {t.name: rng.integers(0, t.num_labels, 16).astype(np.int32) for t in config.tasks}
    return {"embedding": rng.normal(size=(16, 32)).astype(np.float32), "labels": labels}


def with_task_changes(config, changes: dict[str, dict]):
    """``config`` with ``changes[task name]`` applied to those tasks."""
    tasks = tuple(dataclasses.replace(t, **changes.get(t.name, {})) for t in config.tasks)
    return dataclasses.replace(config, tasks=tasks)


def cached_step(cfg, model, tiny_params, batch, key):
    """One jitted train step of ``cfg``'s heads on the batch's embeddings, from the start:
    ``(forward, initial params, state, metrics)``."""
    params = init_train_params(tiny_params, cfg)
    optimizer = freezing.make_optimizer(cfg.train, params, total_steps=10)
    forward = features.cached_forward(model, cfg)
    step = jax.jit(build_train_step(forward, optimizer, cfg))
    state, metrics = step(create_train_state(params, optimizer), batch, key)
    return forward, params, state, metrics


def test_class_weights_reach_the_train_step(config, tiny_model, tiny_params):
    """Weight 1 on one genre and 0 elsewhere trains exactly as if only that genre's rows
    carried a genre label (same dropout key, so the same heads' masks)."""
    genre = config.task("genre")
    only_two = (0.0, 0.0, 1.0, 0.0, 0.0)
    weighted_config = with_task_changes(config, {"genre": {"class_weights": only_two}})
    batch = random_batch(config, 5)
    labels = batch["labels"]
    labels["genre"][:3] = 2  # some rows of the weighted class for sure
    masked = dict(labels, genre=np.where(labels["genre"] == 2, 2, -1).astype(np.int32))

    def one_step(cfg, batch_labels):
        key = jax.random.key(1)
        return cached_step(cfg, tiny_model, tiny_params, dict(batch, labels=batch_labels), key)[2:]

    w_state, w_metrics = one_step(weighted_config, labels)
    m_state, m_metrics = one_step(config, masked)
    assert genre.num_labels == len(only_two)
    w_genre, m_genre = w_metrics["tasks"]["genre"], m_metrics["tasks"]["genre"]
    np.testing.assert_allclose(w_genre["loss"], m_genre["loss"], rtol=1e-6)
    chex.assert_trees_all_close(w_state.params["heads"], m_state.params["heads"], atol=1e-6)
    # The counts still count every labelled row: weights change the loss, not the metrics.
    assert int(w_genre["count"]) == 16 and int(m_genre["count"]) < 16


def test_label_smoothing_reaches_the_train_step(config, tiny_model, tiny_params):
    """The step's sentiment loss is affine in its smoothing (the same logits: one key, one
    start), and genre's, unsmoothed, does not move."""
    batch = random_batch(config, 6)

    def task_losses(eps):
        cfg = with_task_changes(config, {"sentiment": {"label_smoothing": eps}})
        *_, metrics = cached_step(cfg, tiny_model, tiny_params, batch, jax.random.key(1))
        return {t: float(m["loss"]) for t, m in metrics["tasks"].items()}

    none, some, more = task_losses(0.0), task_losses(0.3), task_losses(0.6)
    assert some["sentiment"] != none["sentiment"]
    np.testing.assert_allclose(
        more["sentiment"] - some["sentiment"], some["sentiment"] - none["sentiment"], rtol=1e-4
    )
    assert none["genre"] == some["genre"] == more["genre"]


def test_rdrop_pulls_two_dropout_passes_of_each_row_together(config, tiny_backbone, tiny_params):
    """R-Drop: each task's loss is its mean over two passes with their own dropout (genre's
    head draws some), and the total adds alpha / 2 times each task's symmetric KL between
    the passes of the same rows, weighted by its loss weight. Without dropout the two passes
    are the same rows, and the step is the plain one."""
    batch = random_batch(config, 7)
    labels = batch["labels"]
    labels["sentiment"][:5] = -1
    weights = {"genre": 0.7, "sentiment": 1.3}
    key = jax.random.key(2)

    def setup(alpha, head_dropout=None):
        changes = {name: {"loss_weight": w} for name, w in weights.items()}
        if head_dropout is not None:
            changes = {name: {**c, "dropout": head_dropout} for name, c in changes.items()}
        cfg = with_task_changes(config, changes)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rdrop_alpha=alpha))
        return cached_step(cfg, build_model(cfg, tiny_backbone), tiny_params, batch, key)

    alpha = 2.0
    forward, params, _, metrics = setup(alpha)
    pairs = rdrop_pairs(batch)
    logits, _ = forward(params, pairs, True, {"dropout": jax.random.fold_in(key, 0)})
    first, second = logits["genre"][0::2], logits["genre"][1::2]
    assert not np.allclose(first, second)  # the passes drew different masks
    expected = 0.0
    for task, w in weights.items():
        ce, _ = masked_cross_entropy(logits[task], pairs["labels"][task])
        np.testing.assert_allclose(metrics["tasks"][task]["loss"], ce, rtol=1e-5)
        kl = symmetric_kl(logits[task][0::2], logits[task][1::2], labels[task])
        expected += w * ce + 0.5 * alpha * w * kl
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
    assert float(expected) > sum(w * metrics["tasks"][t]["loss"] for t, w in weights.items())

    _, _, plain_state, plain = setup(0.0, head_dropout=0.0)
    _, _, twin_state, twin = setup(1.0, head_dropout=0.0)
    np.testing.assert_allclose(float(twin["loss"]), float(plain["loss"]), rtol=1e-6)
    # Adam divides by the gradient's scale: a summation order apart, a few ulps of lr.
    chex.assert_trees_all_close(twin_state.params, plain_state.params, atol=1e-5)
