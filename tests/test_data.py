"""Data layer: readers and their errors, label maps, datasets, buckets, mixing, resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging

import jax
import numpy as np
import pytest

from mtl_jax import data
from mtl_jax.config import Config, DataConfig, ModelConfig, TaskConfig, TrainConfig
from mtl_jax.data.batching import rows_within
from mtl_jax.errors import UserError
from mtl_jax.synthetic import FILLER, make_rows

from conftest import SHARED
from data_helpers import (
    dataset_from_texts,
    padding_stats,
    resolve_class_weights,
    resolve_labels,
)

# -- helpers -------------------------------------------------------------------------------


def make_config(tasks, batch_size=8, max_length=48, seed=0, epochs=2, **data_kw) -> Config:
    data_kw.setdefault("length_buckets", (8, 16, 24, 32))
    return Config(
        model=ModelConfig(backbone="tiny", max_length=max_length),
        tasks=tuple(tasks),
        data=DataConfig(**data_kw),
        train=TrainConfig(batch_size=batch_size, seed=seed, epochs=epochs),
    )


def write(path, text: str | bytes):
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8", newline="")
    else:
        path.write_bytes(text)
    return path


def varied_rows(n: int, seed: int, label: str, names: tuple[str, ...]) -> list[dict]:
    """Rows of 1..40 words, so lengths spread over every bucket."""
    rng = np.random.default_rng(seed)
    return [
        {
            "text": " ".join(rng.choice(FILLER, size=int(rng.integers(1, 41)))),
            label: names[int(rng.integers(len(names)))],
        }
        for _ in range(n)
    ]


def write_rows(path, rows, columns):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


GENRES = ("adventure", "humor", "mystery")
SENTIMENTS = ("negative", "positive")


@pytest.fixture(scope="module")
def two_source_config(tmp_path_factory):
    """genre (150 rows) and sentiment (37 rows) from separate TSV files."""
    root = tmp_path_factory.mktemp("two_sources")
    g = write_rows(root / "genre.tsv", varied_rows(150, 1, "genre", GENRES), ["text", "genre"])
    s = write_rows(
        root / "sent.tsv", varied_rows(37, 2, "sentiment", SENTIMENTS), ["text", "sentiment"]
    )
    return make_config(
        [
            TaskConfig(name="genre", labels=GENRES, train_file=str(g)),
            TaskConfig(name="sentiment", labels=SENTIMENTS, train_file=str(s)),
        ]
    )


@pytest.fixture(scope="module")
def two_source(two_source_config, tiny_backbone):
    return data.load_task_datasets(two_source_config, tiny_backbone.tokenizer)


def with_data(config: Config, **changes) -> Config:
    import dataclasses

    return dataclasses.replace(config, data=dataclasses.replace(config.data, **changes))


def with_train(config: Config, **changes) -> Config:
    import dataclasses

    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))


# -- readers: every bad input names file and line ------------------------------------------

BAD_INPUTS = [
    # (file name, content, label columns, substrings the message must hold)
    ("empty.tsv", "", ["label"], ["empty.tsv", "empty"]),
    ("blank.tsv", "\n\n", ["label"], ["blank.tsv", "empty"]),
    ("header.tsv", "text\tlabel\n", ["label"], ["header.tsv", "no data rows"]),
    ("notext.tsv", "sentence\tlabel\nhi\ta\n", ["label"], ["notext.tsv:1", "'sentence'"]),
    ("nolabel.tsv", "text\ttag\nhi\ta\n", ["label"], ["nolabel.tsv:1", "'label'", "'tag'"]),
    ("few.tsv", "text\tlabel\nhi\ta\nonly text\n", ["label"], ["few.tsv:3", "1 field"]),
    ("many.tsv", "text\tlabel\nhi\ta\nhi\tthere\ta\n", ["label"], ["many.tsv:3", "3 field"]),
    ("comma.tsv", "text,label\nhi,a\n", ["label"], ["comma.tsv:1", "commas", ".csv"]),
    ("tab.csv", "text\tlabel\nhi\ta\n", ["label"], ["tab.csv:1", "tabs", ".tsv"]),
    ("badutf.tsv", b"text\tlabel\nok\ta\nbad \xff\xfe\ta\n", ["label"], ["badutf.tsv:3", "UTF-8"]),
    ("binary.tsv", b"text\tlabel\nok\ta\n\x00\x01\x02", ["label"], ["binary.tsv:3", "binary"]),
    ("utf16.tsv", "text\tlabel\n".encode("utf-16"), ["label"], ["utf16.tsv", "UTF-16"]),
    ("quote.tsv", 'text\tlabel\nok\ta\n"open\tb\nx\ta\n', ["label"], ["quote.tsv:3", "quote"]),
    ("emptytext.tsv", "text\tlabel\nok\ta\n\ta\n", ["label"], ["emptytext.tsv:3", "empty text"]),
    ("space.tsv", "text\tlabel\nok\ta\n   \ta\n", ["label"], ["space.tsv:3", "empty text"]),
    ("blankline.tsv", "text\tlabel\nok\ta\n\nok\tb\n", ["label"], ["blankline.tsv:3", "empty"]),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b",\n', ["label"], ["bad.jsonl:2"]),
    ("list.jsonl", '{"text": "a", "label": "x"}\n["b"]\n', ["label"], ["list.jsonl:2", "object"]),
    ("key.jsonl", '{"text": "a", "label": "x"}\n{"txt": "b"}\n', ["label"], ["key.jsonl:2"]),
    ("nolab.jsonl", '{"text": "a"}\n{"text": "b"}\n', ["label"], ["nolab.jsonl", "'label'"]),
    ("empty.jsonl", '{"text": "a", "label": "x"}\n{"text": " "}\n', ["label"], ["empty.jsonl:2"]),
    ("lab.jsonl", '{"text": "a", "label": [1]}\n', ["label"], ["lab.jsonl:1", "label"]),
    ("lines.txt", "one\n\nthree\n", [], ["lines.txt:2", "empty text"]),
    ("labels.txt", "one\n", ["label"], ["labels.txt", "no labels"]),
    ("sheet.xlsx", "x", ["label"], ["sheet.xlsx", "unsupported"]),
]


@pytest.mark.parametrize(
    ("name", "content", "labels", "expected"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_names_file_and_line(tmp_path, name, content, labels, expected):
    path = write(tmp_path / name, content)
    with pytest.raises(UserError) as err:
        data.read_rows(path, "text", labels)
    for part in expected:
        assert part in str(err.value), str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match=r"nope\.tsv: file not found"):
        data.read_rows(tmp_path / "nope.tsv")
    (tmp_path / "dir.tsv").mkdir()
    with pytest.raises(UserError, match="directory"):
        data.read_rows(tmp_path / "dir.tsv")


def test_missing_column_lists_existing_columns(tmp_path):
    path = write(tmp_path / "d.tsv", "sentence\tgenre\tsource_id\nhi\ta\tx\n")
    with pytest.raises(UserError) as err:
        data.read_rows(path, "text", ["genre"])
    assert "'sentence', 'genre', 'source_id'" in str(err.value)


def test_skip_empty_drops_and_logs(tmp_path, caplog):
    path = write(tmp_path / "d.tsv", "text\tlabel\nok\ta\n \tb\nfine\tb\n")
    with caplog.at_level(logging.WARNING, logger="mtl_jax.data"):
        rows = data.read_rows(path, "text", ["label"], skip_empty=True)
    assert [(r.line, r.text) for r in rows] == [(2, "ok"), (4, "fine")]
    assert "skipped 1 row" in caplog.text and "[3]" in caplog.text


def test_reader_formats_quoting_and_line_numbers(tmp_path):
    tsv = write(
        tmp_path / "d.tsv",
        '\ufefftext\tlabel\r\n"a\ttab and\nnewline"\tx\r\nsaid ""hi""\t y \r\nno label\t\r\n\r\n\n',
    )
    rows = data.read_rows(tsv, "text", ["label"])
    assert rows == [
        data.Row(2, "a\ttab and\nnewline", {"label": "x"}),
        data.Row(4, 'said ""hi""', {"label": "y"}),  # quotes mid-field are literal
        data.Row(5, "no label", {"label": None}),
    ]
    csv_path = write(tmp_path / "d.csv", 'label,text\nx,"a, b"\n')
    assert data.read_rows(csv_path, "text", ["label"]) == [data.Row(2, "a, b", {"label": "x"})]
    jsonl = write(
        tmp_path / "d.jsonl",
        '{"text": "a", "g": "x", "s": 1}\n{"text": "b", "g": null}\n',
    )
    assert data.read_rows(jsonl, "text", ["g", "s"]) == [
        data.Row(1, "a", {"g": "x", "s": "1"}),
        data.Row(2, "b", {"g": None, "s": None}),
    ]
    txt = write(tmp_path / "d.txt", "first line\r\nsecond\n\n")
    assert data.read_rows(txt) == [data.Row(1, "first line", {}), data.Row(2, "second", {})]


def test_field_of_several_megabytes(tmp_path, tiny_backbone):
    big = "word " * 800_000  # 4 MB, far above csv's default 128 KiB field limit
    path = write(tmp_path / "big.tsv", f"text\tlabel\nshort\ta\n{big}\tb\n")
    rows = data.read_rows(path, "text", ["label"])
    assert len(rows[1].text) == len(big)
    config = make_config([TaskConfig(name="label", labels=("a", "b"), train_file=str(path))])
    ds = data.load_task_datasets(config, tiny_backbone.tokenizer)
    assert ds.lengths.max() == 48 and ds.truncated == 1


# -- labels --------------------------------------------------------------------------------


def test_infer_and_encode_labels(tmp_path):
    assert data.infer_labels(["b", None, "a", "b", "c"]) == ("a", "b", "c")
    rows = [
        data.Row(2, "x", {"y": "b"}),
        data.Row(3, "x", {"y": None}),
        data.Row(4, "x", {"y": "a"}),
    ]
    ids = data.encode_labels(rows, ("a", "b"), "f.tsv", "y")
    assert ids.dtype == np.int32 and ids.tolist() == [1, -1, 0]
    with pytest.raises(UserError, match=r"dev\.tsv:7 \(column 'y'\): unknown label 'neutral'"):
        data.encode_labels([data.Row(7, "x", {"y": "neutral"})], ("a", "b"), "dev.tsv", "y")


def test_resolve_labels_and_unseen_dev_label(tmp_path, tiny_backbone):
    train = write(tmp_path / "train.tsv", "text\tsentiment\nx\tpos\ny\tneg\nz\tpos\n")
    dev = write(tmp_path / "dev.tsv", "text\tsentiment\nx\tpos\ny\tneutral\n")
    config = make_config(
        [
            TaskConfig(name="sentiment", train_file=str(train), dev_file=str(dev)),
            TaskConfig(
                name="fixed",
                labels=("pos", "neg"),
                label_column="sentiment",
                train_file=str(train),
            ),
        ]
    )
    resolved = resolve_labels(config)
    assert resolved.task("sentiment").labels == ("neg", "pos")
    assert resolved.task("fixed").labels == ("pos", "neg")  # given labels keep their order
    with pytest.raises(UserError, match=r"dev\.tsv:3 \(column 'sentiment'\): unknown label"):
        data.load_task_datasets(resolved, tiny_backbone.tokenizer, split="dev")
    one = write(tmp_path / "one.tsv", "text\tsentiment\nx\tpos\n")
    with pytest.raises(UserError, match="at least two"):
        resolve_labels(make_config([TaskConfig(name="sentiment", train_file=str(one))]))


def test_labels_from_files_returns_every_task_and_leaves_the_config(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tsentiment\nx\tpos\ny\tneg\nz\tpos\n")
    config = make_config(
        [
            TaskConfig(name="sentiment", train_file=str(train)),
            TaskConfig(name="fixed", labels=("pos", "neg"), label_column="sentiment"),
        ]
    )
    found = data.labels_from_files(config)
    assert found == {"sentiment": ("neg", "pos"), "fixed": ("pos", "neg")}
    assert config.task("sentiment").labels == ()  # data handed back, the config untouched
    assert resolve_labels(config) == config.with_labels(found)


def test_class_weights_from_returns_weights_per_task(two_source, two_source_config):
    tasks = list(two_source_config.tasks)
    tasks[0] = dataclasses.replace(tasks[0], class_weighting="balanced")
    config = dataclasses.replace(two_source_config, tasks=tuple(tasks))
    weights = data.class_weights_from(config, two_source)
    assert set(weights) == {"genre", "sentiment"} and weights["sentiment"] is None
    counts = np.bincount(two_source.labels[:150, 0], minlength=3)
    assert weights["genre"] == tuple(round(150 / (3 * c), 6) for c in counts)
    assert resolve_class_weights(config, two_source).tasks[0].class_weights == weights["genre"]


def test_empty_text_advice_names_the_options(tmp_path):
    path = write(tmp_path / "e.tsv", "text\tlabel\nok\ta\n\tb\n")
    with pytest.raises(UserError) as err:
        data.read_rows(path, "text", ["label"])
    assert str(err.value).endswith(
        "(or skip such rows: --skip-empty for eval/predict/embed, data.skip_empty = true for train)"
    )


# -- datasets ------------------------------------------------------------------------------


def test_shared_file_rows_carry_several_labels(tmp_path, tiny_backbone):
    path = write(
        tmp_path / "both.tsv",
        "text\tgenre\tsentiment\nthe robot\tscience_fiction\tpositive\n"
        "a clown\thumor\t\nthe kiss\tromance\tnegative\n",
    )
    config = resolve_labels(
        make_config(
            [
                TaskConfig(name="genre", train_file=str(path)),
                TaskConfig(name="sentiment", train_file=str(path)),
            ]
        )
    )
    ds = data.load_task_datasets(config, tiny_backbone.tokenizer)
    assert len(ds) == 3 and ds.source_names == (str(path),)
    assert ds.labels.tolist() == [[2, 1], [0, -1], [1, 0]]
    assert ds.task_names == ("genre", "sentiment") and ds.lines.tolist() == [2, 3, 4]


def test_balanced_class_weights_equal_sklearn(two_source, two_source_config):
    from sklearn.utils.class_weight import compute_class_weight

    balanced = [dataclasses.replace(t, class_weighting="balanced") for t in two_source_config.tasks]
    explicit = (0.5, 2.0)  # given in the config: kept as they are
    balanced[1] = dataclasses.replace(balanced[1], class_weights=explicit)
    config = resolve_class_weights(
        dataclasses.replace(two_source_config, tasks=tuple(balanced)), two_source
    )
    genre = two_source.labels[:, 0]
    genre = genre[genre >= 0]
    expected = compute_class_weight("balanced", classes=np.unique(genre), y=genre)
    np.testing.assert_allclose(config.tasks[0].class_weights, expected, rtol=1e-5)
    assert config.tasks[1].class_weights == explicit
    config.validate()
    # No weighting asked for: the config is left alone.
    assert resolve_class_weights(two_source_config, two_source) == two_source_config


def test_separate_files_mask_other_task(two_source, two_source_config):
    ds = two_source
    assert len(ds) == 187 and ds.source_sizes().tolist() == [150, 37]
    genre, sentiment = ds.labels[:, 0], ds.labels[:, 1]
    assert (genre[ds.source == 0] >= 0).all() and (sentiment[ds.source == 0] == -1).all()
    assert (sentiment[ds.source == 1] >= 0).all() and (genre[ds.source == 1] == -1).all()
    expected = varied_rows(150, 1, "genre", GENRES)
    assert [GENRES[i] for i in genre[:150]] == [r["genre"] for r in expected]
    assert ds.texts[0] == expected[0]["text"]
    assert all(x.dtype == np.int32 and x[0] == 2 and x[-1] == 3 for x in ds.input_ids)


def test_unlabelled_row_and_missing_train_file(tmp_path, tiny_backbone):
    path = write(tmp_path / "t.tsv", "text\tlabel\nx\ta\ny\t\nz\tb\n")
    config = make_config([TaskConfig(name="label", labels=("a", "b"), train_file=str(path))])
    with pytest.raises(UserError, match=r"t\.tsv:3: no label in column\(s\) 'label' \(1 such"):
        data.load_task_datasets(config, tiny_backbone.tokenizer)
    # One file carrying both tasks: a row is refused only when it has neither label, and the
    # message names both columns and counts the rows.
    shared = write(tmp_path / "both.tsv", "text\tx\ty\na\ta\t\nb\t\tc\nc\t\t\nd\t\t\n")
    both = make_config(
        [
            TaskConfig(name="x", labels=("a", "b"), train_file=str(shared)),
            TaskConfig(name="y", labels=("c", "d"), train_file=str(shared)),
        ]
    )
    message = r"both\.tsv:4: no label in column\(s\) 'x', 'y' \(2 such row\(s\)\); fill in"
    with pytest.raises(UserError, match=message):
        data.load_task_datasets(both, tiny_backbone.tokenizer)
    with pytest.raises(UserError, match="has no train_file"):
        data.load_task_datasets(
            make_config([TaskConfig(name="label", labels=("a", "b"))]), tiny_backbone.tokenizer
        )


def test_dataset_from_rows_and_texts(tiny_backbone, tiny_config):
    rows = make_rows(20, seed=3)
    ds = data.dataset_from_rows(rows, tiny_config, tiny_backbone.tokenizer)
    genres = tiny_config.task("genre").labels
    assert ds.labels.shape == (20, 2)
    assert [genres[i] for i in ds.labels[:, 0]] == [r["genre"] for r in rows]
    bad = [dict(rows[0]), {**rows[1], "sentiment": "meh"}]
    with pytest.raises(UserError, match=r"rows:2 \(column 'sentiment'\)"):
        data.dataset_from_rows(bad, tiny_config, tiny_backbone.tokenizer)
    texts = dataset_from_texts(["a b", "c"], tiny_backbone.tokenizer, 16, ("genre",))
    assert texts.labels.tolist() == [[-1], [-1]] and texts.lengths.tolist() == [4, 3]


# -- batches -------------------------------------------------------------------------------


def test_bucket_lengths_capped_at_max_length():
    assert data.bucket_lengths((16, 32, 64, 128), 48) == (16, 32, 48)
    assert data.bucket_lengths((16, 32), 128) == (16, 32, 128)
    assert data.bucket_lengths((16, 32), 32) == (16, 32)


def test_batch_shapes_buckets_and_content(two_source, two_source_config):
    config, ds = two_source_config, two_source
    buckets = data.buckets_for(config)
    assert buckets == (8, 16, 24, 32, 48)
    seen_lengths = set()
    for batch in data.BatchStream(ds, config, epochs=1):
        t = batch["input_ids"].shape[1]
        seen_lengths.add(t)
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert batch[key].shape == (8, t) and batch[key].dtype == np.int32
        real = batch["index"] >= 0
        longest = ds.lengths[batch["index"][real]].max()
        assert t == min(b for b in buckets if b >= longest)  # padding never exceeds a bucket
        for k, i in enumerate(batch["index"]):
            if i < 0:
                assert batch["attention_mask"][k].sum() == 0
                assert all(batch["labels"][n][k] == -1 for n in ds.task_names)
                continue
            n = ds.lengths[i]
            np.testing.assert_array_equal(batch["input_ids"][k, :n], ds.input_ids[i])
            assert batch["attention_mask"][k].sum() == n and not batch["input_ids"][k, n:].any()
            for j, name in enumerate(ds.task_names):
                assert batch["labels"][name][k] == ds.labels[i, j]
    assert len(seen_lengths) > 1 and seen_lengths <= set(buckets)


def test_last_partial_batch_is_padded(two_source, two_source_config):
    config = with_data(two_source_config, group_by_length=False)
    batches = data.epoch_batches(two_source, config, 0)
    assert [len(b) for b in batches] == [8] * 23 + [3]
    batch = data.make_batch(two_source, batches[-1], 8, data.buckets_for(config))
    assert batch["index"].tolist()[3:] == [-1] * 5 and batch["input_ids"].shape[0] == 8
    other = data.make_batch(two_source, batches[0], 8, (48,), ("sentiment", "missing"))
    np.testing.assert_array_equal(other["labels"]["sentiment"], two_source.labels[batches[0], 1])
    assert (other["labels"]["missing"] == -1).all() and set(other["labels"]) == {
        "sentiment",
        "missing",
    }


# -- training order ------------------------------------------------------------------------


@pytest.mark.parametrize("mixing", ["proportional", "round_robin"])
@pytest.mark.parametrize("group", [False, True])
def test_every_row_once_per_epoch(two_source, two_source_config, mixing, group):
    config = with_data(two_source_config, mixing=mixing, group_by_length=group, group_window=2)
    for epoch in (0, 1):
        batches = data.epoch_batches(two_source, config, epoch)
        assert len(batches) == data.steps_per_epoch(two_source, config)
        assert all(1 <= len(b) <= 8 for b in batches)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(two_source)))


def test_round_robin_alternates_single_source_batches(two_source, two_source_config):
    config = with_data(two_source_config, mixing="round_robin")
    batches = data.epoch_batches(two_source, config, 0)
    sources = [set(two_source.source[b].tolist()) for b in batches]
    assert all(len(s) == 1 for s in sources)
    order = [s.pop() for s in sources]
    assert order[:10] == [0, 1] * 5  # 37 sentiment rows = 5 batches, then genre alone
    assert order[10:] == [0] * (19 - 5) and len(order) == 19 + 5


def test_temperature_mixing_proportions(tiny_backbone, tmp_path):
    big = write_rows(tmp_path / "big.tsv", varied_rows(300, 4, "genre", GENRES), ["text", "genre"])
    small = write_rows(
        tmp_path / "small.tsv", varied_rows(30, 5, "sentiment", SENTIMENTS), ["text", "sentiment"]
    )
    tasks = [
        TaskConfig(name="genre", labels=GENRES, train_file=str(big)),
        TaskConfig(name="sentiment", labels=SENTIMENTS, train_file=str(small)),
    ]
    config = make_config(tasks, batch_size=16, mixing="temperature", mixing_temperature=2.0)
    ds = data.load_task_datasets(config, tiny_backbone.tokenizer)
    p_small = 30**0.5 / (300**0.5 + 30**0.5)  # 0.24 instead of 30/330 = 0.09
    seen_big = []
    for epoch in range(4):
        rows = np.concatenate(data.epoch_batches(ds, config, epoch))
        assert len(rows) == 330 and data.steps_per_epoch(ds, config) == 21
        n_small = int((ds.source[rows] == 1).sum())
        assert abs(n_small - 330 * p_small) <= 1
        counts = np.bincount(rows[ds.source[rows] == 1] - 300, minlength=30)
        assert counts.max() - counts.min() <= 1  # up-sampled evenly, not with replacement
        big_rows = rows[ds.source[rows] == 0]
        assert len(set(big_rows.tolist())) == len(big_rows)  # down-sampled: no repeats
        seen_big.append(set(big_rows.tolist()))
    assert seen_big[0] | seen_big[1] == set(range(300))  # every row within ceil(300/251)
    assert seen_big[2] | seen_big[3] == set(range(300))
    one = with_data(config, mixing_temperature=1.0)  # T = 1 is proportional: each row once
    assert sorted(np.concatenate(data.epoch_batches(ds, one, 0)).tolist()) == list(range(330))


def test_order_depends_on_seed_and_epoch_only(two_source, two_source_config):
    def flat(config, epoch):
        return np.concatenate(data.epoch_batches(two_source, config, epoch)).tolist()

    config = two_source_config
    assert flat(config, 0) == flat(config, 0)
    assert flat(config, 0) != flat(with_train(config, seed=1), 0)
    assert flat(config, 0) != flat(config, 1)


def batch_key(batch) -> tuple:
    return (batch["index"].tobytes(), batch["input_ids"].tobytes())


@pytest.mark.parametrize("mixing", ["proportional", "temperature", "round_robin"])
def test_resume_matches_uninterrupted_run(two_source, two_source_config, mixing):
    config = with_data(two_source_config, mixing=mixing, group_window=2)
    steps = data.steps_per_epoch(two_source, config)
    reference = [batch_key(b) for b in data.BatchStream(two_source, config, epochs=3)]
    assert len(reference) == 3 * steps
    for k in (0, 1, steps - 1, steps, steps + 5, 2 * steps + 2, 3 * steps):
        stream = data.BatchStream(two_source, config, epochs=3)
        for _ in range(k):
            next(stream)
        state = json.loads(json.dumps(stream.state()))
        assert state == data.stream_state(two_source, config, k)
        resumed = data.BatchStream(two_source, config, state, epochs=3)
        assert [batch_key(b) for b in resumed] == reference[k:]
    assert data.stream_state(two_source, config, steps) == {"epoch": 1, "batch": 0}
    with pytest.raises(UserError, match="batches per epoch"):
        data.BatchStream(two_source, config, {"epoch": 0, "batch": steps + 1})


def test_grouping_by_length_reduces_padding(two_source, two_source_config):
    plain = with_data(two_source_config, group_by_length=False)
    grouped = with_data(two_source_config, group_by_length=True, group_window=4)
    share = {
        name: padding_stats(data.BatchStream(two_source, cfg, epochs=1))["padding_share"]
        for name, cfg in (("plain", plain), ("grouped", grouped))
    }
    assert share["grouped"] < 0.7 * share["plain"], share


def test_finer_buckets_pad_less_and_keep_the_same_batches(two_source, two_source_config):
    """Buckets set only how far a batch pads: its rows and their order stay the same, so a
    run with finer buckets trains on the same batches (the real preset's nine)."""
    coarse = with_data(two_source_config, length_buckets=(16, 32, 64))
    fine = with_data(two_source_config, length_buckets=(4, 6, 8, 12, 16, 24, 32, 48, 64))
    for epoch in (0, 1):
        rows = [data.epoch_batches(two_source, cfg, epoch) for cfg in (coarse, fine)]
        assert [b.tolist() for b in rows[0]] == [b.tolist() for b in rows[1]]
    share = {
        name: padding_stats(data.BatchStream(two_source, cfg, epochs=1))["padding_share"]
        for name, cfg in (("coarse", coarse), ("fine", fine))
    }
    assert share["fine"] < 0.8 * share["coarse"], share


def test_inference_buckets_are_fine_and_end_at_max_length():
    assert data.inference_buckets(128) == (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128)
    assert data.inference_buckets(20) == (8, 16, 20)
    long = data.inference_buckets(512)
    assert long[-1] == 512 and 224 in long and 320 in long and 288 not in long
    # Padding to the next bucket wastes at most a quarter of the row beyond 8 tokens.
    for n in range(9, 513):
        padded = next(b for b in long if b >= n)
        assert padded - n < max(8, n // 4)


def test_padding_stats_counts():
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.int32)
    stats = padding_stats([{"attention_mask": mask}])
    assert stats == {"real_tokens": 3, "padded_tokens": 5, "padding_share": 5 / 8}


# -- inference, prefetch -------------------------------------------------------------------


def test_inference_batches_restore_order(tiny_backbone):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(FILLER, size=int(rng.integers(1, 30)))) for _ in range(45)]
    tok = dataset_from_texts(texts, tiny_backbone.tokenizer, 24, ("genre",))
    chunks, indices, lengths = [], [], []
    for idx, batch in data.inference_batches(tok, 16, (8, 16, 32), 24):
        assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] in (8, 16, 24)
        np.testing.assert_array_equal(batch["index"][: len(idx)], idx)
        lengths += batch["attention_mask"].sum(1)[: len(idx)].tolist()
        # A fake "model output": each row's first token count, per task, as a dict.
        chunks.append({"n": batch["attention_mask"].sum(1), "ids": batch["input_ids"][:, :2]})
        indices.append(idx)
    assert lengths == sorted(lengths, reverse=True)
    out = data.restore_order(chunks, indices, len(texts))
    assert out["n"].tolist() == tok.lengths.tolist()
    assert out["ids"][:, 1].tolist() == [x[1] for x in tok.input_ids]
    with pytest.raises(ValueError):
        data.restore_order(chunks[:-1], indices[:-1], len(texts))


def test_inference_batches_token_budget(tiny_backbone):
    """Under ``max_tokens`` long buckets hold halved batches, every row once, order kept."""
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(FILLER, size=int(rng.integers(1, 40)))) for _ in range(70)]
    tok = dataset_from_texts(texts, tiny_backbone.tokenizer, 32, ("genre",))
    shapes, seen = [], []
    for idx, batch in data.inference_batches(tok, 16, (8, 16, 24), 32, max_tokens=16 * 16):
        rows, length = batch["input_ids"].shape
        assert rows * length <= 16 * 16 or rows == 1
        assert rows == {8: 16, 16: 16, 24: 8, 32: 8}[length]  # 16 rows, halved past 16 tokens
        assert batch["attention_mask"].sum(1)[: len(idx)].max() <= length
        shapes.append((rows, length))
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(texts)))
    assert {length for _, length in shapes} >= {8, 32}  # the corpus reaches both ends
    assert rows_within(64, 128, 64 * 64) == 32 and rows_within(64, 128, None) == 64
    assert rows_within(4, 1000, 10) == 1


def test_embed_tokenized_same_with_budget(tiny_backbone):
    """The budget changes how rows are batched, not what comes out (row i = input i)."""
    from mtl_jax.encoder import tokenize
    from mtl_jax.evaluate import embed_tokenized
    from mtl_jax.forward import batch_token_budget
    from mtl_jax.model import build_model, init_params

    config = Config(model=ModelConfig(backbone="tiny", max_length=128), tasks=())
    model = build_model(config, tiny_backbone)
    params = init_params(model, jax.random.key(0), tiny_backbone)
    rng = np.random.default_rng(2)
    texts = [" ".join(rng.choice(FILLER, size=int(rng.integers(1, 120)))) for _ in range(24)]
    tok = tokenize(tiny_backbone.tokenizer, texts, 128)
    budget = batch_token_budget(8)
    shapes = {
        b["input_ids"].shape for _, b in data.inference_batches(tok, 8, (16, 32, 64), 128, budget)
    }
    assert min(rows for rows, _ in shapes) < 8  # some batches are halved (CPU: 8 x 16 tokens)
    budgeted = embed_tokenized(model, params, tok, batch_size=8, max_length=128)
    one_by_one = np.concatenate(
        [
            embed_tokenized(
                model,
                params,
                tokenize(tiny_backbone.tokenizer, [t], 128),
                batch_size=1,
                max_length=128,
            )
            for t in texts
        ]
    )
    np.testing.assert_allclose(budgeted, one_by_one, atol=1e-5)


def test_prefetch_keeps_order_and_raises():
    assert list(data.prefetch(iter(range(50)), size=3)) == list(range(50))

    def broken():
        yield 1
        raise RuntimeError("boom")

    stream = data.prefetch(broken())
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(stream)
    endless = data.prefetch(iter(int, 1))  # never ends; leaving early must not hang
    assert next(endless) == 0
    endless.close()


# -- real data -----------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED / "data" / "sst2").is_dir(), reason="../shared/data absent")
def test_real_shared_data(tiny_backbone):
    root = SHARED / "data"
    tasks = [
        TaskConfig(
            name="genre",
            label_column="genre",
            train_file=str(root / "brown_genre" / "train.tsv"),
            dev_file=str(root / "brown_genre" / "dev.tsv"),
        ),
        TaskConfig(
            name="sentiment",
            label_column="sentiment",
            train_file=str(root / "sst2" / "train.tsv"),
            dev_file=str(root / "sst2" / "dev.tsv"),
        ),
    ]
    config = resolve_labels(make_config(tasks, batch_size=32, max_length=64))
    assert config.task("genre").labels == (
        "adventure",
        "humor",
        "mystery",
        "romance",
        "science_fiction",
    )
    assert config.task("sentiment").labels == ("negative", "positive")
    train = data.load_task_datasets(config, tiny_backbone.tokenizer, "train")
    dev = data.load_task_datasets(config, tiny_backbone.tokenizer, "dev")
    assert train.source_sizes().tolist() == [11_984, 6_920]
    assert dev.source_sizes().tolist() == [1_220, 872]
    genre = np.bincount(train.labels[train.source == 0, 0], minlength=5).tolist()
    assert genre == [3_873, 700, 3_034, 3_710, 667]
    assert np.bincount(train.labels[train.source == 1, 1]).tolist() == [3_310, 3_610]
    assert (train.labels[train.source == 1, 0] == -1).all()
    assert data.steps_per_epoch(train, config) == -(-18_904 // 32)
