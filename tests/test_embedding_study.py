"""scripts/embedding_study.py on the tiny backbone: one pass = per-layer encoders, real scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import rankdata

from mtl_jax.inference import SentenceEncoder

from conftest import load_script

WORDS = {  # class -> words only that class uses (all in the tiny vocabulary)
    "adventure": ("jungle", "rifle", "river", "mountain", "map"),
    "mystery": ("detective", "murder", "clue", "alibi", "poison"),
    "romance": ("kiss", "lover", "roses", "darling", "embrace"),
    "science_fiction": ("rocket", "planet", "galaxy", "robot", "laser"),
    "humor": ("clown", "joke", "prank", "pie", "silly"),
}
SENTIMENT = {
    "positive": ("good", "great", "brilliant", "delightful", "superb"),
    "negative": ("bad", "awful", "boring", "dull", "terrible"),
}


@pytest.fixture(scope="module")
def study():
    return load_script("embedding_study")


@pytest.fixture(scope="module")
def tiny_encoder():
    return SentenceEncoder.load("tiny", layer=-1, max_length=32)


def _sentences(words: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(["the", *rng.choice(words, 3), "in", "town"]) for _ in range(n)]


def test_one_pass_gives_what_each_per_layer_encoder_gives(study, tiny_encoder):
    texts = ["the detective found a clue", "a rocket in orbit", "she laughed", "the old road"]
    vectors, truncated = study.layer_embeddings(tiny_encoder, texts, [1, 2, 3])
    assert truncated == 0
    assert set(vectors) == {(layer, p) for layer in (1, 2, 3) for p in ("mean", "cls", "max")}
    for layer, pooling in ((1, "max"), (2, "cls"), (3, "mean")):
        own = SentenceEncoder.load("tiny", layer=layer, pooling=pooling, max_length=32)
        np.testing.assert_allclose(
            vectors[(layer, pooling)], own.embed(texts).embeddings, atol=1e-5
        )
    assert not np.allclose(vectors[(1, "mean")], vectors[(3, "mean")], atol=1e-3)


def test_sts_spearman_is_100_when_gold_follows_the_setting_and_blind_to_l2(study, tiny_encoder):
    rng = np.random.default_rng(0)
    left = _sentences(WORDS["mystery"] + WORDS["romance"], 12, rng)
    right = left[:3] + _sentences(WORDS["humor"] + WORDS["mystery"], 9, rng)  # 3 identical
    a, _ = study.layer_embeddings(tiny_encoder, left, [1, 3])
    b, _ = study.layer_embeddings(tiny_encoder, right, [1, 3])
    key = (3, "mean")
    cos = (study._l2(a[key]) * study._l2(b[key])).sum(axis=1)
    np.testing.assert_allclose(cos[:3], 1.0, atol=1e-5)  # identical pairs: cosine 1
    # in the order of this cosine as the study ranks it (to 1e-6: the identical pairs tie)
    gold = rankdata(np.round(cos, 6)) * 5.0 / 12
    assert study.sts_spearman(a[key], b[key], gold) == pytest.approx(100.0)
    assert study.sts_spearman(a[key], b[key], -gold) == pytest.approx(-100.0)
    # cosine ignores length: L2-normalised (and rescaled) vectors score the same
    raw = study.sts_spearman(a[(1, "mean")][3:], b[(1, "mean")][3:], gold[3:])
    unit = study.sts_spearman(study._l2(a[(1, "mean")][3:]), 7 * b[(1, "mean")][3:], gold[3:])
    assert unit == pytest.approx(raw) and abs(raw) < 99.0
    assert study.sts_spearman(a[(1, "max")], b[(1, "max")], gold) < 99.0  # settings not mixed


def test_probe_separates_blobs_and_chooses_c_without_dev_labels(study):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    y = np.repeat(np.array(["a", "b", "c"]), 40)
    x = centres[np.searchsorted(["a", "b", "c"], y)] + rng.normal(size=(120, 16))
    dev_y = np.repeat(np.array(["a", "b", "c"]), 20)
    dev_x = centres[np.searchsorted(["a", "b", "c"], dev_y)] + rng.normal(size=(60, 16))
    probe = study.linear_probe(x, y, dev_x, dev_y, "macro_f1")
    assert probe["accuracy"] == 1.0 and probe["macro_f1"] == 1.0
    assert probe["holdout_macro_f1"] == 1.0 and probe["C"] in study.C_GRID
    shuffled = study.linear_probe(x, y, dev_x, rng.permutation(dev_y), "macro_f1")
    assert shuffled["C"] == probe["C"]  # C is chosen on train alone
    assert shuffled["accuracy"] < 0.6


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _labelled(classes: dict, n: int, rng: np.random.Generator) -> list[list[str]]:
    return [[s, label] for label, words in classes.items() for s in _sentences(words, n, rng)]


def test_main_scores_every_setting_and_writes_json(study, tmp_path, capsys):
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    pairs = [[s, s, "5.0"] for s in _sentences(WORDS["humor"], 4, rng)]
    pairs += [[s, t, "0.0"] for s, t in zip(_sentences(WORDS["mystery"], 4, rng),
                                             _sentences(WORDS["romance"], 4, rng), strict=True)]  # fmt: skip
    _write(data / "stsb/dev.tsv", ["sentence1", "sentence2", "score"], pairs)
    for split, n in (("train", 10), ("dev", 4)):
        _write(data / f"sst2/{split}.tsv", ["text", "sentiment"], _labelled(SENTIMENT, n, rng))
        _write(data / f"brown_genre/{split}.tsv", ["text", "genre"], _labelled(WORDS, n, rng))
    out = tmp_path / "study.json"
    argv = ["--data-dir", str(data), "--backbone", "tiny", "--max-length", "32"]
    result = study.main(
        [*argv, "--out", str(out), "--poolings", "mean,max", "--layers=-1,1", "--c-grid", "0.1,1"]
    )
    assert json.loads(out.read_text()) == result
    assert [(r["layer"], r["pooling"]) for r in result["rows"]] == [
        (1, "mean"), (1, "max"), (3, "mean"), (3, "max")
    ]  # fmt: skip
    assert result["sentences"] == {
        "sts_left": 8, "sts_right": 8, "sst2_train": 20, "sst2_dev": 8,
        "brown_train": 50, "brown_dev": 20,
    }  # fmt: skip
    by_key = {(r["layer"], r["pooling"]): r for r in result["rows"]}
    mean1 = by_key[(1, "mean")]
    # identical pairs (cosine 1) ranked above every unrelated one: a perfect two-level
    # ranking, >= 87.29 (the point-biserial of ranks 1..8 split in half), and the number
    # the layer-1 mean encoder gives on its own
    own = SentenceEncoder.load("tiny", layer=1, pooling="mean", max_length=32)
    left, right = (own.embed([p[k] for p in pairs]).embeddings for k in (0, 1))
    cos = (study._l2(left) * study._l2(right)).sum(axis=1)
    expected = 100 * study.spearman(cos, [float(p[2]) for p in pairs])
    assert expected >= 87.29
    assert mean1["stsb_spearman"] == pytest.approx(expected, abs=0.006)
    assert mean1["sst2_accuracy"] == 100.0 and mean1["brown_macro_f1"] >= 90.0  # chance: 20
    assert result["c_grid"] == [0.1, 1.0] and {r["sst2_C"] for r in result["rows"]} <= {0.1, 1.0}
    assert "sst2_l2_accuracy" in mean1 and "sst2_l2_accuracy" not in by_key[(1, "max")]
    table = capsys.readouterr().out
    assert f"| 1 (-3) | mean | {mean1['stsb_spearman']:.2f} | 100.00 |" in table
    assert table.count("\n| ") == 5  # the header and four rows
