"""Configs round-trip through JSON and TOML; every bad key or value is named."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from mtl_jax.config import (
    Config,
    FreezeSpec,
    ModelConfig,
    TaskConfig,
    TrainConfig,
    default_tasks,
)
from mtl_jax.config_io import apply_overrides, load_config
from mtl_jax.data import load_task_datasets
from mtl_jax.errors import UserError
from mtl_jax.from_plain import to_plain
from mtl_jax.presets import demo, real

from conftest import load_script
from data_helpers import resolve_class_weights, resolve_labels


def test_the_readmes_config_block_is_every_key_at_its_default():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Configuration", 1)[1]
    block = tomllib.loads(section.split("```toml\n", 1)[1].split("```", 1)[0])
    defaults = Config().to_dict()
    for name in ("model", "data", "train", "parallel"):
        assert block[name] == defaults[name], name
    (task,) = block["tasks"]
    assert set(task) == {f.name for f in dataclasses.fields(TaskConfig)}
    example = {"name", "train_file", "dev_file", "label_column", "hidden", "dropout"}
    plain = to_plain(dataclasses.asdict(TaskConfig(name="genre")))
    expected = {k: v for k, v in plain.items() if k not in example}
    assert {k: v for k, v in task.items() if k not in example} == expected


@pytest.mark.parametrize("make", [demo, real])
def test_round_trip_json_and_toml(tmp_path, make):
    config = make()
    (tmp_path / "c.json").write_text(config.to_json())
    (tmp_path / "c.toml").write_text(config.to_toml())
    assert load_config(tmp_path / "c.json") == config
    assert load_config(tmp_path / "c.toml") == config


def test_overrides_address_tasks_by_name():
    config = apply_overrides(
        demo(),
        [
            "train.freeze=top:2",
            "train.epochs=5",
            "tasks.genre.loss_weight=0.5",
            'tasks.sentiment.train_file="x.tsv"',
            "data.length_buckets=[8, 16]",
        ],
    )
    assert config.train.freeze == "top:2"
    assert config.train.epochs == 5
    assert config.task("genre").loss_weight == 0.5
    assert config.task("sentiment").train_file == "x.tsv"
    assert config.data.length_buckets == (8, 16)
    assert config.model == demo().model


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bogus=1", "unknown key 'train.bogus'"),
        ("tasks.nope.loss_weight=1", "no task named 'nope'"),
        ('train.epochs="three"', "'train.epochs' expects an integer"),
        ("train.batch_size=1.5", "'train.batch_size' expects an integer"),
        ("model.normalize=1", "'model.normalize' expects true/false"),
        ("noequals", "expected dotted.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(demo(), [override])


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"train": {"batch_size": -4}}, "train.batch_size"),
        ({"train": {"freeze": "some"}}, "train.freeze"),
        ({"train": {"freeze": "head:topic"}}, "train.freeze"),
        ({"model": {"pooling": "sum"}}, "model.pooling"),
        ({"model": {"remat_min_length": 0}}, "model.remat_min_length"),
        ({"data": {"length_buckets": [64, 32]}}, "data.length_buckets"),
        ({"train": {"layer_lr_decay": 0}}, "train.layer_lr_decay"),
        ({"train": {"token_cutoff": 1.0}}, "train.token_cutoff"),
        ({"train": {"token_cutoff": -0.1}}, "train.token_cutoff"),
        ({"train": {"init_seed": -2}}, "train.init_seed"),
        ({"tasks": {"class_weighting": "inverse"}}, "tasks.genre.class_weighting"),
        ({"tasks": {"class_weights": [1.0, 2.0]}}, "tasks.genre.class_weights"),
        ({"tasks": {"class_weights": [1, 1, -1, 1, 1]}}, "tasks.genre.class_weights"),
        ({"tasks": {"class_weights": [0, 0, 0, 0, 0]}}, "tasks.genre.class_weights"),
    ],
)
def test_validate_names_the_bad_key(changes, key):
    data = demo().to_dict()
    for section, values in changes.items():
        (data[section][0] if section == "tasks" else data[section]).update(values)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        Config.from_dict(data).validate()


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3")
    with pytest.raises(UserError, match="bad.toml: not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"trian": {}}))
    with pytest.raises(UserError, match="unknown.json: unknown config key 'trian'"):
        load_config(unknown)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_configs_are_frozen_and_replaceable():
    config = demo()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 9  # type: ignore[misc]
    assert dataclasses.replace(config.train, epochs=9).epochs == 9


@pytest.mark.parametrize(
    "text, spec",
    [
        ("none", FreezeSpec("none")),
        ("all", FreezeSpec("all")),
        ("backbone", FreezeSpec("backbone")),
        ("gradual", FreezeSpec("gradual")),
        ("head:genre", FreezeSpec("head", head="genre")),
        ("top:0", FreezeSpec("top", top_k=0)),
        ("top:12", FreezeSpec("top", top_k=12)),
    ],
)
def test_freeze_spec_parses_every_form_and_prints_it_back(text, spec):
    assert FreezeSpec.parse(text) == spec
    assert TrainConfig(freeze=text).freeze_spec == spec
    assert str(spec) == text


@pytest.mark.parametrize(
    "text, message",
    [
        ("some", "expected none | all | backbone | head:<task> | top:<k> | gradual, got 'some'"),
        ("top:x", "'top:x' needs a whole number of layers >= 0"),
        ("top:-1", "'top:-1' needs a whole number of layers >= 0"),
        ("head:", "got 'head:'"),
        ("none:1", "got 'none:1'"),
    ],
)
def test_bad_freeze_strings_name_the_key(text, message):
    with pytest.raises(UserError, match="config key 'train.freeze'") as info:
        FreezeSpec.parse(text)
    assert message in str(info.value)


def test_freeze_spec_says_when_the_backbone_can_train():
    trains = {t: FreezeSpec.parse(t).trains_backbone for t in ("none", "all", "backbone")}
    assert trains == {"none": True, "all": False, "backbone": False}
    assert not FreezeSpec.parse("top:0").trains_backbone
    assert FreezeSpec.parse("top:1").trains_backbone
    assert FreezeSpec.parse("head:genre").trains_backbone
    assert FreezeSpec.parse("gradual").trains_backbone


def test_to_toml_is_valid_toml_of_every_key():
    config = apply_overrides(real(), ['train.freeze="gradual"', "train.unfreeze_every=2"])
    assert tomllib.loads(config.to_toml()) == config.to_dict()


# -- keys the rest of the config would silently ignore ------------------------------------

IGNORED = [
    (
        ["train.unfreeze_every=3"],
        "config key 'train.unfreeze_every' = 3 would be ignored: it only applies with "
        'train.freeze = "gradual"; set train.freeze = "gradual", or train.unfreeze_every '
        "back to 1",
    ),
    (
        ['train.unfreeze_unit="steps"'],
        "config key 'train.unfreeze_unit' = \"steps\" would be ignored: it only applies with "
        'train.freeze = "gradual"; set train.freeze = "gradual", or train.unfreeze_unit '
        'back to "epochs"',
    ),
    (
        ['tasks.genre.train_file="genre.tsv"'],
        "config key 'tasks.genre.train_file' = \"genre.tsv\" would be ignored: it only "
        "applies with data.synthetic_train_rows = 0 (synthetic rows replace every task "
        "file); set data.synthetic_train_rows = 0 (synthetic rows replace every task file), "
        'or tasks.genre.train_file back to ""',
    ),
    (
        ['tasks.sentiment.dev_file="dev.tsv"'],
        "config key 'tasks.sentiment.dev_file' = \"dev.tsv\" would be ignored: it only "
        "applies with data.synthetic_train_rows = 0",
    ),
    (
        ["data.synthetic_train_rows=0", "data.synthetic_dev_rows=100"],
        "config key 'data.synthetic_dev_rows' = 100 would be ignored: it only applies with "
        "data.synthetic_train_rows > 0; set data.synthetic_train_rows > 0, or "
        "data.synthetic_dev_rows back to 0",
    ),
    (
        ["data.mixing_temperature=3.0"],
        "config key 'data.mixing_temperature' = 3.0 would be ignored: it only applies with "
        'data.mixing = "temperature"; set data.mixing = "temperature", or '
        "data.mixing_temperature back to 2.0",
    ),
    (
        ["data.group_by_length=false", "data.group_window=8"],
        "config key 'data.group_window' = 8 would be ignored: it only applies with "
        "data.group_by_length = true; set data.group_by_length = true, or data.group_window "
        "back to 64",
    ),
    (
        ["data.skip_empty=true"],
        "config key 'data.skip_empty' = true would be ignored: it only applies with "
        "data.synthetic_train_rows = 0 (task files); set data.synthetic_train_rows = 0 "
        "(task files), or data.skip_empty back to false",
    ),
    (
        ["train.layer_lr_decay=0.5"],
        "config key 'train.layer_lr_decay' = 0.5 would be ignored: it only applies with a "
        "train.freeze that trains backbone layers (not all, backbone or top:0)",
    ),
    (
        ['train.freeze="top:0"', "train.layer_lr_decay=0.5"],
        "config key 'train.layer_lr_decay' = 0.5 would be ignored",
    ),
]


@pytest.mark.parametrize("overrides, message", IGNORED)
def test_a_key_the_config_would_ignore_is_refused_naming_both_keys(overrides, message):
    config = apply_overrides(demo(), overrides)  # the demo: synthetic data, frozen backbone
    with pytest.raises(UserError) as info:
        config.validate()
    assert message in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ['train.freeze="gradual"', "train.unfreeze_every=3", 'train.unfreeze_unit="steps"'],
        [
            "data.synthetic_train_rows=0",
            "data.synthetic_dev_rows=0",
            'tasks.genre.train_file="genre.tsv"',
            'tasks.sentiment.dev_file="dev.tsv"',
            "data.skip_empty=true",
        ],
        ['data.mixing="temperature"', "data.mixing_temperature=3.0"],
        ["data.group_window=8"],
        ['train.freeze="top:1"', "train.layer_lr_decay=0.5"],
        ['train.freeze="head:genre"', "train.layer_lr_decay=0.5"],
        ['train.freeze="none"', "train.layer_lr_decay=0.5"],
        ["train.unfreeze_every=1", 'train.unfreeze_unit="epochs"'],  # the defaults
    ],
)
def test_the_same_keys_are_accepted_where_they_apply(overrides):
    assert apply_overrides(demo(), overrides).validate()


def test_presets_validate_and_skip_empty_defaults_off():
    assert demo().validate().data.skip_empty is False
    assert real().validate().data.skip_empty is False


def test_toml_round_trips_strings_a_json_writer_would_break():
    labels = ("😀 joy", 'say "hi"', "tab\there", "del\x7f", "back\\slash")
    config = dataclasses.replace(demo(), tasks=(TaskConfig(name="t", labels=labels),))
    text = config.to_toml()
    assert "length_buckets = [16, 32, 64, 128]" in text  # lists stay on one line
    assert Config.from_dict(tomllib.loads(text)) == config


def _write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))


def test_real_preset_trains_sentiment_on_the_phrases_and_balances_genre(
    tmp_path, monkeypatch, tiny_backbone
):
    """The recipe's data wiring on a miniature copy of ../shared/data: sentiment trains on
    sst2_phrases/ and is scored on the sst2/ sentences; genre gets n / (K * n_c) weights."""
    counts = {"adventure": 6, "humor": 2, "mystery": 4, "romance": 4, "science_fiction": 4}
    genre_rows = [
        (f"{label} {i}.", label, f"c{label}") for label, n in counts.items() for i in range(n)
    ]
    columns = ("text", "genre", "source_id")
    _write_tsv(tmp_path / "brown_genre/train.tsv", columns, genre_rows)
    _write_tsv(
        tmp_path / "brown_genre/dev.tsv", columns, [("d.", "humor", "x"), ("e.", "humor", "x")]
    )
    phrases = [("good", "positive"), ("bad", "negative"), ("fine", "positive")]
    _write_tsv(tmp_path / "sst2_phrases/train.tsv", ("text", "sentiment"), phrases)
    _write_tsv(tmp_path / "sst2/dev.tsv", ("text", "sentiment"), [("ok", "positive")] * 2)
    monkeypatch.setenv("MTL_JAX_DATA", str(tmp_path))

    config = resolve_labels(real().validate())
    train = load_task_datasets(config, tiny_backbone.tokenizer, "train")
    dev = load_task_datasets(config, tiny_backbone.tokenizer, "dev")
    config = resolve_class_weights(config, train)

    assert len(train) == 20 + 3 and len(dev) == 2 + 2
    # Genre reads each sentence with two neighbours per side from the same text (never
    # across texts: adventure 5 is its text's last); sentiment alone.
    assert train.texts[:3] == (
        "adventure 0. adventure 1. adventure 2.",
        "adventure 0. adventure 1. adventure 2. adventure 3.",
        "adventure 0. adventure 1. adventure 2. adventure 3. adventure 4.",
    )
    assert train.texts[5] == "adventure 3. adventure 4. adventure 5."
    assert dev.texts == ("d. e.", "d. e.", "ok", "ok")
    balanced = [20 / (5 * counts[label]) for label in config.task("genre").labels]
    assert config.task("genre").class_weights == pytest.approx(balanced)
    assert config.task("sentiment").class_weights == ()  # phrases: no weighting
    assert config.model.remat is False and config.train.freeze == "none"


def test_the_study_rows_still_train_the_round1_real_preset(monkeypatch):
    """scripts/experiments.py pins the `real` preset its round-1/2 rows ran with, so their
    documented numbers keep their commands whatever the preset becomes (the old body of
    presets.real, verbatim)."""
    monkeypatch.setenv("MTL_JAX_DATA", "data")
    experiments = load_script("experiments")
    genre, sentiment = default_tasks()
    round1 = Config(
        model=ModelConfig(backbone="minilm", max_length=128),
        tasks=(
            dataclasses.replace(
                genre, train_file="data/brown_genre/train.tsv", dev_file="data/brown_genre/dev.tsv"
            ),
            dataclasses.replace(
                sentiment, train_file="data/sst2/train.tsv", dev_file="data/sst2/dev.tsv"
            ),
        ),
        train=TrainConfig(freeze="none", epochs=3, batch_size=32, warmup_steps=200, eval_every=500),
    )
    pins = [experiments.ROUND18_SHARED_TOP, *experiments.ROUND1_PRESET]
    assert apply_overrides(real(), pins) == round1
    assert experiments.real() == experiments.preset(*pins)


def test_every_study_row_builds_a_valid_config(monkeypatch):
    """Each row of scripts/experiments.py is an hour of CPU: a misspelt key or a bad value
    must fail here, not when the row starts. Rows change what their names say."""
    monkeypatch.setenv("MTL_JAX_DATA", "data")
    experiments = load_script("experiments")
    from mtl_jax.cli import build_parser, resolve_train_config

    def config_of(name):
        args = build_parser().parse_args(["train", *experiments.ROWS[name], "--workdir", "w"])
        return resolve_train_config(args)

    configs = {name: config_of(name) for name in experiments.ROWS}
    current = real("data")  # since round 19: genre reads its own copy of the top layer
    assert configs["real"] == configs["real-context2-2ep-genre-own1"] == current
    genre = current.task("genre")
    assert (genre.context, genre.source_column, genre.own_layers) == (2, "source_id", 1)
    assert current.train.epochs == 2
    own2 = dataclasses.replace(genre, own_layers=2)
    assert configs["real-genre-own2"] == dataclasses.replace(
        current, tasks=(own2, current.task("sentiment"))
    )
    genre = dataclasses.replace(genre, own_layers=0)  # rounds 11-18: the shared top layer
    preset = dataclasses.replace(current, tasks=(genre, current.task("sentiment")))
    assert configs["real-context2-2ep"] == preset
    four_epochs = dataclasses.replace(preset.train, epochs=4)  # rounds 4-13
    round13 = dataclasses.replace(
        preset,
        tasks=(dataclasses.replace(genre, context=1), preset.task("sentiment")),
        train=four_epochs,
    )
    assert configs["real-context1"] == round13
    batch128 = configs["real-batch128"]
    assert (batch128.tasks, batch128.train.epochs) == (round13.tasks, 4)
    sentences = dataclasses.replace(
        round13,
        tasks=(
            dataclasses.replace(genre, context=0, source_column=""),
            preset.task("sentiment"),
        ),
    )
    round10 = configs["real-round10"]
    assert round10 == dataclasses.replace(
        sentences, data=dataclasses.replace(preset.data, length_buckets=(16, 32, 64, 128))
    )
    assert configs["real-layer-1"] == dataclasses.replace(
        round10, model=dataclasses.replace(round10.model, layer=-1)
    )
    baseline = configs["best-balanced"]
    uncertainty = configs["best-balanced-uncertainty"]
    assert uncertainty.train == dataclasses.replace(baseline.train, uncertainty_weighting=True)
    assert (uncertainty.model, uncertainty.tasks) == (baseline.model, baseline.tasks)
    plus = configs["best-balanced-plus-sentences"]
    assert plus.task("sentiment").train_file == str(experiments.PLUS_SENTENCES)
    assert (plus.train, plus.task("genre")) == (baseline.train, baseline.task("genre"))
    assert configs["best-balanced-cls"].model.pooling == "cls"
    two_epochs = configs["real-2ep-uncertainty"].train
    assert (two_epochs.epochs, two_epochs.uncertainty_weighting) == (2, True)
    assert configs["real-uncertainty"] == dataclasses.replace(
        round10, train=dataclasses.replace(round10.train, uncertainty_weighting=True)
    )
    assert configs["real-bf16"] == dataclasses.replace(
        round10, model=dataclasses.replace(round10.model, dtype="bfloat16")
    )
    assert [task.name for task in configs["genre2"].tasks] == ["genre"]
    context = configs["best-balanced-context1"]
    assert context.task("genre") == dataclasses.replace(
        baseline.task("genre"), context=1, source_column="source_id"
    )
    assert (context.train, context.task("sentiment")) == (
        baseline.train,
        baseline.task("sentiment"),
    )
    assert configs["genre2-context1-seed2"].task("genre") == dataclasses.replace(
        configs["genre2-seed2"].task("genre"), context=1, source_column="source_id"
    )
    assert configs["real-fine-buckets"] == sentences
    assert configs["genre2-context2-seed1"].task("genre") == dataclasses.replace(
        configs["genre2-seed1"].task("genre"), context=2, source_column="source_id"
    )
    assert preset.data.length_buckets == (8, 12, 16, 24, 32, 48, 64, 96, 128)
    for row, train in (
        ("real-context2-3ep", {"epochs": 3}),  # the preset of rounds 14-15
        ("real-context2-3ep-seed1", {"epochs": 3, "seed": 1}),
        ("real-context2-2ep-seed1", {"seed": 1}),
        ("real-context2-2ep-seed2", {"seed": 2}),
        ("real-context2-2ep-uncertainty", {"uncertainty_weighting": True}),
        ("real-context2-2ep-uncertainty-seed1", {"uncertainty_weighting": True, "seed": 1}),
    ):
        expected = dataclasses.replace(preset.train, **train)
        assert configs[row] == dataclasses.replace(preset, train=expected), row
    for task in ("sentiment", "genre"):  # multi- against single-task at the preset's budget
        single = configs[f"real-context2-2ep-{task}-only"]
        assert single == dataclasses.replace(preset, tasks=(preset.task(task),)), task
    assert configs["real-context2-2ep-bf16"] == dataclasses.replace(
        preset, model=dataclasses.replace(preset.model, dtype="bfloat16")
    )
    own = dataclasses.replace(preset.task("genre"), own_layers=1)  # genre's own top layer
    for name, seed in (
        ("real-context2-2ep-genre-own1", 0),
        ("real-context2-2ep-genre-own1-seed1", 1),
        ("real-context2-2ep-genre-own1-seed2", 2),
    ):
        assert configs[name] == dataclasses.replace(
            preset,
            tasks=(own, preset.task("sentiment")),
            train=dataclasses.replace(preset.train, seed=seed),
        ), name
    stage2 = configs["stage2-sentences-3ep"]  # after the preset: its export, on sentences
    assert stage2 == dataclasses.replace(
        preset,
        model=dataclasses.replace(preset.model, backbone=experiments.SEED2_EXPORT, layer=-1),
        tasks=(dataclasses.replace(preset.task("sentiment"), train_file="data/sst2/train.tsv"),),
        train=dataclasses.replace(
            preset.train, epochs=3, learning_rate=2e-5, warmup_steps=20, eval_every=100
        ),
    )
    assert configs["stage2-phrases-651"].task("sentiment") == preset.task("sentiment")
    alone = configs["best-sentiment-only"]
    assert configs["best-sentiment-only-fgm1"] == dataclasses.replace(
        alone, train=dataclasses.replace(alone.train, adversarial_epsilon=1.0)
    )
    assert configs["best-sentiment-only-batch16"] == dataclasses.replace(
        alone,
        train=dataclasses.replace(
            alone.train,
            batch_size=16,
            learning_rate=7e-5,
            warmup_steps=400,
            eval_every=2000,
        ),
    )
