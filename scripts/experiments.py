"""The README's real-data results: each row is one documented `mtl-jax train` command.

Runs the rows (or those named with --only) on the real data (../shared/data or
$MTL_JAX_DATA), then prints a markdown table of the best dev scores of each run, read back
from its run directory. A row whose run directory is complete is not trained again.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mtl_jax.fit import read_metrics

SET = "--set"
ROWS = {
    "frozen-multi": [
        "--preset",
        "real",
        SET,
        'train.freeze="backbone"',
        SET,
        "model.backbone_dropout=false",
        SET,
        "train.epochs=10",
        SET,
        "train.head_learning_rate=1e-3",
    ],
    "full-multi": ["--preset", "real"],
    "gradual-multi": [
        "--preset",
        "real",
        SET,
        'train.freeze="gradual"',
        SET,
        'train.unfreeze_unit="steps"',
        SET,
        "train.unfreeze_every=150",
    ],
    "top2-multi": ["--preset", "real", SET, 'train.freeze="top:2"'],
    "full-genre-only": ["--preset", "real", "--tasks", "genre"],
    "full-sentiment-only": ["--preset", "real", "--tasks", "sentiment"],
}


def best_dev(workdir: Path) -> dict:
    """The dev event with the best mean macro-F1 over tasks, and the run's last step."""
    events = [e for e in read_metrics(workdir) if e["split"] == "dev"]
    if not events:
        return {}

    def score(e):
        f1 = [v for k, v in e.items() if k.endswith("/macro_f1")]
        return sum(f1) / len(f1)

    return max(events, key=score)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="runs/experiments", help="one run directory per row")
    parser.add_argument("--only", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--extra", action="append", default=[], help="--set K=V for every row")
    parser.add_argument("--mtl-jax", default="mtl-jax", help="the mtl-jax command")
    args = parser.parse_args()

    root = Path(args.root)
    results = {}
    for name in args.only:
        extra = [x for item in args.extra for x in (SET, item)]
        command = [
            *shlex.split(args.mtl_jax),
            "train",
            *ROWS[name],
            *extra,
            "--workdir",
            str(root / name),
            "--no-progress",
        ]
        print("$ " + shlex.join(command), file=sys.stderr, flush=True)
        start = time.perf_counter()
        status = subprocess.call(command)
        results[name] = {
            "status": status,
            "seconds": round(time.perf_counter() - start, 1),
            **best_dev(root / name),
        }
        print(json.dumps({"row": name, **results[name]}), flush=True)

    print("\n| run | sentiment acc | sentiment F1 | genre acc | genre macro-F1 | step | s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():

        def cell(key, r=r):
            return f"{100 * r[key]:.1f}" if key in r else "-"

        print(
            f"| {name} | {cell('sentiment/accuracy')} | {cell('sentiment/macro_f1')} | "
            f"{cell('genre/accuracy')} | {cell('genre/macro_f1')} | {r.get('step', '-')} | "
            f"{r['seconds']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
