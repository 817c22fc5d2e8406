"""MultiTaskModel: parameter tree, heads, pretrained merge, dropout discipline."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.config import TaskConfig
from mtl_jax.errors import UserError
from mtl_jax.model import build_model, init_params, merge_pretrained, param_counts
from mtl_jax.trees import tree_diff


def _shapes(tree):
    return jax.tree_util.tree_map(np.shape, tree)


def test_param_tree_has_backbone_and_one_head_per_task(tiny_params):
    assert set(tiny_params) == {"backbone", "heads"}
    assert set(tiny_params["backbone"]) == {"embeddings", "encoder"}
    assert set(tiny_params["backbone"]["encoder"]["layer"]) == {"0", "1"}  # layer -2 of 3
    heads = _shapes(tiny_params["heads"])
    assert heads["genre"] == {
        "dense_0": {"kernel": (32, 256), "bias": (256,)},
        "norm_0": {"scale": (256,), "bias": (256,)},
        "dense_1": {"kernel": (256, 128), "bias": (128,)},
        "norm_1": {"scale": (128,), "bias": (128,)},
        "out": {"kernel": (128, 5), "bias": (5,)},
    }
    assert heads["sentiment"] == {
        "dense_0": {"kernel": (32, 128), "bias": (128,)},
        "norm_0": {"scale": (128,), "bias": (128,)},
        "out": {"kernel": (128, 2), "bias": (2,)},
    }


def test_apply_returns_logits_per_task_and_embedding(tiny_model, tiny_params, fake_batch):
    logits, aux = tiny_model.apply(
        {"params": tiny_params},
        fake_batch["input_ids"],
        fake_batch["attention_mask"],
        fake_batch["token_type_ids"],
    )
    assert {k: v.shape for k, v in logits.items()} == {"genre": (8, 5), "sentiment": (8, 2)}
    assert aux["embedding"].shape == (8, 32)
    assert aux["hidden"].shape == (8, 16, 32)


def test_any_number_of_tasks(tiny_config, tiny_backbone):
    tasks = tuple(
        TaskConfig(name=f"t{i}", labels=tuple(f"l{j}" for j in range(i + 2)), hidden=(16,) * i)
        for i in range(3)
    )
    model = build_model(dataclasses.replace(tiny_config, tasks=tasks), tiny_backbone)
    params = init_params(model, jax.random.key(0), tiny_backbone)
    ids = np.ones((2, 8), np.int32)
    logits, _ = model.apply({"params": params}, ids, np.ones_like(ids))
    assert {k: v.shape for k, v in logits.items()} == {"t0": (2, 2), "t1": (2, 3), "t2": (2, 4)}


def test_deterministic_by_default_and_dropout_needs_a_key(tiny_model, tiny_params, fake_batch):
    args = (fake_batch["input_ids"], fake_batch["attention_mask"])
    a, _ = tiny_model.apply({"params": tiny_params}, *args)
    b, _ = tiny_model.apply({"params": tiny_params}, *args)
    np.testing.assert_array_equal(a["genre"], b["genre"])
    with pytest.raises(Exception, match="dropout"):
        tiny_model.apply({"params": tiny_params}, *args, deterministic=False)
    c, _ = tiny_model.apply(
        {"params": tiny_params}, *args, deterministic=False, rngs={"dropout": jax.random.key(3)}
    )
    assert not np.allclose(a["genre"], c["genre"])


def test_pretrained_weights_are_loaded_not_random(minilm_backbone, tiny_config):
    config = dataclasses.replace(
        tiny_config, model=dataclasses.replace(tiny_config.model, backbone="minilm")
    )
    model = build_model(config, minilm_backbone)
    params = init_params(model, jax.random.key(0), minilm_backbone)
    got = params["backbone"]["embeddings"]["word_embeddings"]["embedding"]
    want = minilm_backbone.params["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(got, want)
    got = params["backbone"]["encoder"]["layer"]["4"]["output"]["dense"]["kernel"]
    want = minilm_backbone.params["encoder"]["layer"]["4"]["output"]["dense"]["kernel"]
    np.testing.assert_array_equal(got, want)
    assert "5" not in params["backbone"]["encoder"]["layer"]  # layer -2: top layer never built
    counts = param_counts(params)
    assert counts["total"] == counts["backbone"] + counts["heads/genre"] + counts["heads/sentiment"]


def test_pretrained_init_gives_the_heads_a_full_init_gives(tiny_model, tiny_backbone):
    """With pretrained weights only the heads are initialised, to the same values."""
    ids = jnp.ones((1, 8), jnp.int32)
    full = tiny_model.init(jax.random.key(3), ids, jnp.ones_like(ids), jnp.zeros_like(ids))
    other = tiny_model.init(jax.random.key(4), ids, jnp.ones_like(ids), jnp.zeros_like(ids))
    pretrained = jax.tree_util.tree_map(np.asarray, other["params"]["backbone"])
    backbone = dataclasses.replace(tiny_backbone, params=pretrained)
    params = init_params(tiny_model, jax.random.key(3), backbone)
    assert set(params) == {"backbone", "heads"}
    for want, got in zip(
        jax.tree_util.tree_leaves(full["params"]["heads"]),
        jax.tree_util.tree_leaves(params["heads"]),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    for want, got in zip(
        jax.tree_util.tree_leaves(pretrained),
        jax.tree_util.tree_leaves(params["backbone"]),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def test_merge_pretrained_raises_on_mismatch():
    fresh = {"a": {"w": np.zeros((2, 3))}, "b": np.zeros(4)}
    ok = merge_pretrained(fresh, {"a": {"w": np.ones((2, 3))}, "b": np.ones(4)})
    np.testing.assert_array_equal(ok["a"]["w"], np.ones((2, 3)))
    with pytest.raises(UserError, match="shape mismatch at backbone/a/w"):
        merge_pretrained(fresh, {"a": {"w": np.ones((3, 3))}, "b": np.ones(4)})
    with pytest.raises(UserError, match="missing 1"):
        merge_pretrained(fresh, {"a": {"w": np.ones((2, 3))}})
    with pytest.raises(UserError, match="unexpected 1"):
        merge_pretrained(fresh, {"a": {"w": np.ones((2, 3)), "x": 1}, "b": np.ones(4)})


def test_merge_pretrained_messages_name_the_first_path_and_both_shapes():
    fresh = {"a": {"w": np.zeros((2, 3)), "v": np.zeros(2)}, "b": np.zeros(4)}
    with pytest.raises(UserError) as info:
        merge_pretrained(fresh, {"a": {"w": np.ones((3, 3)), "x": np.ones(1)}, "c": np.ones(1)})
    assert str(info.value) == (
        "pretrained weights do not fit the model: missing 2 (first: backbone/a/v); "
        "unexpected 2 (first: backbone/a/x); shape mismatch at backbone/a/w: (3, 3) vs (2, 3)"
    )
    merged = merge_pretrained({"w": np.zeros(2, np.float32)}, {"w": np.ones(2, np.float64)})
    assert merged["w"].dtype == np.float32  # the fresh tree's dtype wins


def test_tree_diff_lists_missing_unexpected_and_resized_paths():
    expected = {"a": {"w": np.zeros((2, 3)), "v": np.zeros(2)}, "b": np.zeros(4)}
    got = {"a": {"w": np.zeros((3, 2)), "x": np.zeros(1)}, "b": jax.ShapeDtypeStruct((4,), "f4")}
    assert tree_diff(expected, got) == ([("a", "v")], [("a", "x")], [("a", "w")])
    assert tree_diff(expected, expected) == ([], [], [])
