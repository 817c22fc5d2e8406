"""Task 1 measured: which hidden layer and pooling of the backbone make the best sentence vector.

The design pools layer -2 with a masked mean by argument alone; this script measures every
(layer, pooling) pair on two kinds of use:

- similarity: STS-B dev Spearman x100 of the cosine against the gold score (cosine is
  invariant to L2 normalisation, so the normalised vectors give the same number);
- classification: a frozen linear probe (standardised features, logistic regression, C
  chosen on a held-out slice of TRAIN, never dev) on SST-2 (dev accuracy) and the Brown
  fiction genres (dev macro-F1), on raw and on L2-normalised vectors.

Each corpus is encoded ONCE: one forward pass through every layer returns all hidden states,
and each is pooled every way inside the same jitted call, so 18 settings cost one encode.

    .venv/bin/python scripts/embedding_study.py --out runs/embedding_study.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr  # scipy comes with scikit-learn (a dev dependency)
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mtl_jax.data import inference_batches, inference_buckets, read_rows, restore_order
from mtl_jax.encoder import bert_module, layers_to_run, pool, tokenize
from mtl_jax.inference import SentenceEncoder

POOLINGS = ("mean", "cls", "max")
C_GRID = (0.01, 0.1, 1.0)  # C = 10 took minutes per probe to converge on MiniLM features
PROBES = {  # task: (folder, label column, headline metric)
    "sst2": ("sst2", "sentiment", "accuracy"),
    "brown": ("brown_genre", "genre", "macro_f1"),
}
Setting = tuple[int, str]  # (hidden_states index >= 0, pooling)


# -- one encode, every layer and pooling -------------------------------------------------------


def layer_embeddings(
    encoder: SentenceEncoder,
    texts: Sequence[str],
    layers: Sequence[int],
    poolings: Sequence[str] = POOLINGS,
    batch_size: int = 64,
) -> tuple[dict[Setting, np.ndarray], int]:
    """Pooled vectors ``[N, hidden]`` for every (layer, pooling), from one forward pass.

    ``encoder`` must run at least ``max(layers)`` layers (load it with ``layer=-1``); the
    hidden states come from the same backbone module and params its ``embed`` uses, so
    ``out[(L, p)]`` equals ``SentenceEncoder.load(..., layer=L, pooling=p).embed(texts)``.

    Returns:
      ``({(layer, pooling): embeddings}, sentences cut at max_length)``.
    """
    model = encoder.model
    if max(layers) > model.n_layers:
        raise ValueError(f"layer {max(layers)} asked of an encoder running {model.n_layers}")
    static = (model.bert_config, model.n_layers, model.dtype, tuple(layers), tuple(poolings))
    fn = functools.partial(_pooled_batch, static, encoder.params["backbone"])
    tokenized = tokenize(encoder.tokenizer, list(texts), encoder.max_length)
    buckets = encoder.buckets or inference_buckets(encoder.max_length)
    chunks, indices = [], []
    for rows, batch in inference_batches(tokenized, batch_size, buckets, encoder.max_length):
        chunks.append(np.asarray(jax.device_get(fn(batch["input_ids"], batch["attention_mask"]))))
        indices.append(rows)
    stacked = restore_order([c.transpose(1, 0, 2) for c in chunks], indices, len(tokenized))
    settings = [(layer, p) for layer in layers for p in poolings]
    return {s: stacked[:, k] for k, s in enumerate(settings)}, tokenized.truncated


@functools.partial(jax.jit, static_argnums=0)
def _pooled_batch(static: tuple, params, input_ids, attention_mask) -> jax.Array:
    """``[len(layers) * len(poolings), batch, hidden]``: all settings of one batch.

    ``static = (frozen bert config, layers run, dtype, layers, poolings)``: hashable, so
    each padded length compiles once.
    """
    bert_config, n_layers, dtype, layers, poolings = static
    out = bert_module(bert_config, n_layers, dtype).apply(
        {"params": params},
        input_ids,
        attention_mask,
        jnp.zeros_like(input_ids),
        deterministic=True,
        output_hidden_states=True,
    )
    states = out.hidden_states  # (embeddings, layer 1, ..., layer n)
    return jnp.stack([pool(states[L], attention_mask, p) for L in layers for p in poolings])


# -- scores ------------------------------------------------------------------------------------


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties), the STS benchmark's correlation.

    Scores are rounded to 1e-6 first: cosines that differ only by float rounding (identical
    sentences; kernels that differ between CPUs, e.g. AMX vs AVX-512) are ties, so the rank
    order, and the number, does not depend on the machine.
    """
    return float(spearmanr(np.round(a, 6), np.round(b, 6)).statistic)


def sts_spearman(left: np.ndarray, right: np.ndarray, gold: np.ndarray) -> float:
    """STS score: Spearman x100 between each pair's cosine and its gold similarity."""
    left = left / np.maximum(np.linalg.norm(left, axis=1, keepdims=True), 1e-12)
    right = right / np.maximum(np.linalg.norm(right, axis=1, keepdims=True), 1e-12)
    return 100.0 * spearman((left * right).sum(axis=1), gold)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    dev_x: np.ndarray,
    dev_y: np.ndarray,
    metric: str = "accuracy",
    grid: Sequence[float] = C_GRID,
    holdout: float = 0.2,
    seed: int = 0,
) -> dict[str, float]:
    """A frozen-feature probe: standardise, logistic regression, C picked on train only.

    C is the grid value with the best ``metric`` on a stratified ``holdout`` slice of the
    TRAIN rows (the probe fit on the rest); the chosen C is refit on all train rows and
    scored once on dev, so dev never steers a choice. Classes are weighted ``balanced``
    so the small Brown genres count in macro-F1.

    Returns:
      ``{"C", "holdout_<metric>", "accuracy", "macro_f1"}`` (the last two on dev).
    """
    scorers = {
        "accuracy": accuracy_score,
        "macro_f1": functools.partial(f1_score, average="macro"),
    }
    fit_x, val_x, fit_y, val_y = train_test_split(
        train_x, train_y, test_size=holdout, random_state=seed, stratify=train_y
    )
    held = [scorers[metric](val_y, _probe(c, seed).fit(fit_x, fit_y).predict(val_x)) for c in grid]
    best = int(np.argmax(held))
    predicted = _probe(grid[best], seed).fit(train_x, train_y).predict(dev_x)
    return {
        "C": float(grid[best]),
        f"holdout_{metric}": float(held[best]),
        "accuracy": float(accuracy_score(dev_y, predicted)),
        "macro_f1": float(f1_score(dev_y, predicted, average="macro")),
    }


def _probe(c: float, seed: int):
    """StandardScaler -> LogisticRegression(C): scaling is fit on the probe's own rows."""
    model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced", random_state=seed)
    return make_pipeline(StandardScaler(), model)


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -- the study ---------------------------------------------------------------------------------


def _subset(rows: list, max_rows: int | None, seed: int) -> list:
    """A seeded random ``max_rows`` of ``rows`` in file order (files are sorted by source)."""
    if not max_rows or len(rows) <= max_rows:
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), max_rows, replace=False))
    return [rows[i] for i in keep]


def read_corpora(data_dir: Path, max_rows: int | None = None, seed: int = 0) -> dict:
    """STS-B dev pairs and the probe tasks' train/dev texts and labels, from ``data_dir``."""
    sts = _subset(read_rows(data_dir / "stsb" / "dev.tsv", "sentence1", ["sentence2", "score"]),
                  max_rows, seed)  # fmt: skip
    corpora: dict = {
        "sts": {
            "left": [r.text for r in sts],
            "right": [r.labels["sentence2"] for r in sts],
            "gold": np.array([float(r.labels["score"]) for r in sts]),
        }
    }
    for task, (folder, column, _) in PROBES.items():
        for split in ("train", "dev"):
            rows = _subset(read_rows(data_dir / folder / f"{split}.tsv", "text", [column]),
                           max_rows, seed)  # fmt: skip
            corpora[f"{task}_{split}"] = {
                "texts": [r.text for r in rows],
                "labels": np.array([r.labels[column] for r in rows]),
            }
    return corpora


def run_study(
    corpora: dict,
    encoder: SentenceEncoder,
    layers: Sequence[int],
    poolings: Sequence[str] = POOLINGS,
    batch_size: int = 64,
    seed: int = 0,
    l2_poolings: Sequence[str] = ("mean",),
    grid: Sequence[float] = C_GRID,
    cache: Path | None = None,
) -> dict:
    """Every (layer, pooling) scored on STS-B and both probes; timings and cut counts too.

    With ``cache`` (an ``.npz``), the vectors are saved after the encode and read back on the
    next run, so the probes can be rerun without encoding again.

    The probes also run on L2-normalised vectors for ``l2_poolings`` (each probe is seconds
    to a minute of CPU, so by default only where sentence-transformers normalises: mean).
    """
    start = time.perf_counter()
    texts = {"sts_left": corpora["sts"]["left"], "sts_right": corpora["sts"]["right"]}
    texts.update({k: v["texts"] for k, v in corpora.items() if k != "sts"})
    if cache is not None and cache.is_file():
        vectors, truncated = _load_cache(cache, texts, layers, poolings)
    else:
        vectors, truncated = {}, {}
        for name, sentences in texts.items():
            vectors[name], truncated[name] = layer_embeddings(
                encoder, sentences, layers, poolings, batch_size
            )
            print(f"encoded {name}: {len(sentences)} sentences", flush=True)
        if cache is not None:
            _save_cache(cache, vectors, truncated)
    encode_s = time.perf_counter() - start
    rows = []
    for layer in layers:
        for p in poolings:
            rows.append(_score_setting(corpora, vectors, (layer, p), seed, p in l2_poolings, grid))
            print(json.dumps(rows[-1]), flush=True)
    return {
        "rows": rows,
        "sentences": {k: len(v) for k, v in texts.items()},
        "truncated": truncated,
        "encode_s": round(encode_s, 1),
        "probe_s": round(time.perf_counter() - start - encode_s, 1),
    }


def _save_cache(path: Path, vectors: dict, truncated: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{n}/{L}/{p}": x for n, per in vectors.items() for (L, p), x in per.items()}
    np.savez(path, **arrays, **{f"truncated/{n}": np.array(t) for n, t in truncated.items()})


def _load_cache(path: Path, texts: dict, layers, poolings) -> tuple[dict, dict]:
    """Vectors saved by :func:`_save_cache`; raises when they do not fit this run's corpora."""
    with np.load(path) as saved:
        vectors = {
            n: {(L, p): saved[f"{n}/{L}/{p}"] for L in layers for p in poolings} for n in texts
        }
        truncated = {n: int(saved[f"truncated/{n}"]) for n in texts}
    for name, sentences in texts.items():
        if len(vectors[name][(layers[0], poolings[0])]) != len(sentences):
            raise ValueError(f"{path}: cached {name} does not match its file; delete the cache")
    print(f"read the vectors from {path}", flush=True)
    return vectors, truncated


def _score_setting(
    corpora: dict, vectors: dict, setting: Setting, seed: int, l2: bool, grid: Sequence[float]
) -> dict:
    """One table row: STS-B Spearman and both probes, on raw (and L2-normalised) vectors."""
    layer, pooling = setting
    row = {
        "layer": layer,
        "pooling": pooling,
        "stsb_spearman": round(
            sts_spearman(
                vectors["sts_left"][setting],
                vectors["sts_right"][setting],
                corpora["sts"]["gold"],
            ),
            2,
        ),
    }
    for task, (_, _, metric) in PROBES.items():
        train_x = vectors[f"{task}_train"][setting]
        dev_x = vectors[f"{task}_dev"][setting]
        train_y, dev_y = corpora[f"{task}_train"]["labels"], corpora[f"{task}_dev"]["labels"]
        for suffix, f in (("", np.asarray), ("_l2", _l2))[: 2 if l2 else 1]:
            probe = linear_probe(f(train_x), train_y, f(dev_x), dev_y, metric, grid, seed=seed)
            row[f"{task}{suffix}_{metric}"] = round(100 * probe[metric], 2)
            row[f"{task}{suffix}_C"] = probe["C"]
            if task == "brown":
                row[f"{task}{suffix}_accuracy"] = round(100 * probe["accuracy"], 2)
    return row


def markdown_table(rows: Sequence[dict], num_layers: int) -> str:
    """The study as a markdown table; layer shown as index and as negative index."""
    lines = [
        "| layer | pooling | STS-B dev Spearman x100 | SST-2 dev acc | SST-2 dev acc (L2) "
        "| Brown dev macro-F1 | Brown dev macro-F1 (L2) | Brown dev acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = ("stsb_spearman", "sst2_accuracy", "sst2_l2_accuracy", "brown_macro_f1")
    keys += ("brown_l2_macro_f1", "brown_accuracy")
    for r in rows:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in keys]
        negative = r["layer"] - num_layers - 1
        lines.append(f"| {r['layer']} ({negative}) | {r['pooling']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("MTL_JAX_DATA", "../shared/data"), type=Path
    )
    parser.add_argument("--backbone", default="minilm", help="minilm | tiny | a BERT directory")
    parser.add_argument(
        "--layers", default="", help="comma list of hidden_states indices (-1 = last); default all"
    )
    parser.add_argument("--poolings", default=",".join(POOLINGS))
    parser.add_argument(
        "--l2-poolings", default="mean", help="poolings probed on L2-normalised vectors too"
    )
    parser.add_argument(
        "--c-grid", default=",".join(map(str, C_GRID)), help="probe C values tried on train"
    )
    parser.add_argument("--cache", type=Path, help="an .npz to save the vectors to / read from")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--max-rows", type=int, help="a seeded subset of each file (quick runs)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    encoder = SentenceEncoder.load(args.backbone, layer=-1, max_length=args.max_length)
    num_layers = encoder.model.n_layers
    asked = [int(x) for x in args.layers.split(",") if x.strip()] or range(1, num_layers + 1)
    layers = sorted({layers_to_run(num_layers, layer) for layer in asked})
    poolings = [p.strip() for p in args.poolings.split(",") if p.strip()]
    corpora = read_corpora(args.data_dir, args.max_rows, args.seed)
    grid = [float(c) for c in args.c_grid.split(",")]
    l2_poolings = [p.strip() for p in args.l2_poolings.split(",") if p.strip()]
    result = run_study(
        corpora,
        encoder,
        layers,
        poolings,
        args.batch_size,
        args.seed,
        l2_poolings,
        grid,
        args.cache,
    )
    result.update(
        backbone=args.backbone,
        num_layers=num_layers,
        max_length=args.max_length,
        max_rows=args.max_rows,
        c_grid=grid,
        wall_s=round(time.perf_counter() - start, 1),
    )
    print(markdown_table(result["rows"], num_layers))
    print(f"wall time {result['wall_s']} s (encode {result['encode_s']} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
