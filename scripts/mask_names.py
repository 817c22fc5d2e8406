"""A training file with its character and place names masked (a model-quality study input).

Genre's dev books share no characters with its training books, so a name the model ties
to a training book's genre is a cue that cannot carry over. This writes a copy of a
labelled file with every name replaced by ``[MASK]`` (which the BERT tokenizer reads as
its mask token), for ``tasks.genre.train_file`` (docs/model_quality.md, round 8):

    .venv/bin/python scripts/mask_names.py ../shared/data/brown_genre/train.tsv \\
        runs/data/brown_genre_names_masked/train.tsv

A *name* is a word that occurs capitalised after a row's first word and is capitalised
in at least 90 % of those occurrences in the file; every occurrence is
masked, sentence-initial ones too. "I" and titles (Mr, Mrs, Miss, ...) stay. Only the
file itself decides (no dev data). Writes TSV: the text and the label column.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from mtl_jax.data.readers import read_rows
from mtl_jax.errors import UserError

WORD = re.compile(r"[^\W\d_]+")  # letters: "Angie's" is "Angie" and "s"; the 's stays
NOT_NAMES = frozenset({"i", "mr", "mrs", "miss", "ms", "dr", "sir", "god"})
MASK = "[MASK]"
SHARE = 0.9  # of a word's mid-sentence occurrences that must be capitalised


def find_names(texts: Iterable[str]) -> set[str]:
    """Lower-cased words capitalised in >= 90 % of their mid-sentence occurrences."""
    capitalised, seen = collections.Counter(), collections.Counter()
    for text in texts:
        for word in WORD.findall(text)[1:]:
            seen[word.lower()] += 1
            capitalised[word.lower()] += word[0].isupper()
    return {w for w, n in seen.items() if w not in NOT_NAMES and capitalised[w] >= SHARE * n}


def mask_names(text: str, names: set[str]) -> str:
    return WORD.sub(lambda m: MASK if m.group(0).lower() in names else m.group(0), text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a labelled .tsv/.csv/.jsonl file")
    parser.add_argument("out", help="the .tsv to write")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="genre")
    parser.add_argument(
        "--keep-column",
        action="append",
        default=[],
        help="also copy this column (e.g. source_id, which a task's context reads by)",
    )
    args = parser.parse_args(argv)
    columns = list(dict.fromkeys([args.label_column, *args.keep_column]))
    try:
        rows = read_rows(args.source, args.text_column, columns)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    names = find_names(row.text for row in rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    changed = 0
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow([args.text_column, *columns])
        for row in rows:
            text = mask_names(row.text, names)
            changed += text != row.text
            writer.writerow([text, *(row.labels[c] or "" for c in columns)])
    print(f"{out}: {len(names)} names masked in {changed} of {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
