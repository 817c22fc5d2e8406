"""Workloads of the benchmark: the baseline's settings, its batches, and their FLOP counts.

The workloads mirror the PyTorch scripts in ``../shared/bench`` (same model, heads, loss,
batch and optimiser: AdamW at 2e-5 for every trained parameter, decay 0.01, no clipping,
constant rate) so that a ratio of the two measures the stacks, not the settings.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import data as data_lib
from mtl_jax.config import Config, DataConfig, ModelConfig, TrainConfig, default_tasks
from mtl_jax.presets import data_folder_tasks
from mtl_jax.train import make_train_step

BASELINE_LR = 2e-5
BASELINE_WEIGHT_DECAY = 0.01


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
    remat: bool = False,
    remat_min_length: int = 64,
) -> Config:
    """The PyTorch baseline's settings as a :class:`Config`.

    ``data_dir`` set: the baseline's two files (:func:`baseline_tasks`); else the default
    tasks with no files (fixed-shape and encode suites). ``backbone_eval`` turns BERT's dropout
    off (heads keep theirs), as ``backbone.eval()`` does in PyTorch.
    """
    base = Config(tasks=baseline_tasks(data_dir) if data_dir else default_tasks())
    model = ModelConfig(
        backbone=backbone,
        max_length=max_length,
        dtype=dtype,
        backbone_dropout=not backbone_eval,
        remat=remat,
        remat_min_length=remat_min_length,
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


def baseline_tasks(data_dir: str) -> tuple:
    """Genre on Brown and sentiment on the 6,920 SST-2 *sentences*, unweighted: the files
    ``../shared/bench/realdata.py`` reads, pinned here rather than taken from the ``real``
    preset, whose recipe moves on (it trains on the 67k phrases since round 3)."""
    return data_folder_tasks(data_dir, sentiment_train="sst2")


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
    step = make_train_step(model, optimizer, config)  # the library's, remat split included
    compiled = step.trace(state, batch, jax.random.key(0)).lower().compile()
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


def matmul_gflops_apart(n: int = 2048, reps: int = 8, dtype: str = "float32") -> float:
    """:func:`matmul_gflops`, on CPU in a child process so that its operands stay out of ours.

    In process, a 2048^2 float32 matmul adds its ~50 MB of operands and result to this
    process's peak RSS (``ru_maxrss`` never falls), a cost the PyTorch baseline, a separate
    process, never pays. The child inherits ``XLA_FLAGS`` and so measures the same limit. On
    an accelerator it stays in process: a second process would contend for device memory.
    """
    if jax.default_backend() != "cpu":
        return matmul_gflops(n, reps, dtype)
    scripts = str(Path(__file__).resolve().parents[1])
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from bench.workloads import matmul_gflops; "
        "print(json.dumps(matmul_gflops(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, scripts, str(n), str(reps), dtype],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"matmul peak child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1]))


def load_real_train(config: Config, tokenizer: Any) -> tuple[Config, data_lib.Dataset]:
    """The real preset's training rows, tokenised once (labels resolved as the fit loop does)."""
    config = config.with_labels(data_lib.labels_from_files(config))
    return config, data_lib.load_task_datasets(config, tokenizer, "train")
