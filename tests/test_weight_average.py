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
    # One model: its evaluation, the loss included (the probabilities row by row, so rows
    # out of line with their labels would change it even where every argmax agrees).
    alone = script.ensemble_scores([str(run)], files)["scores"]
    expected = evaluate_files(load_trained(str(run)), files)
    for task in files:
        assert alone[task]["confusion"] == expected[task]["confusion"]
        assert alone[task]["accuracy"] == pytest.approx(expected[task]["accuracy"])
        assert alone[task]["loss"] == pytest.approx(expected[task]["loss"], rel=1e-5)
    # A sentiment-only run joins the sentiment vote only; the scores are those of the
    # weighted mean of the members' probabilities.
    genre, sentiment = default_tasks()
    single = make_run(tmp_path / "single", tasks=(sentiment,))
    latest, best = str(run), f"{run}:best"
    result = script.ensemble_scores([latest, best, str(single)], files, [1.0, 2.0, 3.0])
    assert result["ensemble"] == {"genre": [latest, best], "sentiment": [latest, best, str(single)]}
    probs = {spec: script.dev_probabilities(spec, files) for spec in (latest, best, str(single))}
    votes = {
        "genre": [(1.0, latest), (2.0, best)],
        "sentiment": [(1.0, latest), (2.0, best), (3.0, str(single))],
    }
    for task, pairs in votes.items():
        gold = probs[latest][task].gold
        mean = sum(w * probs[spec][task].probs for w, spec in pairs) / sum(w for w, _ in pairs)
        by_hand = np.zeros((len(mean[0]), len(mean[0])), int)
        np.add.at(by_hand, (gold, mean.argmax(-1)), 1)
        assert result["scores"][task]["confusion"] == by_hand.tolist()
        loss = -np.log(mean[np.arange(len(gold)), gold]).mean()
        assert result["scores"][task]["loss"] == pytest.approx(loss, rel=1e-6)
        assert result["scores"][task]["loss"] != pytest.approx(alone[task]["loss"], rel=1e-6)
    # Weight 0 leaves a model out; a task only it has is refused.
    assert script.ensemble_scores([latest, str(single)], files, [1.0, 0.0])["scores"] == alone
    with pytest.raises(UserError, match=r"no model of positive weight has task\(s\) \['genre'\]"):
        script.ensemble_scores([latest, str(single)], files, [0.0, 1.0])
    with pytest.raises(UserError, match=r"no model of positive weight has task\(s\) \['genre'\]"):
        script.ensemble_scores([str(single)], {"genre": files["genre"]})  # nothing to run
    # Another label order would mix the classes' probabilities, another label set too.
    sets = {"reordered": ("positive", "negative"), "wider": ("negative", "positive", "neutral")}
    for name, labels in sets.items():
        other = make_run(
            tmp_path / name, tasks=(genre, dataclasses.replace(sentiment, labels=labels))
        )
        with pytest.raises(
            UserError, match=re.escape(f"{other}: its sentiment labels {list(labels)}")
        ):
            script.ensemble_scores([str(run), str(other)], files)


def test_models_must_score_the_same_dev_rows(script):
    seen = script.TaskProbs(("a", "b"), np.array([2, 3]), np.array([0, 1]), np.zeros((2, 2)))
    script._check_same_rows("m2", "t", seen, "m1", seen)
    for lines, gold in (([2, 4], [0, 1]), ([2, 3], [1, 1]), ([2], [0])):
        got = seen._replace(lines=np.array(lines), gold=np.array(gold))
        with pytest.raises(UserError, match=r"m2: its t dev rows differ from m1's \("):
            script._check_same_rows("m2", "t", seen, "m1", got)


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
