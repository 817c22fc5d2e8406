"""Task 4: train the two-headed model on built-in synthetic data, then predict.

The README's main job (`make demo`): MiniLM backbone frozen by default (any strategy with
--freeze), per-epoch loss and accuracy per task, a checkpoint in --workdir, predictions.
Rerunning on the same --workdir resumes (or, when finished, only predicts).
"""

import argparse
import json
import sys

from mtl_jax.cli import main as cli_main
from mtl_jax.metrics_log import epoch_summaries

EXAMPLES = [
    "the detective studied the alibi and found it wonderful.",
    "a robot flew the rocket to a distant planet, what a dull story.",
    "she read his letter and her heart was moved, delightful.",
    "the clown slipped on a pie and everyone laughed, brilliant fun.",
    "they crossed the jungle river in a storm, terrible and painful.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument(
        "--freeze", default="backbone", help="none|all|backbone|head:T|top:K|gradual"
    )
    parser.add_argument("--model", default="minilm", help="minilm | tiny | a BERT directory")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    overrides = [
        f"train.freeze={json.dumps(args.freeze)}",
        f"model.backbone={json.dumps(args.model)}",
        f"train.epochs={args.epochs}",
        *args.overrides,
    ]
    train_argv = ["train", "--preset", "demo", "--workdir", args.workdir]
    for item in overrides:
        train_argv += ["--set", item]
    status = cli_main(train_argv)
    if status:
        return status

    print("\nper epoch (train = last logged window, dev = held-out synthetic rows):")
    for row in epoch_summaries(args.workdir):
        cells = [f"epoch {row['epoch']}", f"loss {row.get('loss', float('nan')):.4f}"]
        for task in ("genre", "sentiment"):
            cells.append(f"{task} acc {row.get(f'{task}/accuracy', float('nan')):.3f}")
            cells.append(f"dev {task} acc {row.get(f'dev {task}/accuracy', float('nan')):.3f}")
            cells.append(f"dev {task} F1 {row.get(f'dev {task}/macro_f1', float('nan')):.3f}")
        print("  " + " | ".join(cells))

    print(f"\ncheckpoint: {args.workdir}/checkpoints; predictions of the saved model:")
    examples = f"{args.workdir}/examples.txt"
    with open(examples, "w", encoding="utf-8") as f:
        f.write("\n".join(EXAMPLES) + "\n")
    return cli_main(["predict", "--checkpoint", args.workdir, "--input", examples])


if __name__ == "__main__":
    sys.exit(main())
