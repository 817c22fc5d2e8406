"""The encode suite (``st_encode.py``): embed the shared 2,000-sentence corpus."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from mtl_jax import data as data_lib
from mtl_jax.encoder import tokenize
from mtl_jax.forward import batch_token_budget
from mtl_jax.inference import embed_tokenized
from mtl_jax.model import build_model, init_params

from .measure import bench_dir, peak_rss_mb, summarize
from .suite import Suite
from .workloads import step_flops


def load_corpus() -> list[str]:
    with open(os.path.join(bench_dir(), "corpus.txt"), encoding="utf-8") as f:
        return [ln.rstrip("\n") for ln in f if ln.strip()]


class Encode(Suite):
    """``st_encode.py``: tokenise and embed the 2,000-sentence corpus, length-sorted.

    The same work as ``SentenceTransformer.encode`` of all-MiniLM-L6-v2: every layer
    (``layer = -1``), mean pooling, L2-normalised. In another dtype than float32 the result
    also says how close it stays to float32 (``min_cosine_vs_float32`` over the corpus).
    """

    name = "encode"
    step_name = "encode"  # one step: one pass over the corpus

    def __init__(self, *args):
        super().__init__(*args)
        o = self.opts
        self.config = o.config(freeze="none", backbone_eval=False, batch_size=32, data_dir=None)
        st_setting = dataclasses.replace(self.config.model, layer=-1, normalize=True)
        self.config = dataclasses.replace(self.config, model=st_setting, tasks=())  # no heads
        self.model = build_model(self.config, self.backbone)
        params = init_params(self.model, jax.random.key(o.seed), self.backbone)
        self.texts = load_corpus()
        max_length = self.config.model.max_length
        # --buckets sets the padded lengths; by default the library's inference buckets.
        buckets = tuple(o.buckets) if o.buckets else data_lib.inference_buckets(max_length)

        def encode(model=self.model):
            tok = tokenize(self.backbone.tokenizer, self.texts, max_length)
            return embed_tokenized(
                model,
                params,
                tok,
                batch_size=o.encode_batch,
                buckets=buckets,
                max_length=max_length,
            ), tok

        self.encode = self.profiled(encode)
        with self.log.count() as c:
            t0 = time.perf_counter()
            _, tok = encode()
            c["first_pass_s"] = time.perf_counter() - t0
        self.compile = c
        self.min_cosine = None
        if self.config.model.dtype != "float32":
            ours, _ = encode()
            reference, _ = encode(dataclasses.replace(self.model, dtype="float32"))
            self.min_cosine = float((ours * reference).sum(1).min())  # both unit vectors
        self.lengths = tok.lengths
        max_tokens = batch_token_budget(o.encode_batch)  # as embed_tokenized batches
        shapes = [  # (rows, padded length) of each batch: long buckets hold fewer rows
            b["input_ids"].shape
            for _, b in data_lib.inference_batches(
                tok, o.encode_batch, buckets, max_length, max_tokens
            )
        ]
        self.padded_tokens = sum(rows * length for rows, length in shapes)
        self.flops = sum(
            step_flops(self.backbone.bert_config, self.model.n_layers, 0, rows, length, "infer")
            for rows, length in shapes
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
                "min_cosine_vs_float32": self.min_cosine,
                "layer": self.config.model.layer,
                "peak_rss_mb": peak_rss_mb(),
                **self._common(self.config),
            }
        ]
