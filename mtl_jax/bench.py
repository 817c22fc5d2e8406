"""Benchmark helpers for ``scripts/benchmark.py``: workloads, FLOP counts, timing, baselines.

The workloads mirror the PyTorch scripts in ``../shared/bench`` (same model, heads, loss,
batch and optimiser: AdamW at 2e-5 for every trained parameter, decay 0.01, no clipping,
constant rate) so that a ratio of the two measures the stacks, not the settings. Nothing
here asserts anything about speed: benchmarks report, tests check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import data as data_lib
from mtl_jax.config import Config, DataConfig, ModelConfig, TrainConfig, default_tasks
from mtl_jax.presets import real

BASELINE_LR = 2e-5
BASELINE_WEIGHT_DECAY = 0.01
_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_s",
}


# -- workloads -----------------------------------------------------------------------------


def bench_config(
    *,
    backbone: str = "minilm",
    freeze: str = "none",
    backbone_eval: bool = False,
    dtype: str = "float32",
    max_length: int = 128,
    batch_size: int = 32,
    buckets: Sequence[int] | None = None,
    data_dir: str | None = None,
) -> Config:
    """The PyTorch baseline's settings as a :class:`Config`.

    ``data_dir`` set: the ``real`` preset's two tasks and files; else the default tasks
    with no files (fixed-shape and encode suites). ``backbone_eval`` turns BERT's dropout
    off (heads keep theirs), as ``backbone.eval()`` does in PyTorch.
    """
    base = real(data_dir) if data_dir else Config(tasks=default_tasks())
    model = ModelConfig(
        backbone=backbone,
        max_length=max_length,
        dtype=dtype,
        backbone_dropout=not backbone_eval,
    )
    train = TrainConfig(
        freeze=freeze,
        batch_size=batch_size,
        learning_rate=BASELINE_LR,
        head_learning_rate=BASELINE_LR,
        weight_decay=BASELINE_WEIGHT_DECAY,
        grad_clip=0.0,
        lr_schedule="constant",
        warmup_steps=0,
        epochs=1,
    )
    data = DataConfig() if buckets is None else DataConfig(length_buckets=tuple(buckets))
    return dataclasses.replace(base, model=model, train=train, data=data).validate()


def random_batch(config: Config, batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """``pt_multitask.make_batch`` in the library's format: ordinary-word ids, full mask,
    [CLS] ... [SEP], a label for every task on every row."""
    rng = np.random.default_rng(seed + seq)
    low = 1996 if vocab > 2 * 1996 else 5  # a tiny test vocabulary has no such range
    ids = rng.integers(low, vocab, size=(batch, seq)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    labels = {
        t.name: rng.integers(0, t.num_labels, size=batch).astype(np.int32) for t in config.tasks
    }
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
        "labels": labels,
        "index": np.arange(batch, dtype=np.int32),
    }


def bucket_batches(dataset: data_lib.Dataset, config: Config) -> list[dict]:
    """One real batch padded to each bucket length the data reaches (for compiling up front)."""
    out = []
    order = np.argsort(dataset.lengths, kind="stable")
    for length in data_lib.buckets_for(config):
        fits = order[dataset.lengths[order] <= length]
        if len(fits):
            rows = fits[-config.train.batch_size :]
            out.append(data_lib.make_batch(dataset, rows, config.train.batch_size, (length,)))
    return out


def step_memory_mb(model: Any, optimizer: Any, config: Config, state: Any, batch: dict) -> dict:
    """XLA's account of one train step's memory at ``batch``'s shape, in MiB.

    ``argument`` is what the step reads (params, optimiser state, batch), ``output`` what it
    returns (``alias``: the part that reuses donated input buffers), ``temp`` what it
    allocates while running (activations kept for the backward pass, gradients, the
    update). Peak RSS minus these is the runtime, the libraries and the host-side data.
    """
    from mtl_jax.train import build_train_step, step_inputs

    step = jax.jit(build_train_step(model, optimizer, config), donate_argnums=0)
    compiled = step.lower(state, step_inputs(batch), jax.random.key(0)).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:  # not every backend reports
        return {}
    names = ("argument", "output", "alias", "temp", "generated_code")
    return {n: round(getattr(analysis, f"{n}_size_in_bytes") / 2**20, 1) for n in names}


def subset(dataset: data_lib.Dataset, n: int, seed: int = 0) -> data_lib.Dataset:
    """``n`` random rows of a dataset (both sources mixed), in a new :class:`Dataset`."""
    rows = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    return dataclasses.replace(
        dataset,
        input_ids=[dataset.input_ids[i] for i in rows],
        token_type_ids=[dataset.token_type_ids[i] for i in rows],
        lengths=dataset.lengths[rows],
        labels=dataset.labels[rows],
        texts=tuple(dataset.texts[i] for i in rows),
        lines=dataset.lines[rows],
        source=dataset.source[rows],
    )


# -- FLOPs and the machine's limit ---------------------------------------------------------


def layer_params(bert_config: Any) -> int:
    """Parameters of one encoder layer (Q, K, V, O, FFN in and out, two LayerNorms)."""
    h, i = int(bert_config.hidden_size), int(bert_config.intermediate_size)
    return 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h


def step_flops(
    bert_config: Any, n_layers: int, head_params: int, batch: int, seq: int, mode: str
) -> float:
    """Model FLOPs of one step over the layers actually run.

    ``2 * params * tokens`` forward and ``6 *`` for a step that trains through them, plus
    the attention score and context matmuls (``4 * T^2 * d`` per layer and sequence
    forward, three times that when trained). ``mode``: ``train_full`` (backward through
    BERT), ``train_frozen`` (BERT forward, heads trained), ``train_cached`` (heads only),
    ``infer`` (BERT forward only).
    """
    tokens = batch * seq
    bert_mult = {"train_full": 6, "train_frozen": 2, "train_cached": 0, "infer": 2}[mode]
    attention = 4 * seq * seq * int(bert_config.hidden_size) * n_layers * batch
    flops = bert_mult * layer_params(bert_config) * n_layers * tokens + bert_mult // 2 * attention
    if mode != "infer":
        flops += 6 * head_params * batch
    return float(flops)


def matmul_gflops(n: int = 2048, reps: int = 8, dtype: str = "float32") -> float:
    """``n x n`` matmul GFLOP/s through XLA (best of ``reps``; cf. matmul_peak.py).

    float32 is the CPU's limit; on GPU/TPU pass ``"bfloat16"`` (and a larger ``n``) for the
    tensor-core peak that bf16 training is measured against.
    """
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), dtype=dtype)
    b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), dtype=dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(times) / 1e9


# -- measuring -----------------------------------------------------------------------------


class CompileLog:
    """Counts XLA compilations and their time while installed (``jax.monitoring`` events).

    Each backend compile is one distinct (function, shapes) program.
    """

    def __init__(self):
        self.totals = dict.fromkeys(_COMPILE_EVENTS.values(), 0.0)
        self.compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        name = _COMPILE_EVENTS.get(event)
        if name is None:
            return
        self.totals[name] += duration
        self.compiles += name == "backend_s"

    @contextlib.contextmanager
    def count(self) -> Iterator[dict[str, float]]:
        """Yields a dict filled on exit: ``compiles`` and ``compile_s`` inside the block."""
        before, n = dict(self.totals), self.compiles
        out: dict[str, float] = {}
        try:
            yield out
        finally:
            out["compiles"] = self.compiles - n
            out["compile_s"] = sum(self.totals[k] - before[k] for k in self.totals)


def summarize(times: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(times),
        "min": min(times),
        "median": statistics.median(times),
        "max": max(times),
    }


def step_summary(times: Sequence[float], steps: int, sync: bool) -> dict[str, float]:
    """:func:`summarize` of per-step times, or the mean step of one pipelined total."""
    if sync:
        return summarize(times)
    return {"n": steps, **dict.fromkeys(("min", "median", "max"), times[0] / steps)}


def time_steps(
    step: Callable[[Any, dict], tuple[Any, dict]],
    state: Any,
    batches: Iterable[dict],
    sync: bool = True,
) -> tuple[Any, list[float], list[dict]]:
    """Run ``step`` over ``batches``; per-step wall times, each from asking for the batch
    to the step's result (so a data pipeline that cannot keep up shows).

    With ``sync=False`` steps are only dispatched and the loop waits once at the end: the
    returned times are then one total, the pipelined cost of all steps.
    """
    times, fed = [], []
    batches = iter(batches)
    t_all = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        state, metrics = step(state, batch)
        if sync:
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
        fed.append(batch)
    if not sync:
        jax.block_until_ready(state)
        times = [time.perf_counter() - t_all]
    return state, times, fed


def token_counts(batches: Sequence[dict]) -> dict[str, int]:
    real_tokens = sum(int(np.asarray(b["attention_mask"]).sum()) for b in batches)
    padded = sum(int(np.asarray(b["attention_mask"]).size) for b in batches)
    return {"real_tokens": real_tokens, "padded_tokens": padded}


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '') or d}"


# -- the PyTorch baseline --------------------------------------------------------------------


def bench_dir() -> str:
    """``$BENCH_DIR``, else ``../shared/bench`` beside the repository (as the scripts sit)."""
    if os.environ.get("BENCH_DIR"):
        return os.environ["BENCH_DIR"]
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "shared", "bench"))


def run_baseline(python: str, script: str, args: Sequence[str], timeout: float = 3600) -> dict:
    """Run a shared baseline script with another interpreter; its one JSON line, parsed."""
    path = os.path.join(bench_dir(), script)
    # Through a shell that forks: a child of this (large) process would inherit its peak RSS
    # in ru_maxrss, and the baseline's reported peak memory would be ours.
    command = ["sh", "-c", '"$0" "$@"; exit $?', python, path, *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}): {tail}")
    return json.loads(lines[-1])


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if not ours or not theirs or not math.isfinite(ours) or not math.isfinite(theirs):
        return None
    return ours / theirs


# -- suites ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    """What ``scripts/benchmark.py`` asks for (one object, so suites share one signature)."""

    backbone: str = "minilm"
    freeze: str = "none"
    backbone_eval: bool = False
    dtype: str = "float32"
    batch_size: int = 32
    seq_lens: tuple[int, ...] = (64, 128)
    max_length: int = 128
    buckets: tuple[int, ...] | None = None
    steps: int = 12
    warmup: int = 3
    repeats: int = 3
    encode_batch: int = 64
    data_dir: str | None = None
    cache_rows: int = 1024
    cache_epochs: int = 3
    sync: bool = True
    seed: int = 0

    def config(self, **overrides: Any) -> Config:
        """:func:`bench_config` of these options, with a suite's own ``overrides``."""
        settings = {
            "backbone": self.backbone,
            "freeze": self.freeze,
            "backbone_eval": self.backbone_eval,
            "dtype": self.dtype,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "buckets": self.buckets,
            "data_dir": self.data_dir,
        }
        return bench_config(**{**settings, **overrides})


class Suite:
    """A workload built (and compiled) once, measured any number of rounds."""

    name = ""

    def __init__(self, opts: Options, backbone: Any, log: CompileLog, peak_gflops: float):
        self.opts, self.backbone, self.log, self.peak = opts, backbone, log, peak_gflops

    def measure(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _common(self, config: Config) -> dict[str, Any]:
        return {
            "model": self.opts.backbone,
            "dtype": config.model.dtype,
            "backbone_dropout": config.model.backbone_dropout,
            "device": device_name(),
            "peak_gflops": self.peak,
        }

    def _mfu(self, flops: float, seconds: float) -> float:
        return flops / seconds / (self.peak * 1e9)


def _train_parts(config: Config, backbone: Any, seed: int):
    from mtl_jax.freezing import make_optimizer
    from mtl_jax.model import build_model, init_params
    from mtl_jax.train import create_train_state, init_train_params

    model = build_model(config, backbone)
    params = init_train_params(init_params(model, jax.random.key(seed), backbone), config)
    optimizer = make_optimizer(config.train, params, total_steps=1)
    return model, params, optimizer, create_train_state(params, optimizer)


def _head_params(params: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params["heads"])))


def _mode(config: Config) -> str:
    from mtl_jax.freezing import backbone_trainable

    return "train_full" if backbone_trainable(config.train) else "train_frozen"


class TrainFixed(Suite):
    """``pt_multitask.py``: random ids at fixed shapes, the same batch every step."""

    name = "train"

    def __init__(self, *args):
        super().__init__(*args)
        from mtl_jax.train import make_train_step

        o = self.opts
        self.config = o.config(max_length=max(o.seq_lens), buckets=None, data_dir=None)
        self.model, params, optimizer, self.state = _train_parts(self.config, self.backbone, o.seed)
        self.heads = _head_params(params)
        key = jax.random.key(o.seed)
        train_step = make_train_step(self.model, optimizer, self.config)
        self.step = lambda state, batch: train_step(state, batch, key)
        vocab = int(self.backbone.bert_config.vocab_size)
        self.batches = {
            s: random_batch(self.config, o.batch_size, s, vocab, o.seed) for s in o.seq_lens
        }
        self.compile = {}
        for seq, batch in self.batches.items():
            with self.log.count() as c:
                t0 = time.perf_counter()
                self.state, _, _ = time_steps(self.step, self.state, [batch])
                c_first = time.perf_counter() - t0
            self.compile[seq] = {**c, "first_step_s": c_first}

    def measure(self) -> list[dict[str, Any]]:
        o, out = self.opts, []
        for seq, batch in self.batches.items():
            self.state, _, _ = time_steps(self.step, self.state, [batch] * max(o.warmup - 1, 0))
            with self.log.count() as c:
                self.state, times, _ = time_steps(self.step, self.state, [batch] * o.steps, o.sync)
            t = step_summary(times, o.steps, o.sync)
            flops = step_flops(
                self.backbone.bert_config,
                self.model.n_layers,
                self.heads,
                o.batch_size,
                seq,
                _mode(self.config),
            )
            out.append(
                {
                    "suite": self.name,
                    "freeze": o.freeze,
                    "seq_len": seq,
                    "batch": o.batch_size,
                    "examples_per_s": o.batch_size / t["median"],
                    "real_tokens_per_s": o.batch_size * seq / t["median"],
                    "step_s": t,
                    "compiles": self.compile[seq]["compiles"],
                    "compile_s": self.compile[seq]["compile_s"],
                    "first_step_s": self.compile[seq]["first_step_s"],
                    "recompiles_while_timed": c["compiles"],
                    "flops_per_step": flops,
                    "mfu": self._mfu(flops, t["median"]),
                    "peak_rss_mb": peak_rss_mb(),
                    **self._common(self.config),
                }
            )
        return out


def load_real_train(config: Config, tokenizer: Any) -> tuple[Config, data_lib.Dataset]:
    """The real preset's training rows, tokenised once (labels resolved as the fit loop does)."""
    config = data_lib.resolve_labels(config)
    return config, data_lib.load_task_datasets(config, tokenizer, "train")


class TrainReal(Suite):
    """``pt_realdata.py``: the mixed SST-2 + Brown stream, the library's own batching."""

    name = "train-real"

    def __init__(self, *args):
        super().__init__(*args)
        from mtl_jax.train import make_train_step

        o = self.opts
        config = o.config()
        t0 = time.perf_counter()
        self.config, self.dataset = load_real_train(config, self.backbone.tokenizer)
        self.prepare_s = time.perf_counter() - t0
        self.model, params, optimizer, self.state = _train_parts(self.config, self.backbone, o.seed)
        self.heads = _head_params(params)
        key = jax.random.key(o.seed)
        train_step = make_train_step(self.model, optimizer, self.config)
        self.step = lambda state, batch: train_step(state, batch, key)
        self.stream = data_lib.prefetch(data_lib.BatchStream(self.dataset, self.config, epochs=0))
        # Every bucket shape compiled before timing; then a few steps per bucket for the
        # per-epoch estimate (the step time depends only on the bucket).
        self.bucket_batches = bucket_batches(self.dataset, self.config)
        with self.log.count() as c:
            t0 = time.perf_counter()
            self.state, _, _ = time_steps(self.step, self.state, self.bucket_batches)
            c["first_steps_s"] = time.perf_counter() - t0
        self.compile = c
        longest = self.bucket_batches[-1]
        self.memory = {
            "seq_len": int(longest["input_ids"].shape[1]),
            **step_memory_mb(self.model, optimizer, self.config, self.state, longest),
        }
        self.forward = None
        if o.freeze == "backbone":  # the frozen step against a forward pass of the same model
            from mtl_jax.train import make_eval_step

            eval_step = make_eval_step(self.model, self.config)
            self.forward = lambda state, batch: (state, {"loss": eval_step(state.params, batch)})
            time_steps(self.forward, self.state, self.bucket_batches)
        epoch = [
            data_lib.make_batch(self.dataset, idx, o.batch_size, data_lib.buckets_for(self.config))
            for idx in data_lib.epoch_batches(self.dataset, self.config, 0)
        ]
        lengths = [b["input_ids"].shape[1] for b in epoch]
        self.per_bucket = {int(b): lengths.count(b) for b in sorted(set(lengths))}
        self.epoch_tokens = token_counts(epoch)
        self.epoch_rows = int(sum((b["index"] >= 0).sum() for b in epoch))

    def _epoch_estimate(self) -> dict[str, Any]:
        step_s = {}
        for batch in self.bucket_batches:
            self.state, times, _ = time_steps(self.step, self.state, [batch] * 2)
            step_s[int(batch["input_ids"].shape[1])] = min(times)
        seconds = sum(n * step_s[b] for b, n in self.per_bucket.items())
        flops = sum(
            n
            * step_flops(
                self.backbone.bert_config,
                self.model.n_layers,
                self.heads,
                self.opts.batch_size,
                b,
                _mode(self.config),
            )
            for b, n in self.per_bucket.items()
        )
        tok = self.epoch_tokens
        return {
            "epoch_s": seconds,
            "examples_per_s": self.epoch_rows / seconds,
            "real_tokens_per_s": tok["real_tokens"] / seconds,
            "padding_share": 1 - tok["real_tokens"] / tok["padded_tokens"],
            "steps_per_bucket": self.per_bucket,
            "step_s_per_bucket": step_s,
            "mfu": flops / seconds / (self.peak * 1e9),
        }

    def measure(self) -> list[dict[str, Any]]:
        o = self.opts
        with self.log.count() as c:
            batches = itertools.islice(self.stream, o.steps)
            self.state, times, fed = time_steps(self.step, self.state, batches, o.sync)
        total = sum(times)
        t = step_summary(times, o.steps, o.sync)
        tok = token_counts(fed)
        forward = {}
        if self.forward is not None:  # same batches, same order: only the step differs
            _, f_times, _ = time_steps(self.forward, self.state, fed, o.sync)
            forward = {
                "forward_step_s": step_summary(f_times, o.steps, o.sync),
                "step_over_forward": total / sum(f_times),
            }
        rows = int(sum((b["index"] >= 0).sum() for b in fed))
        flops = sum(
            step_flops(
                self.backbone.bert_config,
                self.model.n_layers,
                self.heads,
                o.batch_size,
                b["input_ids"].shape[1],
                _mode(self.config),
            )
            for b in fed
        )
        return [
            {
                "suite": self.name,
                "freeze": o.freeze,
                "batch": o.batch_size,
                "buckets": list(data_lib.buckets_for(self.config)),
                "examples_per_s": rows / total,
                "real_tokens_per_s": tok["real_tokens"] / total,
                "padded_tokens_per_s": tok["padded_tokens"] / total,
                "padding_share": 1 - tok["real_tokens"] / tok["padded_tokens"],
                "step_s": t,
                "compiles": self.compile["compiles"],
                "compile_s": self.compile["compile_s"],
                "first_steps_s": self.compile["first_steps_s"],
                "recompiles_while_timed": c["compiles"],
                "prepare_s": self.prepare_s,
                "mfu": self._mfu(flops, total),
                "epoch_estimate": self._epoch_estimate(),
                **forward,
                "step_memory_mb": self.memory,
                "peak_rss_mb": peak_rss_mb(),
                **self._common(self.config),
            }
        ]


def load_corpus() -> list[str]:
    with open(os.path.join(bench_dir(), "corpus.txt"), encoding="utf-8") as f:
        return [ln.rstrip("\n") for ln in f if ln.strip()]


class Encode(Suite):
    """``st_encode.py``: tokenise and embed the 2,000-sentence corpus, length-sorted."""

    name = "encode"

    def __init__(self, *args):
        super().__init__(*args)
        from mtl_jax.encoder import tokenize
        from mtl_jax.inference import embed_tokenized
        from mtl_jax.model import build_model, init_params

        o = self.opts
        self.config = o.config(freeze="none", backbone_eval=False, batch_size=32, data_dir=None)
        self.config = dataclasses.replace(self.config, tasks=())  # an encoder: no heads
        self.model = build_model(self.config, self.backbone)
        params = init_params(self.model, jax.random.key(o.seed), self.backbone)
        self.texts = load_corpus()
        max_length = self.config.model.max_length
        # --buckets sets the padded lengths; by default the library's inference buckets.
        buckets = tuple(o.buckets) if o.buckets else data_lib.inference_buckets(max_length)

        def encode():
            tok = tokenize(self.backbone.tokenizer, self.texts, max_length)
            return embed_tokenized(
                self.model,
                params,
                tok,
                batch_size=o.encode_batch,
                buckets=buckets,
                max_length=max_length,
            ), tok

        self.encode = encode
        with self.log.count() as c:
            t0 = time.perf_counter()
            _, tok = encode()
            c["first_pass_s"] = time.perf_counter() - t0
        self.compile = c
        self.lengths = tok.lengths
        padded = [
            b["input_ids"].shape[1]
            for _, b in data_lib.inference_batches(tok, o.encode_batch, buckets, max_length)
        ]
        self.padded_tokens = len(padded) and sum(padded) * o.encode_batch
        self.flops = sum(
            step_flops(
                self.backbone.bert_config, self.model.n_layers, 0, o.encode_batch, s, "infer"
            )
            for s in padded
        )

    def measure(self) -> list[dict[str, Any]]:
        times = []
        for _ in range(self.opts.repeats):
            t0 = time.perf_counter()
            emb, _ = self.encode()
            times.append(time.perf_counter() - t0)
        t = summarize(times)
        real_tokens = int(self.lengths.sum())
        return [
            {
                "suite": self.name,
                "freeze": None,
                "batch": self.opts.encode_batch,
                "n_sentences": len(self.texts),
                "sentences_per_s": len(self.texts) / t["median"],
                "real_tokens_per_s": real_tokens / t["median"],
                "padding_share": 1 - real_tokens / self.padded_tokens,
                "step_s": t,
                "compiles": self.compile["compiles"],
                "compile_s": self.compile["compile_s"],
                "first_pass_s": self.compile["first_pass_s"],
                "mfu": self._mfu(self.flops, t["median"]),
                "embedding_norm_mean": float(np.linalg.norm(emb, axis=1).mean()),
                "peak_rss_mb": peak_rss_mb(),
                **self._common(self.config),
            }
        ]


class FeatureCache(Suite):
    """Frozen deterministic backbone: heads trained from cached embeddings vs the full step.

    Both runs start from the same state and see the same batches for ``cache_epochs``
    epochs of ``cache_rows`` real rows; the cached run's first epoch includes building
    the cache. Reports per-epoch times and how far the two runs' results differ.
    """

    name = "cache"

    def __init__(self, *args):
        super().__init__(*args)
        o = self.opts
        config = o.config(freeze="backbone", backbone_eval=True)
        config, dataset = load_real_train(config, self.backbone.tokenizer)
        self.dataset = subset(dataset, min(o.cache_rows, len(dataset)), o.seed)
        self.config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, epochs=o.cache_epochs)
        )

    def _run(self, cached: bool) -> dict[str, Any]:
        from mtl_jax import features
        from mtl_jax.train import create_train_state, make_train_step

        o, config = self.opts, self.config
        model, params, optimizer, state = _train_parts(config, self.backbone, o.seed)
        key = jax.random.key(o.seed)
        make = features.make_cached_train_step if cached else make_train_step
        train_step = make(model, optimizer, config)
        # Compile on a throwaway state, so both runs start from the same params.
        warm = bucket_batches(self.dataset, config)[: 1 if cached else None]
        with self.log.count() as c:
            scratch = create_train_state(params, optimizer)
            for batch in warm:
                if cached:
                    hidden = int(self.backbone.hidden_size)
                    batch = {**batch, "embedding": np.zeros((o.batch_size, hidden), np.float32)}
                scratch, m = train_step(scratch, batch, key)
            jax.block_until_ready(m)
        epochs, losses, cache_s, cache_compile = [], [], 0.0, {}
        stream = data_lib.BatchStream(self.dataset, config)
        spe = data_lib.steps_per_epoch(self.dataset, config)
        cache = None
        for _ in range(o.cache_epochs):
            t0 = time.perf_counter()
            if cached and cache is None:
                with self.log.count() as cache_compile:
                    cache = features.cache_embeddings(model, state.params, self.dataset, config)
                cache_s = time.perf_counter() - t0
            metrics = []
            for _ in range(spe):
                batch = next(stream)
                if cached:
                    batch = features.cached_batch(batch, cache)
                state, m = train_step(state, batch, key)
                metrics.append(m["loss"])
            losses += [float(x) for x in jax.device_get(metrics)]
            epochs.append(time.perf_counter() - t0)
        return {
            "epoch_s": epochs,
            "cache_s": cache_s,
            "cache_compiles": cache_compile.get("compiles", 0),
            "cache_compile_s": cache_compile.get("compile_s", 0.0),
            "compiles": c["compiles"],
            "compile_s": c["compile_s"],
            "losses": losses,
            "heads": jax.tree.map(np.asarray, state.params["heads"]),
            "steps_per_epoch": spe,
        }

    def measure(self) -> list[dict[str, Any]]:
        full, cached = self._run(cached=False), self._run(cached=True)
        rows = len(self.dataset)
        diff = max(
            float(np.abs(a - b).max())
            for a, b in zip(
                jax.tree.leaves(full["heads"]), jax.tree.leaves(cached["heads"]), strict=True
            )
        )
        later = cached["epoch_s"][1:]
        later_s = statistics.median(later) if later else float("nan")
        full_s = statistics.median(full["epoch_s"])
        return [
            {
                "suite": self.name,
                "freeze": "backbone",
                "rows": rows,
                "epochs": self.opts.cache_epochs,
                "steps_per_epoch": full["steps_per_epoch"],
                "examples_per_s": rows / later_s,
                "examples_per_s_first_epoch": rows / cached["epoch_s"][0],
                "examples_per_s_uncached": rows / full_s,
                "epoch_s_cached": cached["epoch_s"],
                "epoch_s_uncached": full["epoch_s"],
                "cache_build_s": cached["cache_s"],
                "cache_compiles": cached["cache_compiles"],
                "cache_compile_s": cached["cache_compile_s"],
                # Compiles are done before the timed epochs, except the cache's own (inside
                # epoch 1): leave them out so both first epochs are compile-free.
                "speedup_first_epoch": full_s / (cached["epoch_s"][0] - cached["cache_compile_s"]),
                "speedup_later_epochs": full_s / later_s,
                "step_s": {
                    "cached_median": later_s / full["steps_per_epoch"],
                    "uncached_median": full_s / full["steps_per_epoch"],
                },
                "compiles": {"cached": cached["compiles"], "uncached": full["compiles"]},
                "compile_s": {"cached": cached["compile_s"], "uncached": full["compile_s"]},
                "max_abs_diff_heads": diff,
                "max_abs_diff_loss": float(
                    np.max(np.abs(np.subtract(full["losses"], cached["losses"])))
                ),
                "real_tokens_per_s": None,
                "mfu": None,
                "peak_rss_mb": peak_rss_mb(),
                **self._common(self.config),
            }
        ]


SUITES = {s.name: s for s in (TrainFixed, TrainReal, Encode, FeatureCache)}
