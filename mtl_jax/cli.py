"""``mtl-jax``: argv -> config -> one library call per subcommand.

Bad input ends with exit status 2 and one line ``error: ...`` on stderr naming the file,
line or key at fault; ``--debug`` shows the traceback instead.

Exit status: 0 done; 2 bad input, or a run that cannot go on (non-finite loss, disk full;
its last checkpoint is intact); ``128 + signal`` (130 SIGINT, 143 SIGTERM) when a signal
stopped ``train`` after it saved a checkpoint at the current step (rerun to resume), or
when a second signal interrupted it at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from mtl_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtl-jax", description="Multi-task sentence models on a BERT backbone, in JAX."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a multi-task model")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--config", help="a .toml or .json config file")
    source.add_argument("--preset", default=None, help="a built-in config: demo | real")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    train.add_argument(
        "--tasks", help="train only these tasks of the config (comma-separated names)"
    )
    train.add_argument("--workdir", help="run directory (resumes if it holds a checkpoint)")
    train.add_argument("--print-config", action="store_true", help="print the config and exit")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="accuracy / macro-F1 of a checkpoint on labelled files")
    ev.add_argument("--checkpoint", required=True, help="a run directory")
    ev.add_argument("--data", action="append", required=True, metavar="TASK=FILE")
    ev.add_argument("--which", choices=("latest", "best"), default="latest")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="labels and probabilities per sentence (JSON lines)")
    pr.add_argument("--checkpoint", required=True, help="a run directory")
    pr.add_argument("--input", required=True, help="a .txt/.tsv/.csv/.jsonl file, or - (stdin)")
    pr.add_argument("--text-column", default="text")
    pr.add_argument("--which", choices=("latest", "best"), default="latest")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.set_defaults(func=cmd_predict)

    em = sub.add_parser("embed", help="sentence embeddings to a .npy file")
    em.add_argument("--input", required=True, help="a .txt/.tsv/.csv/.jsonl file, or - (stdin)")
    em.add_argument("--output", required=True, help="the .npy file to write")
    em.add_argument("--model", default="minilm", help="minilm | tiny | a BERT directory")
    em.add_argument("--checkpoint", help="embed with a fine-tuned run's backbone instead")
    em.add_argument("--which", choices=("latest", "best"), default="latest")
    em.add_argument("--layer", type=int, default=None, help="hidden-state index (default -2)")
    em.add_argument("--pooling", choices=("mean", "cls", "max"), default=None)
    em.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--max-length", type=int, default=None, help="tokens (default 128)")
    em.add_argument("--text-column", default="text")
    em.set_defaults(func=cmd_embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# -- train ---------------------------------------------------------------------------------


def resolve_train_config(args: argparse.Namespace):
    from mtl_jax.config import apply_overrides, load_config
    from mtl_jax.presets import preset

    config = load_config(args.config) if args.config else preset(args.preset or "demo")
    config = apply_overrides(config, args.overrides)
    if getattr(args, "tasks", None):
        names = [n.strip() for n in args.tasks.split(",") if n.strip()]
        try:
            config = dataclasses.replace(config, tasks=tuple(config.task(n) for n in names))
        except UserError as exc:
            raise UserError(f"--tasks: {exc}") from None
    return config.validate()


def cmd_train(args: argparse.Namespace) -> int:
    config = resolve_train_config(args)
    if args.print_config:
        print(config.to_toml())
        return 0
    if not args.workdir:
        raise UserError("train: --workdir is required (the run directory)")
    from mtl_jax.loop import fit
    from mtl_jax.metrics_log import read_metrics

    try:
        result = fit(config, args.workdir, progress=not args.no_progress)
    except OSError as exc:  # e.g. a full disk while writing logs or run files
        raise UserError(
            f"{exc.filename or args.workdir}: {exc.strerror or exc} during training; the last "
            "complete checkpoint is intact: fix this and rerun the same command to resume"
        ) from exc
    summary = {"workdir": str(args.workdir), "steps": result.steps, "stopped": result.stopped}
    summary["skipped"] = sum(e.get("skipped", 0) for e in read_metrics(args.workdir))
    summary["eval"] = {
        task: {k: v for k, v in s.items() if k != "confusion"} for task, s in result.eval.items()
    }
    print(json.dumps(summary))
    if result.stopped == "signal":  # not done: a rerun resumes from the checkpoint just saved
        return 128 + result.signum
    return 0


# -- eval / predict / embed ----------------------------------------------------------------


def _positive(value: int, flag: str) -> int:
    if value <= 0:
        raise UserError(f"{flag}: expected a positive integer, got {value}")
    return value


def cmd_eval(args: argparse.Namespace) -> int:
    from mtl_jax.inference import evaluate_files, load_trained

    trained = load_trained(args.checkpoint, args.which)
    files = {}
    for item in args.data:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise UserError(f"--data {item!r}: expected TASK=FILE")
        if task not in trained.config.task_names:
            raise UserError(
                f"--data {item!r}: the checkpoint has no task '{task}' "
                f"(its tasks: {', '.join(trained.config.task_names)})"
            )
        files[task] = path
    scores = evaluate_files(trained, files, _positive(args.batch_size, "--batch-size"))
    print(json.dumps(scores))
    return 0


def _read_texts(path: str, text_column: str) -> list[str]:
    from mtl_jax.data import read_rows

    if path == "-":
        texts = [line.rstrip("\r\n") for line in sys.stdin]
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise UserError("stdin: no sentences (one per line)")
        return texts
    return [row.text for row in read_rows(path, text_column)]


def cmd_predict(args: argparse.Namespace) -> int:
    from mtl_jax.inference import load_trained, predict_texts

    trained = load_trained(args.checkpoint, args.which)
    texts = _read_texts(args.input, args.text_column)
    batch_size = _positive(args.batch_size, "--batch-size")
    stats: dict[str, int] = {}
    for record in predict_texts(trained, texts, batch_size, stats):
        print(json.dumps(record))
    print(json.dumps({"sentences": len(texts), **stats}), file=sys.stderr)  # like embed
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from mtl_jax.inference import SentenceEncoder, load_trained

    output = Path(args.output)
    if output.suffix != ".npy":
        raise UserError(f"--output {output}: expected a .npy file name")
    texts = _read_texts(args.input, args.text_column)
    if args.checkpoint:
        changed = [
            flag
            for flag, value in (("--layer", args.layer), ("--pooling", args.pooling))
            if value is not None
        ]
        if changed:
            raise UserError(
                f"{' and '.join(changed)}: a checkpoint embeds with the layer and pooling it "
                "was trained with; leave them out"
            )
        encoder = load_trained(args.checkpoint, args.which).encoder(
            normalize=args.normalize, max_length=args.max_length
        )
    else:
        encoder = SentenceEncoder.load(
            args.model,
            layer=-2 if args.layer is None else args.layer,
            pooling=args.pooling or "mean",
            normalize=args.normalize,
            max_length=args.max_length or 128,
        )
    result = encoder.embed(texts, batch_size=_positive(args.batch_size, "--batch-size"))
    tmp = output.with_name(output.name + ".tmp.npy")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, result.embeddings, allow_pickle=False)
        os.replace(tmp, output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"--output {output}: cannot write ({exc.strerror or exc})") from None
    summary = {
        "output": str(output),
        "sentences": len(texts),
        "dim": int(result.embeddings.shape[1]),
        "truncated": result.truncated,
    }
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
