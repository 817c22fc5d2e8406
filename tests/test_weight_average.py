"""scripts/weight_average.py: weighted means of trained models' params, scored on dev files."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

from mtl_jax.config import default_tasks
from mtl_jax.errors import UserError
from mtl_jax.inference import evaluate_files, load_trained

from conftest import load_script
from run_helpers import make_run

GENRE = ("adventure", "humor", "mystery", "romance", "science_fiction")


@pytest.fixture(scope="module")
def script():
    return load_script("weight_average")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    run = make_run(root / "run")
    words = ["the detective found a clue", "a robot on the ship", "kiss", "the clown laughed"]
    genre = root / "genre.tsv"
    genre.write_text(
        "text\tgenre\n" + "".join(f"{w} {i}\t{GENRE[i % 5]}\n" for i, w in enumerate(words * 3))
    )
    sentiment = root / "sentiment.tsv"
    labels = ("negative", "positive")
    sentiment.write_text(
        "text\tsentiment\n" + "".join(f"{w}\t{labels[i % 2]}\n" for i, w in enumerate(words * 2))
    )
    return run, {"genre": str(genre), "sentiment": str(sentiment)}


def test_weights_are_checked_before_any_mean(script):
    assert script.checked_weights([1.0, 0.0], 2) == [1.0, 0.0]
    with pytest.raises(UserError, match="--weights: 1 weights for 2 models"):
        script.checked_weights([1.0], 2)
    with pytest.raises(UserError, match="--weights: expected numbers >= 0"):
        script.checked_weights([1.0, -1.0], 2)
    with pytest.raises(UserError, match="--weights: expected numbers >= 0, not all 0"):
        script.checked_weights([0.0, 0.0], 2)


def test_scores_are_those_of_the_mean_params(script, setup):
    run, files = setup
    latest, best = load_trained(str(run), "latest"), load_trained(str(run), "best")
    alone = script.average_scores([f"{run}:latest"], files)["scores"]
    assert alone == evaluate_files(latest, files)
    # Weight 0 drops a model; the mean of two differs from both.
    assert script.average_scores([f"{run}", f"{run}:best"], files, [1, 0])["scores"] == alone
    both = script.average_scores([f"{run}", f"{run}:best"], files)["scores"]
    mean = jax.tree.map(lambda x, y: (np.float64(x) + y) / 2, latest.params, best.params)
    by_hand = evaluate_files(
        dataclasses.replace(latest, params=jax.tree.map(np.float32, mean)), files
    )
    for task in files:
        np.testing.assert_allclose(both[task]["loss"], by_hand[task]["loss"], rtol=1e-5)
        assert both[task]["loss"] != alone[task]["loss"]
    # WiSE-FT: the pretrained backbone mixed in moves the scores; the heads stay the runs'.
    wise = script.average_scores([str(run)], files, pretrained_weight=0.5)["scores"]
    assert wise["genre"]["loss"] != alone["genre"]["loss"]


def test_a_model_that_does_not_fit_the_first_is_named(script, setup, tmp_path):
    run, files = setup
    genre, sentiment = default_tasks()
    narrower = make_run(
        tmp_path / "narrower", tasks=(genre, dataclasses.replace(sentiment, hidden=(64,)))
    )
    with pytest.raises(UserError, match=re.escape(f"{narrower}: its params differ from {run}'s")):
        script.average_scores([str(run), str(narrower)], files)
    renamed = (genre, dataclasses.replace(sentiment, labels=("bad", "good")))
    relabelled = make_run(tmp_path / "relabelled", tasks=renamed)
    with pytest.raises(UserError, match=re.escape(f"{relabelled}:best: its tasks or labels")):
        script.average_scores([str(run), f"{relabelled}:best"], files)
    # Every spec is parsed before any model is restored.
    with pytest.raises(UserError, match="newest: expected RUN_DIR"):
        script.average_scores([str(tmp_path / "nowhere"), f"{run}:newest"], files)


def test_ensemble_scores_the_mean_of_the_models_probabilities(script, setup, tmp_path):
    run, files = setup
    alone = script.ensemble_scores([str(run)], files)["scores"]
    expected = evaluate_files(load_trained(str(run)), files)
    for task in files:
        assert alone[task]["confusion"] == expected[task]["confusion"]
        assert alone[task]["accuracy"] == pytest.approx(expected[task]["accuracy"])
    # A sentiment-only run joins the sentiment vote only; the scores are the argmax of the
    # weighted mean of the members' probabilities.
    _, sentiment = default_tasks()
    single = make_run(tmp_path / "single", tasks=(sentiment,))
    specs = [str(run), f"{run}:best", str(single)]
    result = script.ensemble_scores(specs, files, [1.0, 2.0, 3.0])
    assert result["ensemble"] == {"genre": specs[:2], "sentiment": specs}
    members = [script.dev_probabilities(spec, files) for spec in specs]
    for task, weights in (("genre", [1.0, 2.0]), ("sentiment", [1.0, 2.0, 3.0])):
        labels, _, gold, _ = members[0][task]
        mean = sum(w * m[task][3] for w, m in zip(weights, members, strict=False))
        by_hand = np.zeros((len(labels), len(labels)), int)
        np.add.at(by_hand, (gold, mean.argmax(-1)), 1)
        assert result["scores"][task]["confusion"] == by_hand.tolist()
        assert result["scores"][task]["accuracy"] == pytest.approx(
            float(np.mean(mean.argmax(-1) == gold))
        )
    # The same labels in another order would mix the classes' probabilities: refused.
    genre, _ = default_tasks()
    relabelled = make_run(
        tmp_path / "relabelled",
        tasks=(genre, dataclasses.replace(sentiment, labels=("positive", "negative"))),
    )
    with pytest.raises(UserError, match=re.escape(f"{relabelled}: its sentiment labels or dev")):
        script.ensemble_scores([str(run), str(relabelled)], files)


def test_bad_input_is_one_line_and_exit_2(script, setup, capsys, tmp_path):
    run, files = setup
    data = [x for task, path in files.items() for x in ("--data", f"{task}={path}")]
    assert script.main([str(run), str(run), "--weights", "1", *data]) == 2
    assert capsys.readouterr().err == "error: --weights: 1 weights for 2 models\n"
    assert script.main([str(run), "--pretrained-weight", "1", *data]) == 2
    assert "--pretrained-weight: expected a number in [0, 1)" in capsys.readouterr().err
    assert script.main([str(run), "--ensemble", "--pretrained-weight", "0.5", *data]) == 2
    assert "--pretrained-weight mixes params: it does not apply" in capsys.readouterr().err
    assert script.main([f"{run}:newest", *data]) == 2
    assert "newest: expected RUN_DIR[:which] with which one of" in capsys.readouterr().err
    assert script.main([str(run), "--data", "genre"]) == 2
    assert capsys.readouterr().err == "error: --data 'genre': expected TASK=FILE\n"
    assert script.main([str(tmp_path / "nowhere"), *data]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and err.count("\n") == 1
    assert script.main([str(run), *data]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["models"] == [str(run)] and set(result["scores"]) == set(files)
    assert script.main([str(run), "--ensemble", *data]) == 0
    assert json.loads(capsys.readouterr().out)["ensemble"] == {t: [str(run)] for t in files}
