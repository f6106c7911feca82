"""Span corruption, prefix LM and collation: invariants over many random draws."""

from __future__ import annotations

import numpy as np
import pytest

from liquid_dist.data import (
    IGNORE_INDEX,
    collate,
    example_shape,
    prefix_lm,
    prefix_lm_raw_length,
    span_corruption,
    span_corruption_raw_length,
)
from liquid_dist.data.objectives import span_corruption_sizes

EOS = 1
SENTINELS = tuple(range(500, 600))  # ids no raw token uses, so they can be told apart


def _undo_span_corruption(encoder: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rebuild the raw chunk: each encoder sentinel replaced by its target span."""
    assert encoder[-1] == EOS and targets[-1] == EOS
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1].tolist():
        if t in SENTINELS:
            assert t not in spans
            current = spans[t] = []
        else:
            assert current is not None, "targets must start with a sentinel"
            current.append(t)
    out: list[int] = []
    for t in encoder[:-1].tolist():
        out.extend(spans.pop(t) if t in SENTINELS else [t])
    assert not spans, "every target span has its sentinel in the encoder"
    return np.array(out)


@pytest.mark.parametrize("density, mean_span", [(0.15, 3.0), (0.3, 1.0), (0.5, 8.0)])
def test_span_corruption_accounts_for_every_token_once(density, mean_span):
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 400))
        tokens = rng.integers(4, 500, size=n)
        encoder, targets = span_corruption(tokens, rng, noise_density=density,
                                           mean_noise_span_length=mean_span,
                                           sentinel_ids=SENTINELS, eos_id=EOS)
        enc_sentinels = [t for t in encoder.tolist() if t in SENTINELS]
        tgt_sentinels = [t for t in targets.tolist() if t in SENTINELS]
        # sentinels pair up: the same ones, in order 0, 1, 2, ... on both sides
        assert enc_sentinels == tgt_sentinels == list(SENTINELS[: len(enc_sentinels)])
        assert np.array_equal(_undo_span_corruption(encoder, targets), tokens), trial
        noise, spans = span_corruption_sizes(n, density, mean_span, len(SENTINELS))
        assert len(targets) == noise + spans + 1 and len(encoder) == n - noise + spans + 1
        # T5 layout: a chunk starts with kept tokens and its last token is noise
        assert encoder[0] == tokens[0] and targets[-2] == tokens[-1]


def test_span_corruption_caps_spans_at_the_sentinels():
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, 500, size=2000)
    encoder, targets = span_corruption(tokens, rng, noise_density=0.15,
                                       mean_noise_span_length=1.0, sentinel_ids=SENTINELS[:5],
                                       eos_id=EOS)
    assert sum(t in SENTINELS for t in encoder.tolist()) == 5
    assert np.array_equal(_undo_span_corruption(encoder, targets), tokens)


@pytest.mark.parametrize("enc, dec", [(128, 64), (512, 114), (64, 32), (16, 8)])
def test_span_corruption_raw_length_is_the_longest_chunk_that_fits(enc, dec):
    n = span_corruption_raw_length(enc, dec, 0.15, 3.0, len(SENTINELS))
    assert n is not None
    for length in (n, n + 1):
        noise, spans = span_corruption_sizes(length, 0.15, 3.0, len(SENTINELS))
        fits = length - noise + spans + 1 <= enc and noise + spans + 1 <= dec
        assert fits == (length == n)
    assert span_corruption_raw_length(64, 2, 0.15, 3.0) is None


@pytest.mark.parametrize("enc, dec", [(128, 64), (64, 128), (2, 2), (3, 40)])
def test_prefix_lm_fills_both_sides_with_every_token_once(enc, dec):
    rng = np.random.default_rng(2)
    n = prefix_lm_raw_length(enc, dec)
    tokens = rng.integers(4, 500, size=n)
    encoder, targets = prefix_lm(tokens, encoder_length=enc, eos_id=EOS)
    assert len(encoder) == enc and len(targets) == dec
    assert encoder[-1] == EOS
    assert np.array_equal(np.concatenate((encoder[:-1], targets)), tokens)
    with pytest.raises(ValueError, match="does not fit"):
        prefix_lm(tokens[:enc - 1], encoder_length=enc, eos_id=EOS)


@pytest.mark.parametrize("enc, dec", [(128, 64), (512, 128), (1024, 512), (2048, 1024)])
def test_every_example_of_an_objective_has_its_shape_exactly(enc, dec):
    rng = np.random.default_rng(4)
    common = {"encoder_length": enc, "decoder_length": dec, "noise_density": 0.15,
              "mean_noise_span_length": 3.0, "max_spans": len(SENTINELS)}
    span = example_shape("span_corruption", **common)
    assert span.encoder <= enc and span.decoder <= dec
    assert span.raw == span_corruption_raw_length(enc, dec, 0.15, 3.0, len(SENTINELS))
    for _ in range(20):
        e, t = span_corruption(rng.integers(4, 500, size=span.raw), rng, noise_density=0.15,
                               mean_noise_span_length=3.0, sentinel_ids=SENTINELS, eos_id=EOS)
        assert (len(e), len(t)) == (span.encoder, span.decoder)
    # a full encoder: the encoder side is within one token of encoder_length
    assert span.encoder >= enc - 1
    assert example_shape("prefix_lm", **common) == (enc + dec - 1, enc, dec)
    assert example_shape("span_corruption", **dict(common, decoder_length=2)) is None


def test_collate_shifts_targets_into_decoder_inputs():
    examples = [(np.array([5, 6, 7, EOS]), np.array([8, 9, EOS])),
                (np.array([5, EOS]), np.array([10, 11, 12, 13, EOS]))]
    b = collate(examples, encoder_length=6, decoder_length=5, pad_id=0, decoder_start_id=0)
    assert b["encoder_input_ids"].tolist() == [[5, 6, 7, EOS, 0, 0], [5, EOS, 0, 0, 0, 0]]
    assert b["encoder_attention_mask"].dtype == bool
    assert b["encoder_attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[8, 9, EOS, IGNORE_INDEX, IGNORE_INDEX],
                                    [10, 11, 12, 13, EOS]]
    assert b["decoder_input_ids"].tolist() == [[0, 8, 9, 0, 0], [0, 10, 11, 12, 13]]
    with pytest.raises(ValueError, match="exceeds"):
        collate(examples, encoder_length=3, decoder_length=5, pad_id=0, decoder_start_id=0)
