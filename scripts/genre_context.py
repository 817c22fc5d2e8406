"""A labelled file whose every row reads its neighbours too (a model-quality study input).

One Brown sentence carries little genre signal ("He nodded."), while the passage around it
does. This writes a copy of a labelled file in which each row's text is the row joined
with up to ``--window`` rows before and after it *from the same source text* (the
``source_id`` column, rows in file order), its label unchanged, so each row is still
scored once. Written for both genre files, train and dev (docs/model_quality.md, round 11):

    for split in train dev; do .venv/bin/python scripts/genre_context.py \\
        ../shared/data/brown_genre/$split.tsv runs/data/brown_genre_context1/$split.tsv; done

Only the row's own source text is read, never a label: the dev file's windows use the
dev book's neighbouring sentences, which any reader of that book has. Writes TSV: the
text, the label column and the source column.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from mtl_jax.data.readers import read_rows
from mtl_jax.errors import UserError


def windows(texts: Sequence[str], sources: Sequence[str], window: int) -> list[str]:
    """Each text joined with up to ``window`` neighbours on each side that share its source.

    A source's rows need not be contiguous in the file: neighbours are the source's rows
    before and after this one, in file order.
    """
    by_source: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        by_source.setdefault(source, []).append(i)
    joined = [""] * len(texts)
    for members in by_source.values():
        for k, i in enumerate(members):
            around = members[max(0, k - window) : k + window + 1]
            joined[i] = " ".join(texts[j] for j in around)
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a labelled .tsv/.csv/.jsonl file")
    parser.add_argument("out", help="the .tsv to write")
    parser.add_argument("--window", type=int, default=1, help="neighbours on each side")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="genre")
    parser.add_argument("--source-column", default="source_id")
    args = parser.parse_args(argv)
    if args.window < 0:
        print(f"error: --window {args.window}: expected an integer >= 0", file=sys.stderr)
        return 2
    columns = [args.label_column, args.source_column]
    try:
        rows = read_rows(args.source, args.text_column, columns)
        missing = next((r for r in rows if r.labels[args.source_column] is None), None)
        if missing is not None:
            raise UserError(
                f"{args.source}:{missing.line}: no {args.source_column!r}: every row needs "
                "its source text (pass --source-column for another column)"
            )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sources = [r.labels[args.source_column] for r in rows]
    texts = windows([r.text for r in rows], sources, args.window)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow([args.text_column, args.label_column, args.source_column])
        for row, text, source in zip(rows, texts, sources, strict=True):
            writer.writerow([text, row.labels[args.label_column] or "", source])
    print(f"{out}: {len(rows)} rows, each with up to {args.window} neighbours on each side")
    return 0


if __name__ == "__main__":
    sys.exit(main())
