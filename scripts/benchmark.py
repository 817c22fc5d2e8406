"""Throughput of mtl_jax against the PyTorch stack, on the same machine and the same work.

Suites (each prints one JSON line per result):

  train       fixed shapes, random ids, batch 32, --seq-len 64 128   (pt_multitask.py)
  train-real  the real mixed SST-2 + Brown stream, batch 32, max_length 128, the library's
              own length buckets and length grouping                  (pt_realdata.py)
  encode      ../shared/bench/corpus.txt, 2,000 sentences, batch 64   (st_encode.py)
  cache       frozen deterministic backbone: heads trained from cached embeddings vs the
              full step, per epoch, and how far their results differ

With --compare-pytorch PYTHON the matching baseline script in ../shared/bench runs with that
interpreter in the same invocation, alternating with ours (--rounds times), and a ratio
line follows per baseline (ours / theirs of the medians: > 1 = we are faster; for
peak_rss_mb < 1 = we use less memory). The encode suite does sentence-transformers' work
(every layer, mean pooling, normalised) and takes --encode-baselines: st (torch float32, the
default), st-bf16 (the same model cast to bfloat16), onnx-fp32 / onnx-qint8 (its ONNX
Runtime backend; see ../shared/bench/README.md for the extra packages). Benchmarks report;
they assert nothing.

  python scripts/benchmark.py --suite train --freeze none --steps 6
  python scripts/benchmark.py --suite train-real --compare-pytorch /tmp/ptvenv/bin/python
  python scripts/benchmark.py --suite cache --cache-rows 1024 --cache-epochs 3
  python scripts/benchmark.py --suite encode --dtype bfloat16 --rounds 2 \
      --compare-pytorch /tmp/ptvenv/bin/python --encode-baselines st st-bf16 onnx-qint8
  python scripts/benchmark.py --suite train --seq-len 128 --profile 5:8   # runs/profile/train
  python scripts/benchmark.py --suite train-real --set tasks.genre.own_layers=1

--profile START:END traces those calls of the suite's step (counted from 0: the compile
steps first, then each round's warm-up and timed steps) with jax.profiler into
<--profile-dir>/<suite>/plugins/profile/<run>/: an .xplane.pb for TensorBoard's profile
plugin (tensorboard --logdir runs/profile) and a .trace.json.gz for ui.perfetto.dev.
The last traced step waits for its result, so a profiled run is for the trace, not the
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import bench  # scripts/bench, beside this script
import jax

from mtl_jax.encoder import load_backbone
from mtl_jax.errors import UserError
from mtl_jax.host_memory import lean_malloc, trim_after_compiles
from mtl_jax.profiling import parse_profile_range


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--suite", nargs="+", default=["train"], choices=["train", "train-real", "encode", "cache"]
    )
    p.add_argument("--freeze", default="none", choices=["none", "backbone"])
    p.add_argument("--backbone-eval", action="store_true", help="no dropout inside BERT")
    p.add_argument(
        "--cached",
        action="store_true",
        help="train-real with --freeze backbone --backbone-eval: train the heads from "
        "embeddings cached once, as mtl-jax train does (peak RSS includes the cache build)",
    )
    p.add_argument(
        "--step-over-forward",
        action="store_true",
        help="train-real, frozen: also time a forward pass over the same batches (its "
        "compiled programs add to the peak RSS, so it is off where memory is measured)",
    )
    p.add_argument(
        "--step-memory",
        action="store_true",
        help="train-real: XLA's memory account of the step at the longest bucket (one more "
        "compile in this process, so it is off where peak RSS is compared)",
    )
    p.add_argument("--model", default="minilm", help="minilm | tiny | a BERT directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--remat", action="store_true", help="model.remat: checkpointed layers")
    p.add_argument(
        "--remat-min-length", type=int, default=64, help="model.remat_min_length (1: every batch)"
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, nargs="+", default=[64, 128], help="train suite")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--buckets", type=int, nargs="+", help="padded lengths (default: the library's)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per result")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    p.add_argument("--repeats", type=int, default=3, help="encode: timed passes")
    p.add_argument("--data-dir", default=None, help="default: $DATA_DIR or ../shared/data")
    p.add_argument("--cache-rows", type=int, default=1024)
    p.add_argument("--cache-epochs", type=int, default=3)
    p.add_argument("--no-sync", action="store_true", help="dispatch steps without waiting each")
    p.add_argument("--rounds", type=int, default=1, help="A/B rounds with --compare-pytorch")
    p.add_argument("--compare-pytorch", metavar="PYTHON", help="interpreter with torch installed")
    p.add_argument(
        "--encode-baselines",
        nargs="+",
        default=["st"],
        choices=list(ENCODE_BASELINES),
        help="encode suite: the baselines to run each round (st = sentence-transformers float32)",
    )
    p.add_argument("--xla-flags", default="", help="appended to $XLA_FLAGS before JAX starts")
    p.add_argument(
        "--malloc",
        default="lean",
        choices=["lean", "default"],
        help="lean: glibc malloc as the mtl-jax command sets it (mtl_jax.host_memory)",
    )
    p.add_argument("--prng", default=None, help="jax_default_prng_impl (threefry2x32, rbg, ...)")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n^3 matmul peak")
    p.add_argument(
        "--peak-dtype", default="float32", choices=["float32", "bfloat16"], help="the MFU's peak"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config setting, as mtl-jax train --set takes it (tasks.genre.own_layers=1)",
    )
    p.add_argument(
        "--profile",
        metavar="START:END",
        help="trace steps START..END (calls of the suite's step, from 0, compile steps first)",
    )
    p.add_argument("--profile-dir", default="runs/profile", help="--profile's TensorBoard logdir")
    return p.parse_args(argv)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


ENCODE_BASELINES = {  # label: (script, its own arguments)
    "st": ("st_encode.py", []),  # sentence-transformers, torch float32 (the default user)
    "st-bf16": (
        str(Path(__file__).parent / "bench" / "st_encode_dtype.py"),
        ["--dtype", "bfloat16"],
    ),
    "onnx-fp32": ("st_onnx_encode.py", ["--variant", "fp32"]),
    "onnx-qint8": ("st_onnx_encode.py", ["--variant", "qint8"]),
}


def baseline_args(
    suite: str, args: argparse.Namespace, data_dir: str
) -> list[tuple[str, str, list[str]]]:
    """``(label, script, arguments)`` of each baseline measuring the same work as ``suite``."""
    train = ["--freeze", args.freeze, "--batch", str(args.batch), "--steps", str(args.steps)]
    train += ["--warmup", str(args.warmup)] + (["--backbone-eval"] if args.backbone_eval else [])
    if suite == "train":
        return [("pytorch", "pt_multitask.py", train + ["--seq-len", *map(str, args.seq_len)])]
    if suite == "train-real":
        real = ["--data-dir", data_dir, "--max-length", str(args.max_length)]
        return [("pytorch", "pt_realdata.py", train + real)]
    if suite == "cache":  # what a frozen eval-mode PyTorch epoch costs
        frozen = ["--freeze", "backbone", "--backbone-eval", "--batch", str(args.batch)]
        return [
            (
                "pytorch",
                "pt_realdata.py",
                frozen + ["--steps", str(args.steps), "--data-dir", data_dir],
            )
        ]
    encode = ["--batch", "64", "--repeats", str(args.repeats)]
    return [
        (label, ENCODE_BASELINES[label][0], [*ENCODE_BASELINES[label][1], *encode])
        for label in args.encode_baselines
    ]


def baseline_summary(suite: str, raw: dict) -> list[dict]:
    """The baseline's numbers in our result keys (one per sequence length for ``train``)."""
    if suite == "train":
        return [
            {
                "seq_len": r["seq_len"],
                "examples_per_s": r["examples_per_s"]["median"],
                "real_tokens_per_s": r["tokens_per_s_median"],
                "step_s": r["step_time_s"],
            }
            for r in raw["results"]
        ]
    if suite == "encode":
        return [
            {
                "sentences_per_s": raw["sentences_per_s"]["median"],
                "real_tokens_per_s": raw["real_tokens_per_s_median"],
                "step_s": raw["encode_time_s"],
                "min_cosine_vs_float32": (raw.get("vs_torch_fp32") or {}).get("min_cosine"),
            }
        ]
    return [
        {
            "examples_per_s": raw["examples_per_s"],
            "real_tokens_per_s": raw["real_tokens_per_s"],
            "padding_share": raw["padding_fraction"],
            "step_s": raw["step_time_s"],
        }
    ]


RATIO_KEYS = ("examples_per_s", "sentences_per_s", "real_tokens_per_s")


def make_options(args: argparse.Namespace, data_dir: str, profile: tuple[int, int] | None):
    """The harness's :class:`bench.Options` from the command line."""
    return bench.Options(
        backbone=args.model,
        freeze=args.freeze,
        backbone_eval=args.backbone_eval,
        dtype=args.dtype,
        remat=args.remat,
        remat_min_length=args.remat_min_length,
        batch_size=args.batch,
        seq_lens=tuple(args.seq_len),
        max_length=args.max_length,
        buckets=tuple(args.buckets) if args.buckets else None,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        data_dir=data_dir,
        cache_rows=args.cache_rows,
        cache_epochs=args.cache_epochs,
        sync=not args.no_sync,
        step_over_forward=args.step_over_forward,
        step_memory=args.step_memory,
        cached=args.cached,
        seed=args.seed,
        profile=profile,
        profile_dir=args.profile_dir,
        overrides=tuple(args.overrides),
    )


def run_rounds(suite, args: argparse.Namespace, data_dir: str) -> tuple[list, dict]:
    """``args.rounds`` A/B rounds of one suite: ours, then (if asked) each baseline script."""
    ours_rounds: list = []
    theirs_rounds: dict[str, list] = {}
    for rnd in range(args.rounds):
        # The limit now, measured apart from this process's peak RSS.
        suite.peak = bench.matmul_gflops_apart(args.peak_size, dtype=args.peak_dtype)
        results = suite.measure()
        for r in results:
            emit(
                {
                    **r,
                    "framework": "mtl_jax",
                    "round": rnd,
                    "peak_dtype": args.peak_dtype,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "malloc": args.malloc,
                    "prng": str(jax.config.jax_default_prng_impl),
                }
            )
        ours_rounds.append(results)
        if not args.compare_pytorch:
            continue
        for label, script, extra in baseline_args(suite.name, args, data_dir):
            raw = bench.run_baseline(args.compare_pytorch, script, extra)
            peak = {"peak_rss_mb": raw.get("peak_rss_mb_self")}
            theirs = [{**r, **peak} for r in baseline_summary(suite.name, raw)]
            for r in theirs:
                emit(
                    {
                        "suite": suite.name,
                        "framework": "pytorch",
                        "baseline": label,
                        "script": Path(script).name,
                        "round": rnd,
                        "freeze": raw.get("freeze"),
                        **r,
                    }
                )
            theirs_rounds.setdefault(label, []).append(theirs)
    return ours_rounds, theirs_rounds


def emit_ratios(suite_name: str, args, ours_rounds: list, theirs_by_label: dict) -> None:
    """One line per result and baseline: ours / theirs of the medians over rounds."""
    median = statistics.median
    for label, theirs_rounds in theirs_by_label.items():
        for i in range(len(theirs_rounds[0])):
            line = {
                "suite": suite_name,
                "ratio": f"mtl_jax / {label}, median over rounds",
                "freeze": args.freeze if suite_name != "encode" else None,
            }
            if "seq_len" in theirs_rounds[0][i]:
                line["seq_len"] = theirs_rounds[0][i]["seq_len"]
            for key in (*RATIO_KEYS, "peak_rss_mb"):
                ours = [r[i].get(key) for r in ours_rounds if i < len(r)]
                theirs = [r[i].get(key) for r in theirs_rounds]
                if all(ours) and all(theirs):
                    line[key] = bench.ratio(median(ours), median(theirs))
            if suite_name == "train-real":
                est = [r[0]["epoch_estimate"]["examples_per_s"] for r in ours_rounds]
                theirs = [r[0]["examples_per_s"] for r in theirs_rounds]
                line["epoch_estimate_examples_per_s"] = bench.ratio(median(est), median(theirs))
            emit(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        profile = parse_profile_range(args.profile) if args.profile else None
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    if args.malloc == "lean":  # before JAX's backend starts its threads
        lean_malloc()
        trim_after_compiles()
    if args.xla_flags:  # read when JAX's backend starts, i.e. at the first computation
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    if args.prng:
        jax.config.update("jax_default_prng_impl", args.prng)
    data_dir = args.data_dir or os.environ.get("DATA_DIR") or "../shared/data"
    opts = make_options(args, data_dir, profile)
    log = bench.CompileLog()
    for suite_name in args.suite:
        # Loaded per suite and held by it alone, so a train suite can drop the host weights
        # once its state holds them, as `mtl-jax train` does after setup (-90 MB for MiniLM).
        try:
            suite = bench.SUITES[suite_name](opts, load_backbone(args.model), log, 0.0)
        except UserError as err:
            sys.stderr.write(f"error: {err}\n")
            return 2
        try:
            ours_rounds, theirs_rounds = run_rounds(suite, args, data_dir)
        finally:
            suite.close()  # one trace at a time: stop this suite's before the next starts
        if suite.profiler is not None:
            sys.stderr.write(f"profile of {suite_name}: {suite.profiler.logdir}\n")
        if args.compare_pytorch:
            emit_ratios(suite_name, args, ours_rounds, theirs_rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
