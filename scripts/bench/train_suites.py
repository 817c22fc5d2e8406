"""The training suites: fixed shapes (``pt_multitask.py``) and the real stream
(``pt_realdata.py``)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import jax

from mtl_jax import data as data_lib
from mtl_jax import features
from mtl_jax.errors import UserError
from mtl_jax.train import make_eval_step, make_train_step

from .measure import peak_rss_mb, step_summary, time_steps, token_counts
from .suite import Suite, head_params, step_mode, train_parts, without_weights
from .workloads import bucket_batches, load_real_train, random_batch, step_flops, step_memory_mb


class TrainFixed(Suite):
    """``pt_multitask.py``: random ids at fixed shapes, the same batch every step."""

    name = "train"

    def __init__(self, *args):
        super().__init__(*args)
        o = self.opts
        self.config = o.config(max_length=max(o.seq_lens), buckets=None, data_dir=None)
        self.model, params, optimizer, self.state = train_parts(self.config, self.backbone, o.seed)
        self.backbone = without_weights(self.backbone)
        self.heads = head_params(params)
        key = jax.random.key(o.seed)
        train_step = make_train_step(self.model, optimizer, self.config)
        self.step = self.profiled(lambda state, batch: train_step(state, batch, key))
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
                step_mode(self.config),
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


class TrainReal(Suite):
    """``pt_realdata.py``: the mixed SST-2 + Brown stream, the library's own batching.

    With ``opts.cached`` (a frozen, dropout-free backbone) the heads train from embeddings
    cached once, as ``mtl-jax train`` does then: the peak RSS includes building the cache
    over the whole stream; the step times do not (``cache_build_s`` says what it took), so
    only the memory compares with PyTorch's per-step forward like for like.
    """

    name = "train-real"

    def __init__(self, *args):
        super().__init__(*args)
        o = self.opts
        config = o.config()
        t0 = time.perf_counter()
        self.config, self.dataset = load_real_train(config, self.backbone.tokenizer)
        self.prepare_s = time.perf_counter() - t0
        self.model, params, optimizer, self.state = train_parts(self.config, self.backbone, o.seed)
        self.backbone = without_weights(self.backbone)
        self.heads = head_params(params)
        key = jax.random.key(o.seed)
        self.cache_build_s = None
        if o.cached:
            if not features.can_cache(self.config):
                raise UserError("--cached: needs --freeze backbone --backbone-eval")
            t0 = time.perf_counter()
            cache = features.cache_embeddings(
                self.model, self.state.params, self.dataset, self.config
            )
            self.cache_build_s = time.perf_counter() - t0
            forward = features.cached_forward(self.model, self.config)
            cached_step = make_train_step(self.model, optimizer, self.config, forward)

            def train_step(state, batch, key):  # the fit loop's batch transform, then the step
                batch = features.cached_batch(batch, cache, features.STEP_KEYS)
                return cached_step(state, batch, key)
        else:
            train_step = make_train_step(self.model, optimizer, self.config)
        self.step = self.profiled(lambda state, batch: train_step(state, batch, key))
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
        # XLA's account of the longest step: a diagnostic whose compile would add to our
        # peak RSS, so opt-in; the cached step's memory does not depend on the tokens.
        self.memory = None
        if o.step_memory and not o.cached:
            self.memory = {
                "seq_len": int(longest["input_ids"].shape[1]),
                **step_memory_mb(self.model, optimizer, self.config, self.state, longest),
            }
        self.forward = None
        if o.freeze == "backbone" and o.step_over_forward:  # the frozen step against a forward
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
                step_mode(self.config),
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
            "mfu": None if self.opts.cached else flops / seconds / (self.peak * 1e9),
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
                step_mode(self.config),
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
                "mfu": None if o.cached else self._mfu(flops, total),  # no backbone FLOPs
                "cached": o.cached,
                "cache_build_s": self.cache_build_s,
                "epoch_estimate": self._epoch_estimate(),
                **forward,
                "step_memory_mb": self.memory,
                "peak_rss_mb": peak_rss_mb(),
                **self._common(self.config),
            }
        ]
