"""The forward functions' own behaviour: token cutoff (training-time augmentation)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mtl_jax.forward import CUTOFF_STREAM, cut_off_tokens, model_forward, model_inputs

from conftest import make_fake_batch


def _inputs(rows: int, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, length + 1, size=rows)
    lengths[-1] = 0  # a dummy row padding a short batch
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, 100, size=(rows, length)).astype(np.int32) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_cutoff_hides_a_share_of_words_and_never_cls_sep_or_padding():
    inputs = _inputs(512, 48)
    mask = inputs["attention_mask"]
    cut = np.asarray(cut_off_tokens(inputs, 0.2, jax.random.key(3))["attention_mask"])
    assert cut.dtype == mask.dtype and cut.shape == mask.shape
    assert np.all(cut <= mask)  # only ever hides; padding stays padding
    lengths = mask.sum(axis=1)
    rows = np.flatnonzero(lengths > 0)
    assert np.all(cut[rows, 0] == 1)  # [CLS]
    assert np.all(cut[rows, lengths[rows] - 1] == 1)  # [SEP]
    content = mask.copy()
    content[rows, 0] = 0
    content[rows, lengths[rows] - 1] = 0
    hidden = (content == 1) & (cut == 0)
    share = hidden.sum() / content.sum()
    assert 0.18 < share < 0.22  # about the rate, over ~11k word pieces
    assert cut.sum(axis=1)[rows].min() >= 2  # every real row keeps [CLS] and [SEP]
    again = cut_off_tokens(inputs, 0.2, jax.random.key(3))["attention_mask"]
    other = cut_off_tokens(inputs, 0.2, jax.random.key(4))["attention_mask"]
    np.testing.assert_array_equal(again, cut)  # the key decides
    assert not np.array_equal(other, cut)
    np.testing.assert_array_equal(
        cut_off_tokens(inputs, 0.2, jax.random.key(3))["input_ids"], inputs["input_ids"]
    )


def test_a_training_forward_with_cutoff_is_the_forward_of_the_cut_inputs(
    tiny_config, tiny_model, tiny_params
):
    base = dataclasses.replace(
        tiny_config, model=dataclasses.replace(tiny_config.model, backbone_dropout=False)
    )
    with_cutoff = dataclasses.replace(
        base, train=dataclasses.replace(base.train, freeze="none", token_cutoff=0.3)
    )
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, freeze="none"))
    batch = make_fake_batch(base, batch=8, seq=16, seed=5)
    key = jax.random.key(7)
    rngs = {"dropout": key}
    plain, cutoff = model_forward(tiny_model, base), model_forward(tiny_model, with_cutoff)

    logits, aux = cutoff(tiny_params, batch, True, rngs)
    cut = cut_off_tokens(model_inputs(batch), 0.3, jax.random.fold_in(key, CUTOFF_STREAM))
    expected, expected_aux = plain(tiny_params, {**batch, **cut}, True, rngs)
    np.testing.assert_allclose(aux["embedding"], expected_aux["embedding"], rtol=1e-5, atol=1e-6)
    for task in logits:
        np.testing.assert_allclose(logits[task], expected[task], rtol=1e-5, atol=1e-6)
    uncut, _ = plain(tiny_params, batch, True, rngs)
    assert not np.allclose(logits["genre"], uncut["genre"], atol=1e-4)

    # Evaluation reads every token: the cutoff config changes nothing there.
    got, _ = cutoff(tiny_params, batch, False, None)
    want, _ = plain(tiny_params, batch, False, None)
    for task in got:
        np.testing.assert_array_equal(got[task], want[task])
