"""A task's ``context``: each row read with its own source's neighbours, labels kept."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mtl_jax.config import Config, ModelConfig, TaskConfig, default_tasks
from mtl_jax.config_io import apply_overrides
from mtl_jax.data import dataset_from_rows, load_task_datasets, windows
from mtl_jax.data.context import fitted_windows
from mtl_jax.encoder import tokenize
from mtl_jax.errors import UserError

GENRES = ("adventure", "humor")


def test_neighbours_come_from_the_rows_own_source_in_order():
    texts = ["a1", "a2", "b1", "a3", "b2", "a4"]
    sources = ["a", "a", "b", "a", "b", "a"]
    assert windows(texts, sources, 1) == [
        "a1 a2",
        "a1 a2 a3",
        "b1 b2",
        "a2 a3 a4",
        "b1 b2",
        "a3 a4",
    ]
    assert windows(texts, sources, 2)[3] == "a1 a2 a3 a4"
    assert windows(texts, sources, 0) == texts
    assert windows(texts, [""] * 6, 1)[2] == "a2 b1 a3"  # one source: the file in order


def test_a_window_keeps_its_own_row_whole_and_takes_the_nearest_neighbours_that_fit():
    texts, sources = ["a", "b", "c", "d", "e"], [""] * 5
    lengths = [1, 5, 2, 1, 1]
    # Budget 4: row c (2 tokens) cannot take b (5), so its window grows to the right only;
    # row e takes d, then c (nearest first, up to `context` per side).
    assert windows(texts, sources, 2, lengths, 4) == ["a", "b", "c d e", "c d e", "c d e"]
    assert windows(texts, sources, 1, lengths, 4) == ["a", "b", "c d", "c d e", "d e"]
    assert windows(texts, sources, 1, lengths, 100) == windows(texts, sources, 1)
    assert windows(["long", "x"], ["", ""], 1, [9, 1], 4) == ["long", "x"]  # alone if too long


def test_fitted_windows_fit_the_model_and_hold_the_row(tiny_backbone):
    tok = tiny_backbone.tokenizer
    words = ["the", "clown", "laughed", "and", "the", "crowd", "sang", "in", "the", "rain"]
    texts = [" ".join(words[: 2 + (i * 5) % 10]) + "." for i in range(12)]
    sources = [f"s{i % 2}" for i in range(12)]
    for max_length in (16, 24, 512):
        fitted = fitted_windows(tok, max_length, texts, sources, 2)
        lengths = tokenize(tok, fitted, 10_000).lengths
        alone = [w == t for w, t in zip(fitted, texts, strict=True)]
        assert all(n <= max_length or a for n, a in zip(lengths, alone, strict=True))
        assert all(text in window for text, window in zip(texts, fitted, strict=True))
        if max_length < 512:  # some windows lost a neighbour, none was cut
            assert fitted != windows(texts, sources, 2)
    assert fitted == windows(texts, sources, 2)  # 512 tokens: every window whole


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def context_config(genre_file, sentiment_file, **genre) -> Config:
    genre_task, sentiment_task = default_tasks()
    tasks = (
        dataclasses.replace(genre_task, labels=GENRES, train_file=genre_file, **genre),
        dataclasses.replace(
            sentiment_task, labels=("negative", "positive"), train_file=sentiment_file
        ),
    )
    return Config(model=ModelConfig(backbone="tiny", max_length=64), tasks=tasks)


GENRE_TSV = (
    "text\tgenre\tsource_id\n"
    "He ran.\tadventure\tcn01\n"
    "It was late.\thumor\tcr02\n"
    '"""Stop!"" she said."\tadventure\tcn01\n'
    "Nobody laughed.\thumor\tcr02\n"
)


def test_the_genre_task_trains_on_windows_and_sentiment_on_sentences(tmp_path, tiny_backbone):
    genre = write(tmp_path / "genre.tsv", GENRE_TSV)
    sentiment = write(tmp_path / "sentiment.tsv", "text\tsentiment\nfine.\tpositive\n")
    plain = load_task_datasets(context_config(genre, sentiment), tiny_backbone.tokenizer)
    config = context_config(genre, sentiment, context=1, source_column="source_id")
    config.validate()
    ds = load_task_datasets(config, tiny_backbone.tokenizer)
    assert ds.texts == (
        'He ran. "Stop!" she said.',
        "It was late. Nobody laughed.",
        'He ran. "Stop!" she said.',
        "It was late. Nobody laughed.",
        "fine.",
    )
    np.testing.assert_array_equal(ds.labels, plain.labels)  # each row scored once, as before
    np.testing.assert_array_equal(ds.lines, plain.lines)
    assert ds.lengths[0] > plain.lengths[0]
    # Without a source column the whole file is one text.
    whole = load_task_datasets(context_config(genre, sentiment, context=1), tiny_backbone.tokenizer)
    assert whole.texts[1] == 'He ran. It was late. "Stop!" she said.'


def test_tasks_sharing_a_file_read_it_each_with_its_own_context(tmp_path, tiny_backbone):
    both = write(
        tmp_path / "both.tsv",
        "text\tgenre\tsentiment\tdoc\n"
        "One.\tadventure\tpositive\td1\n"
        "Two.\t\tnegative\td1\n"  # no genre label: still genre's neighbour
        "Three.\thumor\t\td1\n",
    )
    config = context_config(both, both, context=1, source_column="doc")
    ds = load_task_datasets(config, tiny_backbone.tokenizer)
    genre, sentiment = (ds.labels[:, k] >= 0 for k in range(2))
    assert [t for t, g in zip(ds.texts, genre, strict=True) if g] == ["One. Two.", "Two. Three."]
    assert [t for t, s in zip(ds.texts, sentiment, strict=True) if s] == ["One.", "Two."]
    assert not (genre & sentiment).any()  # each part carries only its own tasks' labels
    assert len(ds) == 4 and len(ds.source_names) == 2


def test_bad_context_input_names_the_line_column_and_fix(tmp_path, tiny_backbone):
    sentiment = write(tmp_path / "sentiment.tsv", "text\tsentiment\nfine.\tpositive\n")
    tok = tiny_backbone.tokenizer
    missing = write(tmp_path / "missing.tsv", "text\tgenre\nHe ran.\tadventure\n")
    with pytest.raises(
        UserError, match=r"missing.tsv:1 \(column 'source_id'\): no column 'source_id'"
    ):
        load_task_datasets(
            context_config(missing, sentiment, context=1, source_column="source_id"), tok
        )
    empty = write(tmp_path / "empty.tsv", "text\tgenre\tsource_id\nHe ran.\tadventure\t\n")
    with pytest.raises(
        UserError, match=r"empty.tsv:2 \(column 'source_id'\): no source text.*source_column"
    ):
        load_task_datasets(
            context_config(empty, sentiment, context=1, source_column="source_id"), tok
        )
    floats = write(
        tmp_path / "floats.jsonl", '{"text": "He ran.", "genre": "adventure", "doc": 1.5}\n'
    )
    with pytest.raises(
        UserError, match=r"floats.jsonl:1 \(column 'doc'\): a label or source id .* got 1.5"
    ):
        load_task_datasets(context_config(floats, sentiment, context=1, source_column="doc"), tok)
    with pytest.raises(UserError, match=r"'tasks.genre.context'.*>= 0"):
        context_config(missing, sentiment, context=-1).validate()
    with pytest.raises(UserError, match=r"'tasks.genre.source_column'.*context > 0"):
        context_config(missing, sentiment, source_column="source_id").validate()
    for column in ("genre", "text"):  # windows grouped by the label would leak it
        with pytest.raises(UserError, match=r"'tasks.genre.source_column'.*other than"):
            context_config(missing, sentiment, context=1, source_column=column).validate()


def test_overrides_set_a_tasks_context():
    config = apply_overrides(
        Config(tasks=default_tasks()),
        ["tasks.genre.context=2", 'tasks.genre.source_column="source_id"'],
    )
    assert (config.tasks[0].context, config.tasks[0].source_column) == (2, "source_id")
    assert config.tasks[1].context == 0


def test_in_memory_rows_read_their_neighbours_too(tiny_backbone):
    rows = [
        {"text": "a.", "genre": "humor", "sentiment": "positive", "doc": 1},
        {"text": "b.", "genre": "humor", "doc": 2},
        {"text": "c.", "genre": "adventure", "doc": 1},
    ]
    config = context_config("", "", context=1, source_column="doc")
    ds = dataset_from_rows(rows, config, tiny_backbone.tokenizer)
    assert ds.texts == ("a. c.", "b.", "a. c.", "a.")
    assert ds.labels.tolist() == [[1, -1], [1, -1], [0, -1], [-1, 1]]
    assert ds.lines.tolist() == [1, 2, 3, 1]
    with pytest.raises(UserError, match=r"rows:2 \(column 'doc'\): no source text"):
        dataset_from_rows(
            [rows[0], {"text": "b.", "genre": "humor"}], config, tiny_backbone.tokenizer
        )
    assert TaskConfig(name="x").context == 0
