"""Configs round-trip through JSON and TOML; every bad key or value is named."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mtl_jax.config import Config, apply_overrides, load_config
from mtl_jax.errors import UserError
from mtl_jax.presets import demo, real


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
        ({"data": {"length_buckets": [64, 32]}}, "data.length_buckets"),
        ({"train": {"layer_lr_decay": 0}}, "train.layer_lr_decay"),
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
