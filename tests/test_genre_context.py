"""scripts/genre_context.py: each row joined with its own source's neighbours, labels kept."""

from __future__ import annotations

import pytest

from mtl_jax.data.readers import read_rows

from conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("genre_context")


def test_neighbours_come_from_the_rows_own_source_in_file_order(script):
    texts = ["a1", "a2", "b1", "a3", "b2", "a4"]
    sources = ["a", "a", "b", "a", "b", "a"]
    assert script.windows(texts, sources, 1) == [
        "a1 a2",
        "a1 a2 a3",
        "b1 b2",
        "a2 a3 a4",
        "b1 b2",
        "a3 a4",
    ]
    assert script.windows(texts, sources, 2)[3] == "a1 a2 a3 a4"
    assert script.windows(texts, sources, 0) == texts


def test_writes_the_file_the_trainer_reads(script, tmp_path, capsys):
    source = tmp_path / "dev.tsv"
    source.write_text(
        "text\tgenre\tsource_id\n"
        "He ran.\tadventure\tcn01\n"
        '"""Stop!"" she said."\tadventure\tcn01\n'
        "It was late.\tromance\tcp02\n"
    )
    out = tmp_path / "out" / "dev.tsv"
    assert script.main([str(source), str(out), "--window", "1"]) == 0
    rows = read_rows(out, "text", ["genre", "source_id"])
    assert [r.text for r in rows] == [
        'He ran. "Stop!" she said.',
        'He ran. "Stop!" she said.',
        "It was late.",
    ]
    assert [r.labels["genre"] for r in rows] == ["adventure", "adventure", "romance"]
    assert [r.labels["source_id"] for r in rows] == ["cn01", "cn01", "cp02"]
    assert "3 rows, each with up to 1 neighbours" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line_naming_it(script, tmp_path, capsys):
    out = str(tmp_path / "out.tsv")
    (tmp_path / "no_source.tsv").write_text("text\tgenre\nhello\thumor\n")
    assert script.main([str(tmp_path / "no_source.tsv"), out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_source.tsv" in err and "source_id" in err
    (tmp_path / "empty_source.tsv").write_text("text\tgenre\tsource_id\nhello\thumor\t\n")
    assert script.main([str(tmp_path / "empty_source.tsv"), out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty_source.tsv:2" in err and "--source-column" in err
    assert script.main([str(tmp_path / "empty_source.tsv"), out, "--window", "-1"]) == 2
    assert "--window" in capsys.readouterr().err
