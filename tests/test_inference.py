"""Bucketed, length-sorted inference equals one-at-a-time inference, in input order."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mtl_jax.encoder import tokenize
from mtl_jax.inference import SentenceEncoder, embed_tokenized, predict_tokenized

TEXTS = [
    "a robot",
    "the detective found the clue near the old house after the long night",
    "kiss",
    "the clown laughed",
    "a ship in the storm near the mountain river with a rifle and a map " * 3,
    "she felt the letter was wonderful",
    "dull",
]


def test_batched_embeddings_equal_unbatched_in_input_order(tiny_model, tiny_params, tiny_backbone):
    tok = tokenize(tiny_backbone.tokenizer, TEXTS, 32)
    batched = embed_tokenized(tiny_model, tiny_params, tok, batch_size=3, buckets=(8, 16))
    assert batched.shape == (len(TEXTS), 32)
    for i, text in enumerate(TEXTS):
        one = tokenize(tiny_backbone.tokenizer, [text], 32)
        single = embed_tokenized(tiny_model, tiny_params, one, batch_size=1, buckets=(32,))
        np.testing.assert_allclose(batched[i], single[0], atol=1e-5)
    assert tok.truncated == 1  # the repeated sentence is longer than 32 tokens


def test_predict_probabilities_in_input_order(tiny_model, tiny_params, tiny_backbone):
    tok = tokenize(tiny_backbone.tokenizer, TEXTS, 32)
    probs = predict_tokenized(tiny_model, tiny_params, tok, batch_size=4)
    assert probs["genre"].shape == (len(TEXTS), 5)
    np.testing.assert_allclose(probs["sentiment"].sum(-1), 1.0, rtol=1e-5)
    reversed_probs = predict_tokenized(
        tiny_model, tiny_params, tokenize(tiny_backbone.tokenizer, TEXTS[::-1], 32), batch_size=4
    )
    np.testing.assert_allclose(reversed_probs["genre"][::-1], probs["genre"], atol=1e-5)


def test_sentence_encoder_normalize_and_layers():
    enc = SentenceEncoder.load("tiny", layer=-1, pooling="mean", normalize=True, max_length=32)
    result = enc.embed(TEXTS[:3])
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, rtol=1e-5)
    assert len(enc.params["backbone"]["encoder"]["layer"]) == 3


def test_readme_library_example_runs():
    """The README's 'use it from your own code' block is executed as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- library-example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README lost its library example"
    code = match.group(1).replace('"minilm"', '"tiny"')  # the same API on the tiny model
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["vectors"].shape[0] == 2
    assert namespace["loss"] > 0
