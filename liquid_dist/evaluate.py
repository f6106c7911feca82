"""Held-out evaluation: cross-entropy, perplexity and bits per byte on raw text or shards.

    python -m liquid_dist.evaluate MODEL_DIR --input PATH [PATH ...]
        [--source NAME=PATH ...] [--objective prefix_lm|span_corruption]
        [--max-tokens N] [--batch-size B] [--device cpu|cuda] [--quiet]

``MODEL_DIR`` is a converted model directory (``config.json`` + safetensors +
``tokenizer.model``: :meth:`LiquidFoundationModelOptimized.from_pretrained`)
or a training run / checkpoint directory (:func:`load_trained_model`, with the
checkpoint's ``tokenizer.model``). Inputs are raw text read by
liquid_dist.data.text_inputs exactly as data_prep reads it (txt / jsonl /
gzip / parquet / directories; ``--txt-docs``, ``--text-field``,
``--bad-input``), or WebDataset shards (a make_shards directory, whose
``--split`` shards are read; a ``.tar`` path; a brace pattern; a ``pipe:``
command). One JSON object goes to stdout (docs/evaluation.md):

* ``tokens``: target tokens scored; ``ce``: their summed cross-entropy (nats)
  / ``tokens``; ``ppl`` = exp(``ce``);
* ``bytes``: UTF-8 bytes of the text the target tokens stand for;
  ``bits_per_byte`` = summed nats / ln 2 / ``bytes``.

``--source NAME=PATH`` (repeatable; the mapping a run's ``data.val_sources``
holds) scores each named input on its own: the object gains ``sources``,
``{NAME: {tokens, ce, ppl, bytes, bits_per_byte, ...}}``; the top-level
figures are those of ``--input`` (absent without it).

Each document is scored on its own, as its tokens followed by EOS (the end
of document the model learned to predict), with the training example
shapes (:func:`example_shape`):

* ``prefix_lm``: consecutive windows of ``decoder_length`` targets; the
  encoder holds the up to ``encoder_length - 1`` tokens of the same document
  before the window, then EOS (only EOS for the first window). Every token
  and the final EOS are targets exactly once; ``bytes`` is the document's
  text.
* ``span_corruption``: consecutive chunks of the training chunk length (a
  last chunk of one token takes the previous chunk's last token), each
  corrupted by :func:`span_corruption` with noise from a generator seeded by
  (``--seed``, a hash of the document's ids); the targets are the sentinels,
  the noise spans and EOS; ``bytes`` is the text of the noise spans.

A target token's bytes (:class:`ByteCounter`): its piece's UTF-8 text ("▁" a
space, a byte-fallback piece one byte, EOS none; a sentinel *marker* in span
corruption targets none), the first token of a document as the tokenizer
decodes it at the start of a text. A document's tokens add up to exactly the
UTF-8 length of its text (for every text the tokenizer reproduces), so a
window or a ``--max-tokens`` cut inside a character counts exactly the bytes
it covers. Nothing is shuffled and every document is scored on its own: the
numbers depend on the documents alone, not on how they are split into files or
formats (their order and ``--batch-size`` only change the batches, i.e. the
floating-point rounding).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from liquid_dist.checkpoint_format import TOKENIZER_FILE, CheckpointError, find_checkpoint
from liquid_dist.config import DataConfig
from liquid_dist.data.errors import BadSample, DataError
from liquid_dist.data.objectives import (
    OBJECTIVES,
    ExampleShape,
    collate,
    example_shape,
    span_corruption,
)
from liquid_dist.data.shards import MANIFEST_NAME, decode_sample, resolve_shards
from liquid_dist.data.stream import Stats, shard_samples
from liquid_dist.data.text_inputs import InputReport, expand_inputs, iter_documents
from liquid_dist.data.tokenizer import DECODER_START_IDS, Tokenizer
from liquid_dist.data.tokenizer import MODEL_NAME as TOKENIZER_NAME
from liquid_dist.model.pretrained import is_pretrained_dir

EXIT_BAD_INPUT = 2


class EvalError(RuntimeError):
    """An input, model directory or setting that cannot be evaluated; the message says which."""


@dataclass(frozen=True)
class Settings:
    """How documents become examples: the objective, its training shape and the noise."""

    objective: str
    shape: ExampleShape
    """The training example of ``objective``: raw chunk length, encoder and decoder widths."""
    noise_density: float
    mean_noise_span_length: float
    seed: int


@dataclass(frozen=True)
class Example:
    encoder: np.ndarray
    targets: np.ndarray
    target_bytes: np.ndarray
    """UTF-8 bytes of the text each target stands for (0 for EOS and sentinels)."""


# ------------------------------------------------------------------ the model


def load_model(path: str | Path, device: str) -> tuple[Any, Tokenizer, DataConfig, str]:
    """(model in eval mode, fp32, on ``device``; its tokenizer; the data settings; kind).

    A converted directory gives kind ``converted`` and the DataConfig defaults
    with the model's maximum lengths; a run or checkpoint directory gives kind
    ``checkpoint`` and the run's data config.
    """
    from liquid_dist.convert import load_trained_model
    from liquid_dist.model import LiquidFoundationModelOptimized

    if is_pretrained_dir(path):
        try:
            model = LiquidFoundationModelOptimized.from_pretrained(str(path), device=device,
                                                                   dtype=torch.float32)
        except (ValueError, FileNotFoundError) as exc:  # ConfigError is a ValueError
            raise EvalError(f"{path}: cannot load the converted model ({exc})") from None
        tok = Tokenizer(Path(path) / TOKENIZER_NAME)
        data = DataConfig(encoder_length=model.cfg.max_encoder_length,
                          decoder_length=model.cfg.max_decoder_length)
        kind = "converted"
    else:
        try:
            ref = find_checkpoint(str(path))
        except CheckpointError as exc:
            raise EvalError(f"{path}: neither a converted model directory (config.json and "
                            f"model.safetensors) nor a training run or checkpoint ({exc})"
                            ) from None
        assert ref is not None  # a path never names "no checkpoint"
        model, cfg = load_trained_model(ref.path)
        model = model.to(device=device, dtype=torch.float32)
        tok = Tokenizer(ref.path / TOKENIZER_FILE)
        data, kind = cfg.data, "checkpoint"
    if model.cfg.vocab_size != tok.vocab_size:
        raise EvalError(f"{tok.path}: {tok.vocab_size} pieces, but the model at {path} has "
                        f"vocab_size {model.cfg.vocab_size}")
    return model, tok, data, kind


def make_settings(objective: str, data: DataConfig, tok: Tokenizer, model_cfg: Any, *,
                  encoder_length: Optional[int] = None, decoder_length: Optional[int] = None,
                  seed: int = 0) -> Settings:
    """The example shape of ``objective`` for these lengths (default: ``data``'s)."""
    le = encoder_length if encoder_length is not None else data.encoder_length
    ld = decoder_length if decoder_length is not None else data.decoder_length
    if not 1 <= le <= model_cfg.max_encoder_length:
        raise EvalError(f"--encoder-length {le}: expected 1..{model_cfg.max_encoder_length} "
                        "(the model's max_encoder_length)")
    if not 1 <= ld <= model_cfg.max_decoder_length:
        raise EvalError(f"--decoder-length {ld}: expected 1..{model_cfg.max_decoder_length} "
                        "(the model's max_decoder_length)")
    shape = example_shape(objective, encoder_length=le, decoder_length=ld,
                          noise_density=data.noise_density,
                          mean_noise_span_length=data.mean_noise_span_length,
                          max_spans=tok.num_sentinels)
    if objective == "span_corruption" and (shape is None or shape.raw < 3
                                           or tok.num_sentinels == 0):
        raise EvalError(f"span corruption does not fit encoder_length {le} / decoder_length "
                        f"{ld} with {tok.num_sentinels} sentinels (it needs chunks of at least "
                        "3 tokens and a tokenizer with sentinels)")
    assert shape is not None
    return Settings(objective, shape, data.noise_density, data.mean_noise_span_length, seed)


# ------------------------------------------------------------------ documents


def _is_shard_input(item: str) -> bool:
    path = Path(item)
    return (item.startswith("pipe:") or "://" in item or "{" in item
            or path.name.endswith(".tar") or (path.is_dir() and (path / MANIFEST_NAME).is_file()))


def _shard_documents(item: str, split: str, tok: Tokenizer, stats: Stats,
                     policy: str) -> Iterator[tuple[str, np.ndarray]]:
    """(shard URL, ids) of every valid sample of the shards ``item`` names."""
    shard_set = resolve_shards(item, split)
    suffix = shard_set.suffix_for(tok, item)

    def bad(url: str, reason: str, detail: str) -> None:
        if policy == "fail":
            raise DataError(f"{url}: {reason}: {detail}")
        stats.bad_sample(url, reason, f"{reason}: {detail}")

    for url, expected in zip(shard_set.urls, shard_set.shard_documents, strict=True):
        samples = shard_samples(url)
        read = 0
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                if expected is not None and read != expected:
                    bad(url, "short_shard",
                        f"ended after {read} samples, the manifest lists {expected}")
                break
            except Exception as exc:  # any failure of the tar stream: one counted reason
                bad(url, "unreadable_shard", f"after {read} samples: {type(exc).__name__}: "
                    f"{exc}")
                break
            read += 1
            try:
                ids = decode_sample(sample, suffix=suffix, vocab_size=tok.vocab_size)
            except BadSample as exc:
                bad(url, exc.reason, f"sample {sample.get('__key__')}: {exc}")
                continue
            yield url, ids.astype(np.int64)


def iter_token_documents(inputs: Sequence[str], tok: Tokenizer, report: InputReport,
                         stats: Stats, *, split: str = "val", txt_docs: str = "blank-line",
                         text_field: str = "text",
                         policy: str = "fail") -> Iterator[np.ndarray]:
    """The ids of every document of ``inputs`` (all text or all shards), in order.

    Text goes through :func:`expand_inputs` and :func:`iter_documents`, as
    data_prep reads it (problems counted in ``report``, or DataError under
    ``policy="fail"``); shards through the shard reader (bad samples counted
    in ``stats``, or DataError).
    """
    shards = [_is_shard_input(item) for item in inputs]
    if any(shards) and not all(shards):
        raise EvalError(f"--input mixes shards and text files ({list(inputs)}); evaluate "
                        "them in separate runs")
    if not any(shards):
        for doc in iter_documents(expand_inputs(inputs), report, txt_docs=txt_docs,
                                  text_field=text_field, policy=policy):
            yield np.asarray(tok.encode(doc.text), dtype=np.int64)
        return
    for item in inputs:
        for url, ids in _shard_documents(item, split, tok, stats, policy):
            report.count(url, "documents")
            yield ids


# ------------------------------------------------------------------ bytes


class ByteCounter:
    """UTF-8 bytes of the text each token of a document stands for.

    A token's bytes inside a text (:attr:`Tokenizer.piece_bytes`: its piece with
    "\u2581" as a space, one byte for a byte-fallback piece, none for pad / EOS /
    BOS); the document's first token as the
    tokenizer decodes it at the start of a text (without the dummy-prefix
    space). For any text the tokenizer reproduces, a document's counts add up
    to the UTF-8 length of its text (tests/test_evaluate.py).
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.table = tok.piece_bytes

    def document(self, ids: np.ndarray) -> np.ndarray:
        """Bytes per token of a whole document's ``ids``."""
        counts = self.table[ids]
        if len(ids) and not self.tok.is_byte_piece(ids[0]):
            counts[0] = len(self.tok.decode(ids[:1]).encode("utf-8"))
        return counts


# ------------------------------------------------------------------ examples


def _noise_rng(seed: int, ids: np.ndarray) -> np.random.Generator:
    digest = hashlib.blake2b(ids.astype("<i8").tobytes(), digest_size=8).digest()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, int.from_bytes(digest, "little")])))


def document_examples(ids: np.ndarray, counts: np.ndarray, s: Settings,
                      tok: Tokenizer) -> Iterator[Example]:
    """The examples that score one document (``ids`` + EOS), in order (module docstring)."""
    seq = np.concatenate((ids, [tok.eos_id])).astype(np.int64)
    seq_bytes = np.concatenate((counts, [0])).astype(np.int64)
    eos = np.array([tok.eos_id], dtype=np.int64)
    if s.objective == "prefix_lm":
        context = s.shape.encoder - 1
        for start in range(0, len(seq), s.shape.decoder):
            end = start + s.shape.decoder
            yield Example(np.concatenate((seq[max(0, start - context): start], eos)),
                          seq[start:end], seq_bytes[start:end])
        return
    n = s.shape.raw
    bounds = list(range(0, len(seq), n)) + [len(seq)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds[-2] -= 1  # span corruption needs at least 2 tokens per chunk
    rng, rng_bytes = _noise_rng(s.seed, ids), _noise_rng(s.seed, ids)
    markers = [0] * len(tok.sentinel_ids)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        encoder, targets = span_corruption(
            seq[a:b], rng, noise_density=s.noise_density,
            mean_noise_span_length=s.mean_noise_span_length, sentinel_ids=tok.sentinel_ids,
            eos_id=tok.eos_id)
        # the same corruption (same generator state) of the chunk's byte counts, with
        # sentinels and EOS as 0 bytes: each target's bytes, position by position
        _, target_bytes = span_corruption(
            seq_bytes[a:b], rng_bytes, noise_density=s.noise_density,
            mean_noise_span_length=s.mean_noise_span_length, sentinel_ids=markers, eos_id=0)
        yield Example(encoder, targets, target_bytes)


# ------------------------------------------------------------------ scoring


def _batches(examples: Iterable[Example], batch_size: int) -> Iterator[list[Example]]:
    batch: list[Example] = []
    for ex in examples:
        batch.append(ex)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _limited(documents: Iterable[np.ndarray], settings: Settings, tok: Tokenizer,
             max_tokens: Optional[int], tally: dict[str, Any]) -> Iterator[Example]:
    """The examples of ``documents``, cut after ``max_tokens`` targets; counts documents
    (those with at least one target scored) and whether targets were left out."""
    counter = ByteCounter(tok)
    left = max_tokens
    for ids in documents:
        for k, ex in enumerate(document_examples(ids, counter.document(ids), settings,
                                                 tok)):
            if left == 0:
                tally["truncated"] = True
                return
            if left is not None:
                if len(ex.targets) > left:
                    ex = Example(ex.encoder, ex.targets[:left], ex.target_bytes[:left])
                    tally["truncated"] = True
                left -= len(ex.targets)
            if k == 0:
                tally["documents"] += 1
            yield ex


def evaluate(model: Any, tok: Tokenizer, documents: Iterable[np.ndarray],
             settings: Settings, *, batch_size: int = 8, max_tokens: Optional[int] = None,
             device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Score ``documents`` (token ids each); returns the figures of the JSON output."""
    if batch_size < 1:
        raise EvalError(f"--batch-size {batch_size}: expected at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise EvalError(f"--max-tokens {max_tokens}: expected at least 1")
    tally: dict[str, Any] = {"documents": 0, "truncated": False}
    nats, tokens, n_bytes, n_examples = 0.0, 0, 0, 0
    shape = settings.shape
    bar = tqdm(total=max_tokens, unit="tok", desc="evaluating", file=sys.stderr,
               disable=not progress)
    with torch.inference_mode():
        for batch in _batches(_limited(documents, settings, tok, max_tokens, tally),
                              batch_size):
            arrays = collate([(ex.encoder, ex.targets) for ex in batch],
                             encoder_length=shape.encoder, decoder_length=shape.decoder,
                             pad_id=tok.pad_id,
                             decoder_start_id=DECODER_START_IDS[settings.objective])
            out = model(**{k: torch.from_numpy(v).to(device) for k, v in arrays.items()})
            nats += float(out.ce_sum)
            tokens += int(out.num_targets)
            n_bytes += sum(int(ex.target_bytes.sum()) for ex in batch)
            n_examples += len(batch)
            bar.update(int(out.num_targets))
    bar.close()
    if tokens == 0:
        raise EvalError("no documents to score: every input was empty, unreadable or skipped")
    ce = nats / tokens
    return {"objective": settings.objective, "ce": ce, "ppl": math.exp(ce),
            "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else None,
            "tokens": tokens, "bytes": n_bytes, "nats": nats,
            "documents": tally["documents"], "examples": n_examples,
            "truncated": tally["truncated"],
            "encoder_length": shape.encoder, "decoder_length": shape.decoder}


# ------------------------------------------------------------------ command line


def _named_input(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH")
    return name, path


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="liquid-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a converted model directory, or a training run or "
                                 "checkpoint directory")
    p.add_argument("--input", nargs="+", default=[],
                   help="text files or directories (txt / jsonl / gzip / parquet), or shards "
                        "(a make_shards directory, a .tar, a brace pattern, pipe:...)")
    p.add_argument("--source", action="append", default=[], type=_named_input,
                   metavar="NAME=PATH",
                   help="an input scored on its own under NAME (repeatable): data.val_sources")
    p.add_argument("--objective", choices=OBJECTIVES, default="prefix_lm")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="stop after this many target tokens (the output says truncated)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    p.add_argument("--encoder-length", type=int, default=None,
                   help="default: the run's data.encoder_length (a converted model: its "
                        "max_encoder_length)")
    p.add_argument("--decoder-length", type=int, default=None,
                   help="default: the run's data.decoder_length (a converted model: its "
                        "max_decoder_length)")
    p.add_argument("--seed", type=int, default=0, help="span corruption noise seed")
    p.add_argument("--split", choices=["train", "val"], default="val",
                   help="which shards of a make_shards directory")
    p.add_argument("--txt-docs", choices=["blank-line", "file"], default="blank-line")
    p.add_argument("--text-field", default="text", help="JSON field holding the text")
    p.add_argument("--bad-input", choices=["fail", "skip"], default="fail",
                   help="fail: stop at the first bad input; skip: count, report and go on")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no input summary")
    args = p.parse_args(argv)
    if not args.input and not args.source:
        p.error("give --input, --source NAME=PATH, or both")
    names = [name for name, _ in args.source]
    if len(set(names)) != len(names):
        p.error(f"--source names repeat: {names}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)

    report = InputReport()
    stats = Stats(1, 1)  # the loader's bad-sample counter: one warning per shard and reason
    try:
        model, tok, data, kind = load_model(args.model, args.device)
        settings = make_settings(args.objective, data, tok, model.cfg,
                                 encoder_length=args.encoder_length,
                                 decoder_length=args.decoder_length, seed=args.seed)

        def score(inputs: list[str]) -> dict[str, Any]:
            docs = iter_token_documents(inputs, tok, report, stats, split=args.split,
                                        txt_docs=args.txt_docs, text_field=args.text_field,
                                        policy=args.bad_input)
            return evaluate(model, tok, docs, settings, batch_size=args.batch_size,
                            max_tokens=args.max_tokens, device=args.device,
                            progress=not args.quiet and sys.stderr.isatty())

        result = score(args.input) if args.input else {}
        if args.source:
            result["sources"] = {name: score([path]) for name, path in args.source}
    except (EvalError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if report.files:
            print(report.summary(), file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.quiet or report.problems() or stats.bad:
        print(report.summary(), file=sys.stderr)
    result.update(model=str(args.model), model_kind=kind, inputs=list(args.input),
                  bad_inputs=report.problems(), bad_samples=stats.bad)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
