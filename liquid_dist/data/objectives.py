"""Pretraining objectives: raw token chunks -> (encoder ids, decoder targets) -> batches.

All functions are pure numpy and take their randomness from a passed
``numpy.random.Generator``, so a loader worker that restores the generator
state reproduces every example exactly.

Conventions shared with the model (docs/data.md, "Tokenizer" and "Loaders"):

* ``pad = 0`` is also span corruption's decoder start token (prefix LM starts
  with ``bos = 3``: liquid_dist.data.tokenizer.DECODER_START_IDS); ``eos = 1``
  ends every encoder input and every span-corruption target sequence, and
  separates documents.
* ``encoder_attention_mask`` is bool, True at real tokens.
* ``labels`` are the targets padded with -100; ``decoder_input_ids`` are the
  targets shifted right by one behind the decoder start token, padded with pad.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import numpy as np

IGNORE_INDEX = -100
OBJECTIVES = ("span_corruption", "prefix_lm")


# ------------------------------------------------------------ span corruption


def span_corruption_sizes(length: int, noise_density: float, mean_noise_span_length: float,
                          max_spans: Optional[int] = None) -> tuple[int, int]:
    """(noise tokens, noise spans) that corrupt a chunk of ``length`` tokens.

    As in T5: ``round(length * noise_density)`` noise tokens, clipped to
    [1, length - 1], in ``round(noise / mean_noise_span_length)`` spans, at least
    one, and at most one span per noise token, per non-noise token (spans
    alternate with non-noise runs) and per available sentinel (``max_spans``).
    Capping the spans by the sentinels lengthens the mean span instead of
    failing when a long encoder needs more sentinels than the tokenizer has.
    """
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)
    if max_spans is not None:
        num_spans = min(num_spans, max_spans)
    return num_noise, num_spans


def span_corruption_raw_length(encoder_length: int, decoder_length: int, noise_density: float,
                               mean_noise_span_length: float,
                               max_spans: Optional[int] = None) -> Optional[int]:
    """Longest raw chunk whose corrupted encoder input and targets fit the lengths.

    The encoder input holds the non-noise tokens, one sentinel per span and EOS;
    the targets hold one sentinel per span, the noise tokens and EOS. Returns
    None when not even a 2-token chunk fits (then the config cannot work).
    """
    best = None
    # about n * (1 - density) tokens stay in the encoder and n * density go to the targets
    bound = int(min((encoder_length + 1) / (1.0 - noise_density),
                    (decoder_length + 1) / noise_density)) + 4
    for n in range(2, bound + 1):
        noise, spans = span_corruption_sizes(n, noise_density, mean_noise_span_length, max_spans)
        if n - noise + spans + 1 <= encoder_length and noise + spans + 1 <= decoder_length:
            best = n
    return best


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Uniformly random split of ``num_items`` into ``num_segments`` positive lengths."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False) + 1)
    return np.diff(np.concatenate(([0], cuts, [num_items])))


def random_spans_noise_mask(length: int, num_noise: int, num_spans: int,
                            rng: np.random.Generator) -> np.ndarray:
    """Bool mask (length,) with ``num_noise`` True tokens in ``num_spans`` runs.

    Non-noise and noise runs alternate, starting with non-noise and ending
    with noise, exactly as T5's ``random_spans_noise_mask``.
    """
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    runs = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    flags = np.tile(np.array([False, True]), num_spans)
    return np.repeat(flags, runs)


def span_corruption(tokens: np.ndarray, rng: np.random.Generator, *, noise_density: float,
                    mean_noise_span_length: float, sentinel_ids: Sequence[int],
                    eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one raw chunk (n,) -> (encoder ids, target ids).

    Encoder: the chunk with span i replaced by ``sentinel_ids[i]``, then EOS.
    Targets: for each span i, ``sentinel_ids[i]`` followed by its tokens, then
    EOS. Every chunk token appears exactly once, in the encoder or the targets.
    """
    n = len(tokens)
    num_noise, num_spans = span_corruption_sizes(n, noise_density, mean_noise_span_length,
                                                 len(sentinel_ids))
    mask = random_spans_noise_mask(n, num_noise, num_spans, rng)
    sentinels = np.asarray(sentinel_ids[:num_spans], dtype=np.int64)
    starts = np.flatnonzero(mask & ~np.concatenate(([False], mask[:-1])))
    # a span starting at chunk position p follows p - (noise before p) kept tokens
    noise_before = np.cumsum(mask) - mask
    keep_positions = starts - noise_before[starts]
    encoder = np.insert(tokens[~mask], keep_positions, sentinels)
    targets = np.insert(tokens[mask], noise_before[starts], sentinels)
    return (np.concatenate((encoder, [eos_id])).astype(np.int64),
            np.concatenate((targets, [eos_id])).astype(np.int64))


# ------------------------------------------------------------ prefix LM


def prefix_lm_raw_length(encoder_length: int, decoder_length: int) -> int:
    """Raw chunk length of one prefix-LM example: ``encoder_length - 1 + decoder_length``.

    The encoder holds ``encoder_length - 1`` tokens of context and EOS, the decoder
    the ``decoder_length`` tokens that follow: both sides are full.
    """
    return encoder_length - 1 + decoder_length


def prefix_lm(tokens: np.ndarray, *, encoder_length: int,
              eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one raw chunk (n,) after ``encoder_length - 1`` tokens -> (prefix + EOS, rest).

    The chunk is a window at an arbitrary point of the packed document stream,
    so the split falls anywhere in a document and the encoder often starts in
    the previous one (EOS separates them). The targets are the stream's own
    continuation: they hold EOS only where a document ends.
    """
    s = encoder_length - 1
    if not 0 < s < len(tokens):
        raise ValueError(f"a prefix-LM chunk of {len(tokens)} tokens does not fit "
                         f"encoder_length={encoder_length} and a non-empty continuation")
    eos = np.array([eos_id], dtype=np.int64)
    return (np.concatenate((tokens[:s], eos)).astype(np.int64),
            tokens[s:].astype(np.int64))


# ------------------------------------------------------------ batch shapes


class ExampleShape(NamedTuple):
    """Raw tokens one example takes from the stream, and its (encoder, decoder) widths."""

    raw: int
    encoder: int
    decoder: int


def example_shape(objective: str, *, encoder_length: int, decoder_length: int,
                  noise_density: float, mean_noise_span_length: float,
                  max_spans: Optional[int] = None) -> Optional[ExampleShape]:
    """The fixed shape of every example of ``objective`` (None: span corruption cannot fit).

    Every example of an objective has exactly these widths, so a batch of one
    objective has no padding:

    * ``span_corruption``: the longest chunk whose corrupted input fits
      ``encoder_length`` and whose targets fit ``decoder_length``; the widths are
      that chunk's exact input and target lengths (T5's rule: the targets fill a
      decoder just as long as a full encoder's spans need).
    * ``prefix_lm``: ``(encoder_length, decoder_length)``.
    """
    if objective == "prefix_lm":
        return ExampleShape(prefix_lm_raw_length(encoder_length, decoder_length),
                            encoder_length, decoder_length)
    if objective != "span_corruption":
        raise ValueError(f"unknown objective {objective!r}; expected one of {list(OBJECTIVES)}")
    n = span_corruption_raw_length(encoder_length, decoder_length, noise_density,
                                   mean_noise_span_length, max_spans)
    if n is None:
        return None
    noise, spans = span_corruption_sizes(n, noise_density, mean_noise_span_length, max_spans)
    return ExampleShape(n, n - noise + spans + 1, noise + spans + 1)


# ------------------------------------------------------------ batches


def collate(examples: Sequence[tuple[np.ndarray, np.ndarray]], *, encoder_length: int,
            decoder_length: int, pad_id: int, decoder_start_id: int) -> dict[str, np.ndarray]:
    """Pad (encoder ids, targets) pairs into the model's batch arrays.

    Returns ``encoder_input_ids`` (B, encoder_length) int64,
    ``encoder_attention_mask`` (B, encoder_length) bool (True = real token),
    ``decoder_input_ids`` (B, decoder_length) int64 = [decoder_start] + targets[:-1],
    ``labels`` (B, decoder_length) int64 = targets, -100 at padding.
    """
    b = len(examples)
    enc = np.full((b, encoder_length), pad_id, dtype=np.int64)
    mask = np.zeros((b, encoder_length), dtype=bool)
    dec = np.full((b, decoder_length), pad_id, dtype=np.int64)
    labels = np.full((b, decoder_length), IGNORE_INDEX, dtype=np.int64)
    for i, (e, t) in enumerate(examples):
        if len(e) > encoder_length or len(t) > decoder_length:
            raise ValueError(f"example {i} ({len(e)}, {len(t)}) exceeds "
                             f"({encoder_length}, {decoder_length})")
        enc[i, : len(e)] = e
        mask[i, : len(e)] = True
        labels[i, : len(t)] = t
        dec[i, 0] = decoder_start_id
        dec[i, 1: len(t)] = t[:-1]
    return {"encoder_input_ids": enc, "encoder_attention_mask": mask,
            "decoder_input_ids": dec, "labels": labels}
