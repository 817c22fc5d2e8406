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
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from mtl_jax.errors import UserError

if TYPE_CHECKING:
    from mtl_jax.config import Config

# mtl_jax.checkpoint.WHICH, spelled out so parsing argv imports no JAX (a test keeps them equal)
WHICH = ("latest", "best", "average")
WHICH_HELP = (
    "which params: the newest checkpoint, the best dev evaluation, or the mean of every "
    "checkpoint kept in checkpoints/ (default: latest)"
)
SKIP_EMPTY_HELP = "drop rows with empty text (counted on stderr) instead of stopping"
DTYPES = ("float32", "bfloat16")
DTYPE_HELP = (
    "compute dtype (default: the run's, else float32); bfloat16 on CPU runs the dense layers' "
    "matmuls as bf16 x bf16 -> f32 (float32 activations, cosine >= 0.999): about 1.6x faster "
    "on CPUs with AVX-512 BF16"
)


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
    train.add_argument(
        "--allow-changes",
        action="store_true",
        help="resume although data files or settings changed (recorded in run_record.json)",
    )
    train.add_argument(
        "--profile",
        metavar="START:END",
        help="write a JAX profiler trace of steps START..END to <workdir>/profile",
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="accuracy / macro-F1 of a checkpoint on labelled files")
    ev.add_argument("--checkpoint", required=True, help="a run directory")
    ev.add_argument("--data", action="append", required=True, metavar="TASK=FILE")
    ev.add_argument("--which", choices=WHICH, default="latest", help=WHICH_HELP)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--skip-empty", action="store_true", help=SKIP_EMPTY_HELP)
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="labels and probabilities per sentence (JSON lines)")
    pr.add_argument("--checkpoint", required=True, help="a run directory")
    pr.add_argument("--input", required=True, help="a .txt/.tsv/.csv/.jsonl file, or - (stdin)")
    pr.add_argument("--text-column", default="text")
    pr.add_argument("--which", choices=WHICH, default="latest", help=WHICH_HELP)
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--skip-empty", action="store_true", help=SKIP_EMPTY_HELP)
    pr.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    pr.set_defaults(func=cmd_predict)

    em = sub.add_parser("embed", help="sentence embeddings to a .npy file")
    em.add_argument("--input", required=True, help="a .txt/.tsv/.csv/.jsonl file, or - (stdin)")
    em.add_argument("--output", required=True, help="the .npy file to write")
    em.add_argument(
        "--model", default="minilm", help="minilm | tiny | a BERT directory | org/name (HF cache)"
    )
    em.add_argument("--checkpoint", help="embed with a fine-tuned run's backbone instead")
    em.add_argument("--which", choices=WHICH, default="latest", help=WHICH_HELP)
    em.add_argument("--layer", type=int, default=None, help="hidden-state index (default -2)")
    em.add_argument("--pooling", choices=("mean", "cls", "max"), default=None)
    em.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise each embedding (default: as the run or exported model does)",
    )
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--max-length", type=int, default=None, help="tokens (default 128)")
    em.add_argument("--text-column", default="text")
    em.add_argument("--skip-empty", action="store_true", help=SKIP_EMPTY_HELP)
    em.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    em.set_defaults(func=cmd_embed)

    ex = sub.add_parser("export", help="a Hugging Face / sentence-transformers model directory")
    ex.add_argument("--checkpoint", required=True, help="a run directory")
    ex.add_argument("--output", required=True, help="the directory to write")
    ex.add_argument("--which", default="latest", help=WHICH_HELP)
    ex.add_argument("--force", action="store_true", help="replace a non-empty --output")
    ex.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mtl_jax.host_memory import lean_malloc, trim_after_compiles

    lean_malloc()  # before JAX starts its threads: a lower peak RSS
    trim_after_compiles()
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
    from mtl_jax.config_io import apply_overrides, load_config
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
    from mtl_jax import parallel
    from mtl_jax.loop import fit
    from mtl_jax.metrics_log import read_metrics
    from mtl_jax.profiling import parse_profile_range
    from mtl_jax.run_record import record_run
    from mtl_jax.run_setup import check_workdir
    from mtl_jax.workdir_lock import check_held, hold_workdir

    profile = parse_profile_range(args.profile) if args.profile else None
    parallel.maybe_initialize_distributed(config.parallel.distributed)  # a no-op in fit then
    main = parallel.is_main_process()  # process 0's lock and record stand for the whole job
    try:
        with (
            quiet_background_errors(args.debug),
            hold_workdir(args.workdir, enabled=main) as holder,
        ):
            check_workdir(Path(args.workdir))  # before the record: a full disk writes nothing
            changes = record_run(config, args.workdir, args.allow_changes) if main else []
            if changes:
                print(f"warning: resuming with changes ({'; '.join(changes)})", file=sys.stderr)
            result = fit(
                config,
                args.workdir,
                progress=not args.no_progress,
                profile=profile,
                on_step=lambda _: check_held(args.workdir, holder),  # an os.stat per step
            )
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


@contextlib.contextmanager
def quiet_background_errors(debug: bool):
    """Keep background threads' tracebacks off the terminal while training runs.

    A failed write (a full disk) also fails in Orbax's and tensorboardX's writer threads,
    which print their own tracebacks (``threading.excepthook``, asyncio's and absl's
    loggers, and ``sys.excepthook`` from native callbacks, even while the process exits)
    around the run's one-line error. That error names the failure, so the threads' copies
    are dropped. After a clean error all stays quiet until the process ends (asyncio logs
    its writer tasks' failures when they are garbage-collected, on the way out); after a
    normal end or a bug everything is restored. ``--debug`` leaves everything on.
    """
    if debug:
        yield
        return
    hooks = threading.excepthook, sys.unraisablehook
    loggers = {name: logging.getLogger(name) for name in ("absl", "asyncio", "tensorboardX")}
    levels = {name: logger.level for name, logger in loggers.items()}
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda unraisable: None
    for logger in loggers.values():
        logger.setLevel(logging.CRITICAL + 1)
    clean_error = False
    try:
        yield
    except (UserError, OSError):
        clean_error = True
        raise
    finally:
        if clean_error:  # the process is ending: its threads' noise on the way out, too
            sys.excepthook = lambda *exc: None
        else:
            threading.excepthook, sys.unraisablehook = hooks
            for name, logger in loggers.items():
                logger.setLevel(levels[name])


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
    batch_size = _positive(args.batch_size, "--batch-size")
    scores = evaluate_files(trained, files, batch_size, skip_empty=args.skip_empty)
    print(json.dumps(scores))
    return 0


def _read_texts(path: str, text_column: str, skip_empty: bool = False) -> list[str]:
    from mtl_jax.data import read_rows

    if path == "-":
        texts = [line.rstrip("\r\n") for line in sys.stdin]
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise UserError("stdin: no sentences (one per line)")
        return texts
    return [row.text for row in read_rows(path, text_column, skip_empty=skip_empty)]


def _read_passages(
    path: str, text_column: str, config: Config, skip_empty: bool
) -> tuple[list[str], dict[str, list[str]]]:
    """The sentences, and the source column of each task that reads its neighbours
    (``tasks.<name>.context``). A ``.txt`` file or stdin is one passage (said on stderr);
    a table must have the column, so that no window joins sentences of different texts."""
    from mtl_jax.data import read_rows
    from mtl_jax.data.context import source_columns, source_values
    from mtl_jax.data.readers import MissingColumnError

    readers = source_columns(config.tasks)
    if not readers:
        return _read_texts(path, text_column, skip_empty), {}
    if path == "-" or Path(path).suffix.lower() == ".txt":
        texts = _read_texts(path, text_column, skip_empty)
        tasks = ", ".join(sorted(readers.values()))
        print(
            f"note: {tasks} read each line with its neighbours: the input is one passage",
            file=sys.stderr,
        )
        return texts, {column: [""] * len(texts) for column in readers}
    try:
        rows = read_rows(path, text_column, sorted(readers), skip_empty=skip_empty)
    except MissingColumnError as error:
        if error.column not in readers:
            raise
        raise UserError(
            f"{path}: no '{error.column}' column: the checkpoint's task "
            f"'{readers[error.column]}' reads each sentence with its neighbours from the same "
            f"'{error.column}' text; add that column, or give a .txt file (one passage)"
        ) from None
    lines = [row.line for row in rows]
    fix = "or give a .txt file (read as one passage)"
    sources = {c: source_values(path, lines, [r.labels[c] for r in rows], c, fix) for c in readers}
    return [row.text for row in rows], sources


def cmd_predict(args: argparse.Namespace) -> int:
    from mtl_jax.inference import load_trained, predict_texts

    trained = load_trained(args.checkpoint, args.which).with_dtype(args.dtype)
    texts, sources = _read_passages(args.input, args.text_column, trained.config, args.skip_empty)
    batch_size = _positive(args.batch_size, "--batch-size")
    stats: dict[str, int] = {}
    for record in predict_texts(trained, texts, batch_size, stats, sources):
        print(json.dumps(record))
    print(json.dumps({"sentences": len(texts), **stats}), file=sys.stderr)  # like embed
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from mtl_jax.inference import SentenceEncoder, load_trained

    output = Path(args.output)
    if output.suffix != ".npy":
        raise UserError(f"--output {output}: expected a .npy file name")
    texts = _read_texts(args.input, args.text_column, args.skip_empty)
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
        trained = load_trained(args.checkpoint, args.which).with_dtype(args.dtype)
        normalize = trained.config.model.normalize if args.normalize is None else args.normalize
        encoder = trained.encoder(normalize=normalize, max_length=args.max_length)
    else:
        from mtl_jax.encoder import embedding_defaults

        defaults = embedding_defaults(args.model)  # an exported directory's own settings
        encoder = SentenceEncoder.load(
            args.model,
            layer=defaults.layer if args.layer is None else args.layer,
            pooling=args.pooling or defaults.pooling,
            normalize=defaults.normalize if args.normalize is None else args.normalize,
            max_length=args.max_length or defaults.max_length,
            dtype=args.dtype or "float32",
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


# -- export --------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from mtl_jax.export import export_run

    exported = export_run(args.checkpoint, args.output, args.which, args.force)
    summary = {
        "output": str(exported.output),
        "step": exported.step,
        "which": exported.which,
        "layers": exported.num_layers,
        "files": len(exported.files),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
