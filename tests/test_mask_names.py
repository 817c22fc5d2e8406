"""scripts/mask_names.py: names masked everywhere, other words and the labels untouched."""

from __future__ import annotations

import pytest

from mtl_jax.data.readers import read_rows

from conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("mask_names")


def test_names_are_words_capitalised_mid_sentence(script):
    texts = [
        "Angie knew the Sheriff.",
        "Then Angie left, and Mr. Black saw her.",
        "The night was cold; the sheriff slept and I woke.",
    ]
    # "Sheriff" is capitalised in one of its two mid-sentence uses (< 90 %), "The" never
    # occurs mid-sentence, "Mr" and "I" are kept on purpose.
    assert script.find_names(texts) == {"angie", "black"}
    assert script.mask_names(texts[0], {"angie"}) == "[MASK] knew the Sheriff."
    assert script.mask_names("Angie's hat, I'm sure", {"angie"}) == "[MASK]'s hat, I'm sure"


def test_writes_the_masked_file_the_trainer_reads(script, tmp_path, capsys):
    source = tmp_path / "train.tsv"
    source.write_text(
        "text\tgenre\tsource_id\n"
        '"""Go, Angie"", he said."\tmystery\tcl01\n'
        "Angie smiled at Tom.\tromance\tcp02\n"
        "the end\thumor\tcr03\n"
    )
    out = tmp_path / "out" / "train.tsv"
    assert script.main([str(source), str(out)]) == 0
    rows = read_rows(out, "text", ["genre"])
    assert [r.text for r in rows] == [
        '"Go, [MASK]", he said.',
        "[MASK] smiled at [MASK].",
        "the end",
    ]
    assert [r.labels["genre"] for r in rows] == ["mystery", "romance", "humor"]
    assert "2 names masked in 2 of 3 rows" in capsys.readouterr().out
    # The source column kept, a task can read the masked rows with their neighbours.
    assert script.main([str(source), str(out), "--keep-column", "source_id"]) == 0
    rows = read_rows(out, "text", ["genre", "source_id"])
    assert [r.labels["source_id"] for r in rows] == ["cl01", "cp02", "cr03"]


def test_a_bad_source_exits_2_with_one_line(script, tmp_path, capsys):
    assert script.main([str(tmp_path / "missing.tsv"), str(tmp_path / "out.tsv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.tsv" in err
    (tmp_path / "bad.tsv").write_text("text\tgenre\nhello\n")
    assert script.main([str(tmp_path / "bad.tsv"), str(tmp_path / "out.tsv")]) == 2
    assert "bad.tsv" in capsys.readouterr().err
