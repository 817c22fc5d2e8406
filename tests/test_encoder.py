"""Backbone loading, layer selection, pooling and parity with the PyTorch reference."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from mtl_jax.encoder import (
    backbone_directory,
    hub_cache_dir,
    layers_to_run,
    load_backbone,
    minilm_dir,
    pool,
    tokenize,
    truncate_params,
)
from mtl_jax.errors import UserError
from mtl_jax.model import build_model, init_params
from mtl_jax.safetensors_bert import load_bert_safetensors

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


@pytest.mark.parametrize("method", ["mean", "max"])
def test_a_row_without_tokens_pools_to_zeros_with_finite_gradients(method):
    """A batch's padding row (mask all 0) must not reach the head as float32's lowest value:
    the head would make it inf and NaN, and the NaN would poison every gradient."""
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 3)), jnp.float32)
    mask = jnp.asarray([[1, 1, 0, 0], [0, 0, 0, 0]], jnp.int32)
    pooled = np.asarray(pool(hidden, mask, method))
    np.testing.assert_array_equal(pooled[1], np.zeros(3, np.float32))
    grad = jax.grad(lambda h: (pool(h, mask, method) * 1e30).sum())(hidden)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(np.asarray(grad)[1], 0.0)


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


# -- loading PyTorch-named safetensors ----------------------------------------------------------


def transformers_from_pt(directory) -> dict:
    """The reference: transformers' own PyTorch->Flax conversion of the same directory."""
    from transformers import FlaxBertModel

    model = FlaxBertModel.from_pretrained(str(directory), from_pt=True, local_files_only=True)
    return jax.tree_util.tree_map(np.asarray, model.params)


def assert_params_identical(got: dict, want: dict) -> None:
    """Same tree, and every leaf bit-identical with the same dtype."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for path, value in flatten_dict(want).items():
        leaf = flatten_dict(got)[path]
        assert leaf.dtype == value.dtype and np.array_equal(leaf, value), path


def pytorch_state_dict(flax_params: dict, prefix: str = "", legacy_norms: bool = False) -> dict:
    """The names and layouts ``BertModel.state_dict()`` has for these Flax params."""
    out = {}
    for (*stem, leaf), value in flatten_dict(flax_params).items():
        is_norm = stem[-1] == "LayerNorm"
        if leaf == "kernel":
            value = value.T
        if leaf in ("kernel", "scale", "embedding"):
            leaf = "gamma" if legacy_norms and is_norm else "weight"
        elif leaf == "bias" and legacy_norms and is_norm:
            leaf = "beta"
        out[prefix + ".".join([*stem, leaf])] = np.ascontiguousarray(value)
    return out


def random_bert_params(bert_config, seed: int = 0) -> dict:
    """A ``FlaxBertModel``'s params with every leaf random (biases and norms too)."""
    from transformers import FlaxBertModel

    shapes = FlaxBertModel(bert_config, _do_init=False).params_shape_tree
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: rng.normal(size=s.shape).astype(np.float32), dict(shapes)
    )


def write_bert_dir(directory, backbone, tensors: dict) -> None:
    """A Hugging Face BERT directory: config.json, tokenizer and a PyTorch-style safetensors."""
    directory.mkdir(exist_ok=True)
    backbone.bert_config.to_json_file(str(directory / "config.json"))
    backbone.tokenizer.save_pretrained(str(directory))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tiny_bert_params(tiny_backbone):
    return random_bert_params(tiny_backbone.bert_config)


@pytest.mark.parametrize(
    "prefix, legacy_norms, extras",
    [
        ("", False, {}),
        (  # a BertForPreTraining export: "bert." names, gamma/beta, LM heads, position_ids
            "bert.",
            True,
            {
                "cls.predictions.bias": np.ones(7, np.float32),
                "cls.predictions.transform.dense.weight": np.ones((32, 32), np.float32),
                "bert.embeddings.position_ids": np.arange(512, dtype=np.int64)[None],
            },
        ),
    ],
)
def test_safetensors_loader_matches_transformers_bit_for_bit(
    tmp_path, tiny_backbone, tiny_bert_params, prefix, legacy_norms, extras
):
    tensors = pytorch_state_dict(tiny_bert_params, prefix, legacy_norms) | extras
    write_bert_dir(tmp_path, tiny_backbone, tensors)
    want = transformers_from_pt(tmp_path)
    assert_params_identical(want, tiny_bert_params)  # the reference saw every tensor
    assert_params_identical(load_backbone(str(tmp_path)).params, want)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_safetensors_are_upcast_exactly(
    tmp_path, tiny_backbone, tiny_bert_params, dtype
):
    import ml_dtypes

    stored = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    half = jax.tree_util.tree_map(lambda x: x.astype(stored), tiny_bert_params)
    write_bert_dir(tmp_path, tiny_backbone, pytorch_state_dict(half))
    want = jax.tree_util.tree_map(lambda x: x.astype(np.float32), transformers_from_pt(tmp_path))
    got = load_bert_safetensors(tmp_path / "model.safetensors", tiny_backbone.bert_config)
    assert_params_identical(got, want)


def test_safetensors_without_pooler_loads_without_it(tmp_path, tiny_backbone, tiny_bert_params):
    tensors = {k: v for k, v in pytorch_state_dict(tiny_bert_params).items() if "pooler" not in k}
    write_bert_dir(tmp_path, tiny_backbone, tensors)
    got = load_bert_safetensors(tmp_path / "model.safetensors", tiny_backbone.bert_config)
    assert_params_identical(got, {k: v for k, v in tiny_bert_params.items() if k != "pooler"})


@pytest.mark.parametrize(
    "tensor, param",
    [
        (
            "encoder.layer.1.attention.self.query.weight",
            "encoder/layer/1/attention/self/query/kernel",
        ),
        ("embeddings.LayerNorm.bias", "embeddings/LayerNorm/bias"),
        ("pooler.dense.bias", "pooler/dense/bias"),  # a pooler is optional, half a pooler is not
    ],
)
def test_missing_tensor_names_file_and_parameter(
    tmp_path, tiny_backbone, tiny_bert_params, tensor, param
):
    tensors = pytorch_state_dict(tiny_bert_params)
    del tensors[tensor]
    write_bert_dir(tmp_path, tiny_backbone, tensors)
    file = tmp_path / "model.safetensors"
    with pytest.raises(UserError, match=f"{re.escape(str(file))}: no tensor for parameter {param}"):
        load_backbone(str(tmp_path))


def test_wrong_shaped_tensor_names_file_and_parameter(tmp_path, tiny_backbone, tiny_bert_params):
    tensors = pytorch_state_dict(tiny_bert_params)
    name = "encoder.layer.0.intermediate.dense.weight"  # [64, 32] in PyTorch layout
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    write_bert_dir(tmp_path, tiny_backbone, tensors)
    expected = (
        f"{tmp_path / 'model.safetensors'}: tensor '{name}' has shape (32, 64) but parameter "
        "encoder/layer/0/intermediate/dense/kernel needs (64, 32)"
    )
    with pytest.raises(UserError, match=re.escape(expected)):
        load_backbone(str(tmp_path))


def test_unreadable_safetensors_is_a_user_error(tmp_path, tiny_backbone):
    write_bert_dir(tmp_path, tiny_backbone, {"x": np.zeros(1, np.float32)})
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_backbone(str(tmp_path))


@pytest.mark.minilm
def test_minilm_params_match_transformers_bit_for_bit(minilm_backbone):
    assert_params_identical(minilm_backbone.params, transformers_from_pt(minilm_dir()))


# -- Hugging Face ids from the local cache ----------------------------------------------------


def test_hub_cache_follows_the_environment_at_call_time(tmp_path, monkeypatch):
    """HF_HUB_CACHE wins over HF_HOME, which wins over XDG_CACHE_HOME (huggingface_hub's order)."""
    for name in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"


def test_hub_ids_resolve_refs_main_and_local_directories_win(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "cache" / "models--org--name"
    old, new = "a" * 40, "b" * 40
    for revision in (old, new):
        (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new, encoding="utf-8")
    assert backbone_directory("org/name") == repo / "snapshots" / new

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # a local folder of the same name
    assert backbone_directory("org/name") == Path("org/name")
    assert backbone_directory(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"


def test_an_id_not_in_the_cache_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:
        load_backbone("sentence-transformers/all-MiniLM-L6-v2")
    message = str(caught.value)
    assert message.startswith("sentence-transformers/all-MiniLM-L6-v2: no such directory")
    assert str(tmp_path / "cache" / "models--sentence-transformers--all-MiniLM-L6-v2") in message
    assert "huggingface-cli download sentence-transformers/all-MiniLM-L6-v2" in message
    assert "\n" not in message
    # a ref to a snapshot that is gone is "not in the cache" too, not a crash
    repo = tmp_path / "cache" / "models--org--gone"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c" * 40, encoding="utf-8")
    with pytest.raises(UserError, match="org/gone: no such directory, and not in the Hugging"):
        load_backbone("org/gone")
