"""Backbone loading, layer selection, pooling and parity with the PyTorch reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.encoder import layers_to_run, load_backbone, pool, tokenize, truncate_params
from mtl_jax.errors import UserError
from mtl_jax.model import build_model, init_params

from conftest import SHARED, replace_model

PARITY = SHARED / "parity" / "ref_embeddings.npz"


def test_layers_to_run_counts_from_hidden_states():
    assert layers_to_run(6, -1) == 6
    assert layers_to_run(6, -2) == 5
    assert layers_to_run(6, 0) == 0
    assert layers_to_run(6, -7) == 0
    assert layers_to_run(6, 3) == 3
    with pytest.raises(UserError, match="model.layer"):
        layers_to_run(6, 7)
    with pytest.raises(UserError, match="model.layer"):
        layers_to_run(6, -8)


def test_mean_and_max_pooling_ignore_padding():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    poisoned = hidden.copy()
    poisoned[0, 3:] = 1e6  # padding positions hold garbage
    mean = np.asarray(pool(jnp.asarray(poisoned), jnp.asarray(mask), "mean"))
    np.testing.assert_allclose(mean[0], hidden[0, :3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(mean[1], hidden[1].mean(0), rtol=1e-6)
    mx = np.asarray(pool(jnp.asarray(poisoned), jnp.asarray(mask), "max"))
    np.testing.assert_allclose(mx[0], hidden[0, :3].max(0))
    cls = np.asarray(pool(jnp.asarray(poisoned), jnp.asarray(mask), "cls"))
    np.testing.assert_array_equal(cls, hidden[:, 0])


def test_padding_does_not_change_embedding(tiny_config, tiny_backbone):
    """A sentence padded to 32 tokens embeds like the same sentence unpadded."""
    for pooling in ("mean", "max", "cls"):
        model = build_model(replace_model(tiny_config, pooling=pooling), tiny_backbone)
        params = init_params(model, jax.random.key(1), tiny_backbone)
        tok = tokenize(tiny_backbone.tokenizer, ["the detective found a clue"], 32)
        ids = tok.input_ids[0][None]
        short = model.apply({"params": params}, ids, np.ones_like(ids), method=model.embed)[0]
        padded_ids = np.zeros((1, 32), np.int32)
        padded_ids[0, : ids.shape[1]] = ids
        padded_mask = (padded_ids != 0).astype(np.int32)
        long = model.apply({"params": params}, padded_ids, padded_mask, method=model.embed)[0]
        np.testing.assert_allclose(np.asarray(short), np.asarray(long), atol=1e-5)


def test_layer_choice_changes_output_and_runs_only_needed_layers(tiny_config, tiny_backbone):
    ids = tokenize(tiny_backbone.tokenizer, ["a robot on a planet"], 32).input_ids[0][None]
    outs = {}
    for layer in (-1, -2, 2, 1):
        model = build_model(replace_model(tiny_config, layer=layer), tiny_backbone)
        params = init_params(model, jax.random.key(0), tiny_backbone)
        assert len(params["backbone"]["encoder"]["layer"]) == layers_to_run(3, layer)
        outs[layer] = np.asarray(
            model.apply({"params": params}, ids, np.ones_like(ids), method=model.embed)[0]
        )
    assert not np.allclose(outs[-1], outs[-2])
    np.testing.assert_array_equal(outs[-2], outs[2])  # -2 of 3 layers is hidden_states[2]
    assert not np.allclose(outs[-2], outs[1])


def test_truncate_params_drops_pooler_and_upper_layers():
    params = {
        "embeddings": {"w": 1},
        "encoder": {"layer": {str(i): {"w": i} for i in range(6)}},
        "pooler": {"w": 9},
    }
    assert truncate_params(params, 2) == {
        "embeddings": {"w": 1},
        "encoder": {"layer": {"0": {"w": 0}, "1": {"w": 1}}},
    }


def test_tokenize_counts_truncation(tiny_backbone):
    tok = tokenize(tiny_backbone.tokenizer, ["the old house", "the " * 100, "x" * 100_000], 16)
    assert tok.truncated == 2
    assert max(len(x) for x in tok.input_ids) == 16
    assert tok.input_ids[0][0] == tiny_backbone.tokenizer.cls_token_id
    assert tok.input_ids[0][-1] == tiny_backbone.tokenizer.sep_token_id


def test_bad_model_directories_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_backbone(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no config.json"):
        load_backbone(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match="BERT"):
        load_backbone(str(tmp_path))


@pytest.mark.minilm
@pytest.mark.skipif(not PARITY.exists(), reason="../shared/parity not present")
@pytest.mark.parametrize(
    "layer, pooling, key",
    [(-1, "mean", "mean_last"), (-2, "mean", "mean_second_last"), (-1, "cls", "cls_last")],
)
def test_parity_with_pytorch_reference(minilm_backbone, tiny_config, layer, pooling, key):
    """The Flax backbone reproduces the PyTorch stack's embeddings on the real weights."""
    ref = np.load(PARITY)
    config = replace_model(tiny_config, backbone="minilm", layer=layer, pooling=pooling)
    model = build_model(config, minilm_backbone)
    params = init_params(model, jax.random.key(0), minilm_backbone)
    emb, _ = jax.jit(model.apply, static_argnames="method")(
        {"params": params},
        ref["input_ids"],
        ref["attention_mask"],
        ref["token_type_ids"],
        method=model.embed,
    )
    assert np.abs(np.asarray(emb) - ref[key]).max() <= 1e-4


@pytest.mark.minilm
@pytest.mark.skipif(not PARITY.exists(), reason="../shared/parity not present")
def test_minilm_tokenizer_matches_reference(minilm_backbone):
    ref = np.load(PARITY)
    tok = tokenize(minilm_backbone.tokenizer, [str(s) for s in ref["sentences"]], 256)
    for i, ids in enumerate(tok.input_ids):
        n = int(ref["attention_mask"][i].sum())
        np.testing.assert_array_equal(ids, ref["input_ids"][i, :n])
