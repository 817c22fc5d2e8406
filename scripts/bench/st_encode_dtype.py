#!/usr/bin/env python3
"""The shared ``st_encode.py`` with the sentence-transformers model cast to another dtype.

Runs with the PyTorch venv's interpreter (``scripts/benchmark.py --suite encode
--encode-baselines st-bf16``), never with mtl_jax's: the same corpus, warm-up and timing as
``st_encode.py`` (its ``main`` is called unchanged), only the model is ``.to(--dtype)``
(PyTorch CPU runs bfloat16 linears through oneDNN on the BF16 unit). Prints st_encode's JSON
line plus ``dtype`` and ``vs_torch_fp32`` (min / mean cosine of the first ``--ref-n``
corpus sentences against the float32 model).

  /tmp/ptvenv/bin/python scripts/bench/st_encode_dtype.py --dtype bfloat16 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path


def bench_dir() -> Path:
    if os.environ.get("BENCH_DIR"):
        return Path(os.environ["BENCH_DIR"])
    return Path(__file__).resolve().parents[2].parent / "shared" / "bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--ref-n", type=int, default=200)
    args, rest = parser.parse_known_args()

    sys.path.insert(0, str(bench_dir()))
    import numpy as np
    import sentence_transformers
    import st_encode  # the shared baseline, beside benchlib
    import torch

    dtype = getattr(torch, args.dtype)
    plain = sentence_transformers.SentenceTransformer

    class CastModel(plain):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.to(dtype)

    sentence_transformers.SentenceTransformer = CastModel
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        st_encode.main(rest)
    result = json.loads([ln for ln in out.getvalue().splitlines() if ln.startswith("{")][-1])

    sentences = st_encode.load_corpus()[: args.ref_n]
    model_dir = st_encode.bl.MODEL_DIR
    cast = CastModel(model_dir, device="cpu").encode(sentences, batch_size=64)
    ref = plain(model_dir, device="cpu").encode(sentences, batch_size=64)
    cast, ref = np.asarray(cast, np.float32), np.asarray(ref, np.float32)
    cosine = (cast * ref).sum(1) / (np.linalg.norm(cast, axis=1) * np.linalg.norm(ref, axis=1))
    result.update(
        script="st_encode_dtype.py",
        dtype=args.dtype,
        vs_torch_fp32={"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean())},
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
