"""Every ``mtl-jax`` command end to end on a tiny run, through ``cli.main(argv)``.

The run (tiny random BERT, 256 synthetic rows, one epoch) is trained once per module; eval,
predict and embed then read its run directory as a user would.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from mtl_jax import checkpoint, cli
from mtl_jax.checkpoint import read_config
from mtl_jax.config_io import apply_overrides, load_config
from mtl_jax.data import windows
from mtl_jax.data.context import fitted_windows
from mtl_jax.encoder import tokenize
from mtl_jax.inference import SentenceEncoder, load_trained, predict_texts, predict_tokenized
from mtl_jax.metrics_log import read_metrics
from mtl_jax.presets import preset
from mtl_jax.synthetic import make_rows, write_tsv

from compile_cache import compile_cache, session_cache_dir

SETS = [
    'model.backbone="tiny"',
    "model.max_length=32",
    "data.synthetic_train_rows=256",
    "data.synthetic_dev_rows=64",
    "train.epochs=1",
    "train.batch_size=16",
    "train.log_every=4",
]
TASKS = {
    "genre": ["adventure", "humor", "mystery", "romance", "science_fiction"],
    "sentiment": ["negative", "positive"],
}
SENTENCES = [
    "the detective found a clue.",
    "a robot on the ship",
    "kiss",
    "the clown laughed and the crowd laughed with him in the old theatre near the river "
    "while the rain fell on the roof",
    "she hated the dull letter",
]


def train_argv(*extra: str) -> list[str]:
    return ["train", "--preset", "demo", *[a for s in SETS for a in ("--set", s)], *extra]


def run_cli(argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
    """``cli.main(argv)`` with stdout and stderr captured (usable in module fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    with compile_cache(session_cache_dir(tmp_path_factory)):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(workdir, summary)`` of the module's one tiny training run."""
    workdir = tmp_path_factory.mktemp("cli") / "run"
    code, out, err = run_cli(train_argv("--workdir", str(workdir), "--no-progress"))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    return workdir, json.loads(lines[0])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A labelled TSV that is not the training data."""
    path = tmp_path_factory.mktemp("data") / "eval.tsv"
    write_tsv(path, make_rows(40, seed=11))
    return path


def test_print_config_round_trips(tmp_path):
    code, out, _ = run_cli(train_argv("--print-config"))
    assert code == 0
    path = tmp_path / "config.toml"
    path.write_text(out, encoding="utf-8")
    assert load_config(path) == apply_overrides(preset("demo"), SETS).validate()
    code, again, _ = run_cli(["train", "--config", str(path), "--print-config"])
    assert code == 0 and again == out


def test_train_writes_a_complete_run_directory(trained):
    workdir, summary = trained
    assert summary["steps"] == 16 and summary["stopped"] == "done" and summary["skipped"] == 0
    config = read_config(workdir)
    assert {t.name: list(t.labels) for t in config.tasks} == TASKS
    assert config == apply_overrides(preset("demo"), SETS).validate()
    assert (workdir / "bert_config.json").is_file()
    assert (workdir / "tokenizer" / "vocab.txt").is_file()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["16"]
    assert [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()]

    events = read_metrics(workdir)
    train = [e for e in events if e["split"] == "train"]
    dev = [e for e in events if e["split"] == "dev"]
    assert [e["step"] for e in train] == [4, 8, 12, 16]
    assert [e["step"] for e in dev] == [16]
    for event in train:
        assert {"step", "epoch", "split", "loss"} <= set(event)
        assert {f"{t}/{m}" for t in TASKS for m in ("loss", "accuracy")} <= set(event)
    assert dev[0]["epoch"] == 1.0
    assert {f"{t}/{m}" for t in TASKS for m in ("loss", "accuracy", "macro_f1")} <= set(dev[0])
    weights = {t.name: t.loss_weight for t in config.tasks}
    expected_loss = sum(weights[t] * dev[0][f"{t}/loss"] for t in TASKS)
    assert dev[0]["loss"] == pytest.approx(expected_loss, rel=1e-6) and dev[0]["loss"] > 0
    for task in TASKS:  # the printed summary is the last evaluation
        assert summary["eval"][task]["accuracy"] == dev[0][f"{task}/accuracy"]
        assert summary["eval"][task]["loss"] == dev[0][f"{task}/loss"]
        assert summary["eval"][task]["n"] == 64

    event_files = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert event_files and all(f.stat().st_size > 0 for f in event_files)


def test_eval_matches_a_hand_computation_from_predict(trained, labelled):
    workdir, _ = trained
    data = [f"{task}={labelled}" for task in TASKS]
    code, out, err = run_cli(["eval", "--checkpoint", str(workdir), *_each("--data", data)])
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    scores = json.loads(out)

    code, out, err = run_cli(["predict", "--checkpoint", str(workdir), "--input", str(labelled)])
    assert code == 0, err
    records = [json.loads(line) for line in out.strip().splitlines()]
    rows = make_rows(40, seed=11)
    assert [r["text"] for r in records] == [row["text"] for row in rows]

    assert set(scores) == set(TASKS)
    for task, labels in TASKS.items():
        truth = np.array([labels.index(row[task]) for row in rows])
        pred = np.array([labels.index(r[task]["label"]) for r in records])
        confusion = np.zeros((len(labels), len(labels)), int)
        np.add.at(confusion, (truth, pred), 1)
        assert scores[task]["n"] == len(rows)
        assert scores[task]["confusion"] == confusion.tolist()
        assert scores[task]["accuracy"] == pytest.approx(np.mean(truth == pred))
        assert scores[task]["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))

    code, out, err = run_cli(
        ["eval", "--checkpoint", str(workdir), "--which", "best", "--data", data[1]]
    )
    assert code == 0, err
    assert set(json.loads(out)) == {"sentiment"}

    # The mean of the kept checkpoints scores as its own params do: predict agrees with eval.
    argv = ["--checkpoint", str(workdir), "--which", "average"]
    code, out, err = run_cli(["eval", *argv, "--data", data[1]])
    assert code == 0, err
    averaged = json.loads(out)["sentiment"]
    code, out, err = run_cli(["predict", *argv, "--input", str(labelled)])
    assert code == 0, err
    labels = TASKS["sentiment"]
    pred = [labels.index(json.loads(line)["sentiment"]["label"]) for line in out.splitlines()]
    truth = [labels.index(row["sentiment"]) for row in rows]
    assert averaged["accuracy"] == pytest.approx(np.mean(np.array(truth) == np.array(pred)))
    # This run kept one checkpoint: its mean is that checkpoint, bit for bit.
    assert [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()] == ["16"]
    assert averaged == scores["sentiment"]


def test_the_which_choices_are_the_checkpoint_modules():
    assert cli.WHICH == checkpoint.WHICH


def _each(flag: str, values: list[str]) -> list[str]:
    return [arg for value in values for arg in (flag, value)]


def check_records(records: list[dict], texts: list[str]) -> None:
    assert [r["text"] for r in records] == texts
    for record in records:
        assert set(record) == {"text", *TASKS}
        for task, labels in TASKS.items():
            probs = record[task]["probs"]
            assert list(probs) == labels
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
            assert record[task]["label"] == max(probs, key=probs.get)


def test_predict_from_stdin_and_from_a_file(trained, tmp_path):
    workdir, _ = trained
    code, out, err = run_cli(
        ["predict", "--checkpoint", str(workdir), "--input", "-", "--batch-size", "2"],
        stdin="\n".join(SENTENCES) + "\n\n",  # blank lines are not sentences
    )
    assert code == 0, err
    # The long sentence (out-of-vocabulary words split into characters) exceeds the run's
    # model.max_length of 32 tokens.
    assert json.loads(err) == {"sentences": 5, "truncated": 1}
    from_stdin = [json.loads(line) for line in out.strip().splitlines()]
    check_records(from_stdin, SENTENCES)

    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    code, out, err = run_cli(["predict", "--checkpoint", str(workdir), "--input", str(path)])
    assert code == 0, err
    from_file = [json.loads(line) for line in out.strip().splitlines()]
    assert [r[t]["label"] for r in from_file for t in TASKS] == [
        r[t]["label"] for r in from_stdin for t in TASKS
    ]
    for a, b in zip(from_file, from_stdin, strict=True):
        for task in TASKS:
            assert a[task]["probs"] == pytest.approx(b[task]["probs"], abs=1e-5)


def test_embed_row_i_is_sentence_i(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    output = tmp_path / "out" / "embeddings.npy"
    argv = ["embed", "--model", "tiny", "--input", str(path), "--output", str(output)]
    code, _, err = run_cli([*argv, "--batch-size", "2"])
    assert code == 0, err
    summary = json.loads(err)
    assert summary == {"output": str(output), "sentences": 5, "dim": 32, "truncated": 0}
    embeddings = np.load(output, allow_pickle=False)
    assert embeddings.shape == (5, 32) and embeddings.dtype == np.float32
    encoder = SentenceEncoder.load("tiny")  # the command's defaults: layer -2, mean pooling
    for i, sentence in enumerate(SENTENCES):
        np.testing.assert_allclose(
            embeddings[i], encoder.embed([sentence]).embeddings[0], atol=1e-5
        )


def test_embed_with_a_trained_checkpoint(trained, tmp_path):
    workdir, _ = trained
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    output = tmp_path / "embeddings.npy"
    argv = ["embed", "--checkpoint", str(workdir), "--input", str(path), "--output", str(output)]
    code, _, err = run_cli([*argv, "--normalize", "--batch-size", "2"])
    assert code == 0, err
    embeddings = np.load(output, allow_pickle=False)
    encoder = load_trained(str(workdir)).encoder(normalize=True)
    for i, sentence in enumerate(SENTENCES):
        np.testing.assert_allclose(
            embeddings[i], encoder.embed([sentence]).embeddings[0], atol=1e-5
        )
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)

    code, _, err = run_cli([*argv, "--pooling", "cls"])  # a checkpoint fixes its pooling
    assert code == 2 and err.startswith("error: --pooling:")


def test_embed_and_predict_in_bfloat16_stay_close_to_float32(trained, tmp_path):
    workdir, _ = trained
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        outputs[dtype] = tmp_path / f"{dtype}.npy"
        argv = ["embed", "--model", "tiny", "--input", str(path), "--output", str(outputs[dtype])]
        code, _, err = run_cli([*argv, "--layer", "-1", "--dtype", dtype])
        assert code == 0, err
    a, b = (np.load(outputs[d]) for d in ("float32", "bfloat16"))
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= 0.999 and not np.array_equal(a, b)

    records = {}
    for dtype in ("float32", "bfloat16"):
        argv = ["predict", "--checkpoint", str(workdir), "--input", str(path), "--dtype", dtype]
        code, out, err = run_cli(argv)
        assert code == 0, err
        records[dtype] = [json.loads(line) for line in out.strip().splitlines()]
    for f32, bf16 in zip(records["float32"], records["bfloat16"], strict=True):
        for task in TASKS:
            assert bf16[task]["probs"] == pytest.approx(f32[task]["probs"], abs=0.02)


# -- advice that can be followed ---------------------------------------------------------------

PACKAGE = Path(cli.__file__).resolve().parent
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z-]+)")
CONFIG_KEY = re.compile(r"\b((?:model|data|train|parallel)\.[a-z_]+) = ")
READER_COMMANDS = ("eval", "predict", "embed")  # every command that reads a data file


def _error_messages() -> list[tuple[str, str]]:
    """``(module, text)`` of every ``UserError``/``TrainingError`` raised in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id not in ("UserError", "TrainingError"):
                continue
            parts = [
                n.value
                for arg in node.args
                for n in ast.walk(arg)
                if isinstance(n, ast.Constant) and isinstance(n.value, str)
            ]
            found.append((str(path.relative_to(PACKAGE)), "".join(parts)))
    return found


def _options() -> dict[str, set[str]]:
    """Each command's option strings (the top-level ones, such as --debug, in each)."""
    parser = cli.build_parser()
    top = {s for a in parser._actions for s in a.option_strings}
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: top | {s for a in sub._actions for s in a.option_strings}
        for name, sub in commands.choices.items()
    }


def test_every_option_an_error_names_exists():
    messages = _error_messages()
    assert len(messages) > 50  # the walk sees the package's errors
    options = _options()
    every = set().union(*options.values())
    config = preset("demo").to_dict()
    named = reader_advice = 0
    for module, text in messages:
        for option in OPTION.findall(text):
            named += 1
            assert option in every, f"{module}: {option!r} is no option: {text!r}"
            if module.startswith("data") and option == "--skip-empty":  # a reader's advice
                reader_advice += 1
                for command in READER_COMMANDS:
                    assert option in options[command], f"{command} lacks {option}"
        for key in CONFIG_KEY.findall(text):
            named += 1
            section, name = key.split(".")
            assert name in config[section], f"{module}: no config key {key!r}: {text!r}"
    assert named >= 10 and reader_advice >= 1  # the readers' empty-text advice is seen
    assert {"--skip-empty", "--allow-changes"} <= every


@pytest.mark.parametrize("command", READER_COMMANDS)
def test_skip_empty_is_advice_that_works(command, trained, tmp_path):
    workdir, _ = trained
    path = tmp_path / "with_empty.tsv"
    rows = make_rows(6, seed=5)
    rows[2] = {**rows[2], "text": ""}
    write_tsv(path, rows)
    if command == "eval":
        argv = ["eval", "--checkpoint", str(workdir), "--data", f"genre={path}"]
    elif command == "predict":
        argv = ["predict", "--checkpoint", str(workdir), "--input", str(path)]
    else:
        argv = ["embed", "--model", "tiny", "--input", str(path)]
        argv += ["--output", str(tmp_path / "e.npy")]
    code, _, err = run_cli(argv)
    assert code == 2 and err.startswith(f"error: {path}:4 (column 'text'): empty text"), err
    code, out, err = run_cli([*argv, "--skip-empty"])
    assert code == 0, err
    if command == "eval":
        assert json.loads(out)["genre"]["n"] == 5
    elif command == "predict":
        texts = [json.loads(line)["text"] for line in out.strip().splitlines()]
        assert texts == [row["text"] for row in rows if row["text"]]
    else:
        assert json.loads(err.strip().splitlines()[-1])["sentences"] == 5
        assert np.load(tmp_path / "e.npy").shape == (5, 32)


def test_export_then_embed_from_the_exported_directory(trained, tmp_path):
    """A trained run, exported, embeds through ``--model DIR`` as through ``--checkpoint``."""
    workdir, summary = trained
    out = tmp_path / "exported"
    code, stdout, err = run_cli(["export", "--checkpoint", str(workdir), "--output", str(out)])
    assert code == 0, err
    assert json.loads(stdout)["step"] == summary["steps"] and json.loads(stdout)["layers"] == 2
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    vectors = {}
    for source in (["--checkpoint", str(workdir)], ["--model", str(out)]):
        npy = tmp_path / f"{source[0][2:]}.npy"
        code, _, err = run_cli(["embed", *source, "--input", str(path), "--output", str(npy)])
        assert code == 0, err
        vectors[source[0]] = np.load(npy)
    np.testing.assert_allclose(vectors["--model"], vectors["--checkpoint"], rtol=0, atol=1e-6)
    code, _, err = run_cli(["export", "--checkpoint", str(workdir), "--output", str(out)])
    assert code == 2 and err.startswith(f"error: --output {out}: exists and is not empty")


def test_a_task_read_with_its_neighbours_predicts_on_the_windows_it_trained_on(tmp_path):
    """``tasks.genre.context``: eval (the data layer) and predict (inference) build the same
    windows, sentiment still reads each sentence alone, and the export says so."""
    train_rows, dev_rows = make_rows(96, seed=5), make_rows(30, seed=6)
    for i, row in enumerate(train_rows):
        row["doc"] = f"d{i % 7}"  # interleaved sources: neighbours are not adjacent lines
    for i, row in enumerate(dev_rows):
        row["doc"] = f"e{i // 4}"
    train_file, dev_file = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    write_tsv(train_file, train_rows)
    write_tsv(dev_file, dev_rows)
    files = [
        f'tasks.{task}.{split}_file="{path}"'
        for task in TASKS
        for split, path in (("train", train_file), ("dev", dev_file))
    ]
    sets = [
        *SETS,
        "data.synthetic_train_rows=0",
        "data.synthetic_dev_rows=0",
        *files,
        "tasks.genre.context=1",
        'tasks.genre.source_column="doc"',
    ]
    workdir = tmp_path / "run"
    argv = ["train", "--preset", "demo", *_each("--set", sets), "--workdir", str(workdir)]
    code, _, err = run_cli([*argv, "--no-progress"])
    assert code == 0, err

    data = [f"{task}={dev_file}" for task in TASKS]
    code, out, err = run_cli(["eval", "--checkpoint", str(workdir), *_each("--data", data)])
    assert code == 0, err
    scores = json.loads(out)
    code, out, err = run_cli(["predict", "--checkpoint", str(workdir), "--input", str(dev_file)])
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    check_records(records, [row["text"] for row in dev_rows])
    for task, labels in TASKS.items():
        truth = [labels.index(row[task]) for row in dev_rows]
        pred = [labels.index(r[task]["label"]) for r in records]
        confusion = np.zeros((len(labels), len(labels)), int)
        np.add.at(confusion, (truth, pred), 1)
        assert scores[task]["confusion"] == confusion.tolist()

    trained = load_trained(str(workdir))
    texts, docs = [row["text"] for row in dev_rows], [row["doc"] for row in dev_rows]
    probs = {}
    max_length = trained.config.model.max_length
    fitted = fitted_windows(trained.tokenizer, max_length, texts, docs, 1)
    assert 0 < sum(w != v for w, v in zip(fitted, windows(texts, docs, 1), strict=True)) < 30
    for name, inputs in (("windows", fitted), ("sentences", texts)):
        tokenized = tokenize(trained.tokenizer, inputs, trained.config.model.max_length)
        probs[name] = predict_tokenized(trained.model, trained.params, tokenized)
    genre = np.array([list(r["genre"]["probs"].values()) for r in records])
    sentiment = np.array([list(r["sentiment"]["probs"].values()) for r in records])
    np.testing.assert_allclose(genre, probs["windows"]["genre"], atol=1e-5)
    np.testing.assert_allclose(sentiment, probs["sentences"]["sentiment"], atol=1e-5)
    assert np.abs(genre - probs["sentences"]["genre"]).max() > 1e-3  # the windows matter

    no_doc = tmp_path / "no_doc.tsv"
    write_tsv(no_doc, make_rows(3, seed=1))
    code, out, err = run_cli(["predict", "--checkpoint", str(workdir), "--input", str(no_doc)])
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert f"{no_doc}: no 'doc' column: the checkpoint's task 'genre' reads" in err
    with pytest.raises(ValueError, match="sources="):
        predict_texts(trained, texts)
    lines = tmp_path / "passage.txt"
    lines.write_text("\n".join(texts[:4]) + "\n", encoding="utf-8")
    code, out, err = run_cli(["predict", "--checkpoint", str(workdir), "--input", str(lines)])
    assert code == 0, err
    assert err.splitlines()[0] == (
        "note: genre read each line with its neighbours: the input is one passage"
    )
    expected = predict_texts(trained, texts[:4], sources={"doc": ["e0"] * 4})  # one source
    assert [json.loads(line) for line in out.splitlines()] == expected

    exported = tmp_path / "exported"
    code, _, err = run_cli(["export", "--checkpoint", str(workdir), "--output", str(exported)])
    assert code == 0, err
    heads = json.loads((exported / "heads.json").read_text())["tasks"]
    assert (heads["genre"]["context"], heads["genre"]["source_column"]) == (1, "doc")
    assert (heads["sentiment"]["context"], heads["sentiment"]["source_column"]) == (0, "")
    assert (
        "with up to 1 sentence(s) before and after it from the same `doc`"
        in (exported / "README.md").read_text()
    )
