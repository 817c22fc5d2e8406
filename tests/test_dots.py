"""bfloat16 on CPU: bf16 operands into float32 dots (the BF16 unit), within cosine 0.999."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import dots
from mtl_jax.inference import SentenceEncoder
from mtl_jax.synthetic import make_rows

DOT = re.compile(r"stablehlo\.dot_general.*?:\s*\((tensor<[^)]*)\)\s*->\s*(tensor<[^>]*>)")

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU route")


def sentences(n: int = 96) -> list[str]:
    """Synthetic sentences of varied length (a long one reaches the 32-token bucket)."""
    texts = [row["text"] for row in make_rows(n, seed=3)]
    return texts + [" ".join(texts[:6])]


def dot_signatures(encoder: SentenceEncoder, length: int = 16) -> list[tuple[str, str]]:
    """(operand types, result type) of every dot in the compiled embedding forward."""
    ids = jnp.ones((4, length), jnp.int32)
    fn = jax.jit(
        lambda p, i: encoder.model.apply({"params": p}, i, jnp.ones_like(i), method="embed")
    )
    text = fn.lower(encoder.params, ids).as_text()
    return DOT.findall(text)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def test_bfloat16_dense_layers_multiply_bf16_into_float32():
    f32 = SentenceEncoder.load("tiny", layer=-1)
    bf16 = SentenceEncoder.load("tiny", layer=-1, dtype="bfloat16")
    n_layers = f32.model.n_layers
    dense = 6 * n_layers  # q, k, v, attention output, intermediate, output per layer

    f32_dots = dot_signatures(f32)
    assert f32_dots and all("bf16" not in a + r for a, r in f32_dots)
    bf16_dots = dot_signatures(bf16)
    mixed = [(a, r) for a, r in bf16_dots if a.count("xbf16>") == 2 and r.endswith("xf32>")]
    assert len(mixed) == dense
    # The rest (attention scores and context) stay float32: activations are float32.
    assert all("bf16" not in a + r for a, r in bf16_dots if (a, r) not in mixed)
    assert len(bf16_dots) == len(f32_dots)


def test_bfloat16_keeps_float32_params_and_embeddings():
    bf16 = SentenceEncoder.load("tiny", dtype="bfloat16")
    leaves = jax.tree_util.tree_leaves(bf16.params)
    assert {leaf.dtype for leaf in leaves} == {np.dtype("float32")}
    assert bf16.embed(["a short sentence"]).embeddings.dtype == np.float32


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_bfloat16_embeddings_within_cosine_of_float32_on_every_sentence(pooling):
    texts = sentences()
    f32 = SentenceEncoder.load("tiny", layer=-1, pooling=pooling).embed(texts).embeddings
    bf16 = SentenceEncoder.load("tiny", layer=-1, pooling=pooling, dtype="bfloat16")
    out = bf16.embed(texts).embeddings
    assert min_cosine(f32, out) >= 0.999
    assert not np.array_equal(f32, out)  # the bf16 route really ran


def test_wanted_only_for_bfloat16():
    assert dots.wanted("bfloat16") and dots.wanted(jnp.bfloat16)
    assert not dots.wanted("float32") and not dots.wanted("float16")


@pytest.mark.minilm
def test_minilm_bfloat16_within_cosine_of_float32(minilm_backbone):
    texts = sentences(400)
    for layer, normalize in ((-1, True), (-2, False)):  # sentence-transformers', ours
        f32 = SentenceEncoder.load("minilm", layer=layer, normalize=normalize)
        bf16 = SentenceEncoder.load("minilm", layer=layer, normalize=normalize, dtype="bfloat16")
        assert min_cosine(f32.embed(texts).embeddings, bf16.embed(texts).embeddings) >= 0.999
