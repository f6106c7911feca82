"""The Hugging Face tokenizer of a trained sentencepiece model: ``tokenizer.json`` (the
``tokenizers`` pipeline) and ``tokenizer_config.json`` beside it, so that
``transformers.AutoTokenizer.from_pretrained(model_dir)`` loads a fast tokenizer whose
ids are those of :meth:`liquid_dist.data.Tokenizer.encode`, with no ``liquid_dist`` and
no remote code (``tokenizer_class`` ``PreTrainedTokenizerFast``, the generic class that
loads ``tokenizer.json`` as it is; model classes such as ``T5Tokenizer`` rebuild their
own pipeline and give other ids).

How sentencepiece encodes (unigram, the settings of ``train_tokenizer``): the text is
normalised (identity), a dummy-prefix ``"▁"`` is prepended and every space becomes
``"▁"``; then one Viterbi search over the whole string picks the pieces of highest total
score. Normal pieces score their log-probability; user-defined pieces (the sentinels and
``"\\n"``) score ``len(bytes) * max(FLT_MIN, max score) - 0.1``, about -0.1, which makes
them win; control, unknown and byte pieces are not in its piece trie, so text never
matches them; a character no piece covers is an unknown node that byte fallback turns
into ``<0xNN>`` pieces. The pipeline here is that search, not an approximation of it:

* normalizer: ``Replace(" ", "▁")`` then ``Prepend("▁")``, on the whole text;
* pre-tokenizer: ``Split`` isolating every ASCII digit (and every user-defined piece
  that contains one, the sentinels), only when no other piece holds a digit with another
  character (``split_digits=True``), so no piece crosses a cut; it keeps literal
  ``<0xNN>`` text from matching a byte piece. No whitespace split: sentencepiece's
  unigram search does not split words, and whitespace-only pieces (``"▁▁▁▁"``, from
  ``allow_whitespace_only_pieces``) join a run of spaces to either side;
* model: ``Unigram`` over the same vocabulary and ids, with sentencepiece's scores:
  normal pieces their score, user-defined pieces the score above, control / unknown /
  byte / unused pieces a score too low to ever beat the normal pieces that spell the same
  text; ``unk_id`` 2, ``byte_fallback``;
* decoder: ``Replace("▁", " ")``, ``ByteFallback``, ``Fuse``, ``Strip`` of one leading
  space (the dummy prefix);
* post-processor: ``$A </s>`` (and ``$A </s> $B </s>``), so ``add_special_tokens=True``
  (the default of ``tokenizer(text)``) appends EOS as every encoder input of training
  ends with it (as T5's tokenizer does); ``add_special_tokens=False`` gives the ids of
  :meth:`Tokenizer.encode`.
* ``tokenizer_config.json``: pad/eos/unk/bos tokens (ids 0/1/2/3), the sentinels as
  ``additional_special_tokens`` (special: ``skip_special_tokens`` drops them),
  ``split_special_tokens: true`` and ``clean_up_tokenization_spaces: false``.

``split_special_tokens: true`` matters: special tokens are then left in the text for the
search above (which picks the sentinels by itself, exactly as sentencepiece does) instead
of being cut out first. Cut out first (``split_special_tokens=False``), each piece of
text between them gets its own dummy prefix, which sentencepiece does not do: ids
around the sentinels change. ``tokenizer.json`` itself lists only pad/eos/unk/bos as
added tokens (transformers adds the sentinels from the config), so the ``tokenizers``
library used directly, whose ``encode_special_tokens`` defaults to false and is not
saved, cuts out only those four; a ``tokenizer.json`` re-saved by transformers lists the
sentinels too.

Known differences from sentencepiece:

* The literal text of a control piece, ``"</s>"``, ``"<s>"``, ``"<pad>"``, ``"<unk>"``:
  sentencepiece spells it with ordinary pieces. With ``split_special_tokens=False`` HF
  encodes it as the special token. With the written default (true) it is spelled like
  sentencepiece when the vocabulary has a single-character piece for each of its
  characters, and is the special token's id otherwise (HF's search, unlike
  sentencepiece's, can match those pieces, and its unknown-character penalty is below
  them).
* Very long documents: sentencepiece sums path scores in float32, HF in float64; past
  roughly 10^5 tokens in one ``encode`` call, float32 rounding makes sentencepiece pick a
  different segmentation of a word at about 1 in 10^5 tokens.
* ``decode``: control pieces decode to nothing in sentencepiece, to their text in HF
  unless ``skip_special_tokens=True`` (which also drops the sentinels); ``<unk>`` is
  ``" ⁇ "`` in sentencepiece; a run of byte pieces that is not valid UTF-8 becomes one
  U+FFFD per byte in HF, one per invalid byte in sentencepiece; HF strips the leading
  space of the text even when a byte piece (``<0x20>``) wrote it. Ids from ``encode``
  without sentinels decode identically with ``skip_special_tokens=True``.

:func:`write_hf_tokenizer` checks the pipeline against sentencepiece on probe texts and on
every piece of the vocabulary before writing anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

from liquid_dist.atomic import write_atomic
from liquid_dist.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SENTINEL_FORMAT,
    UNK_ID,
    Tokenizer,
)

HF_TOKENIZER_NAME = "tokenizer.json"
HF_TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPACE = "\u2581"  # sentencepiece's whitespace symbol
_FLT_MIN = 1.1754943508222875e-38  # sentencepiece initialises its max score with it
_USER_DEFINED_BONUS = 0.1  # sentencepiece's unigram_model.cc: length * max_score - 0.1
_UNREACHABLE = ("control", "unknown", "byte", "unused")  # not in sentencepiece's trie
_PROBE_PIECES_PER_TEXT = 32
PROBE_TEXTS = (
    "", " ", "  ", "a", " a", "a ", "  leading, inner   and trailing spaces  ",
    "Hello, world! It's 9 o'clock.", "\ttab\t\tand\nnewlines\n\n\nand\r\nCRLF\n",
    "2026-12-01 3.14159 x42 0x1F", "café naïve Ünïcödé ß", "日本語のテキスト、中文。",
    "emoji \U0001f600\U0001f680 and \u00a0nbsp \u3000ideographic", "ﬁ Ａ ① e\u0301 ™",
    f"{SPACE} literal {SPACE}{SPACE}marks", "<extra_id_x> < > </ <extra_id_0",
)


class NotReproducible(ValueError):
    """A sentencepiece model this construction does not reproduce exactly."""


def write_hf_tokenizer(model_path: Union[str, Path], out_dir: Union[str, Path], *,
                       model_max_length: int) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for the sentencepiece
    model at ``model_path`` into ``out_dir`` (created if missing); returns their paths.

    ``model_max_length`` is what ``transformers`` warns beyond and truncates to. Raises
    DataError for a missing or invalid model, :class:`NotReproducible` for one this
    construction does not reproduce (not unigram, or a pipeline that disagrees with
    sentencepiece on the probes), both before anything is written.
    """
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) \
            or model_max_length < 1:
        raise ValueError(f"model_max_length must be a positive int, got {model_max_length!r}")
    tok = Tokenizer(model_path)
    backend = build_backend(tok)
    check_backend(backend, tok)
    config = tokenizer_config(tok, model_max_length)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in ((HF_TOKENIZER_NAME, backend.to_str(pretty=True) + "\n"),
                       (HF_TOKENIZER_CONFIG_NAME, json.dumps(config, indent=2) + "\n")):
        write_atomic(out / name, text)
        written.append(out / name)
    return written


def build_backend(tok: Tokenizer) -> Any:
    """The ``tokenizers.Tokenizer`` of ``tok`` (see the module docstring)."""
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers import Tokenizer as HFTokenizer

    if tok.model_type != "unigram":
        raise NotReproducible(f"{tok.path}: a {tok.model_type} sentencepiece model; only unigram "
                         "models are reproduced by the tokenizers pipeline")
    pieces = tok.pieces()
    if len({p for p, _, _ in pieces}) != len(pieces):
        raise NotReproducible(f"{tok.path}: a piece string is defined twice")
    normal = [score for _, score, kind in pieces if kind == "normal"]
    if not normal:
        raise NotReproducible(f"{tok.path}: no normal pieces")
    user_score_per_byte = max(_FLT_MIN, max(normal))
    longest = max((len(p) for p, _, kind in pieces if kind in _UNREACHABLE), default=1)
    # below any path of normal pieces over the same characters (each scores >= min(normal))
    unreachable = min(min(normal), 0.0) * longest - 10.0
    vocab = []
    for piece, score, kind in pieces:
        if kind == "user_defined":
            score = len(piece.encode("utf-8")) * user_score_per_byte - _USER_DEFINED_BONUS
        elif kind in _UNREACHABLE:
            score = unreachable
        vocab.append((piece, float(score)))
    has_bytes = any(kind == "byte" for _, _, kind in pieces)
    backend = HFTokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=has_bytes))
    backend.normalizer = normalizers.Sequence([normalizers.Replace(" ", SPACE),
                                               normalizers.Prepend(SPACE)])
    pattern = _digit_split_pattern(pieces)
    if pattern is not None:
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    eos = pieces[EOS_ID][0]
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
        special_tokens=[(eos, EOS_ID)])
    backend.add_special_tokens([AddedToken(pieces[i][0], special=True, normalized=False)
                                for i in (PAD_ID, EOS_ID, UNK_ID, BOS_ID)])
    return backend


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json``: the class, special tokens and settings ``transformers``
    reads beside ``tokenizer.json`` (5.x; the names are those 4.x reads as well)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "padding_side": "right",
        "truncation_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
        "pad_token": tok.id_to_piece(PAD_ID),
        "eos_token": tok.id_to_piece(EOS_ID),
        "unk_token": tok.id_to_piece(UNK_ID),
        "bos_token": tok.id_to_piece(BOS_ID),
        # the v4 name; transformers 5 reads it as extra_special_tokens
        "additional_special_tokens": [SENTINEL_FORMAT.format(i)
                                      for i in range(tok.num_sentinels)],
        "add_bos_token": False,
        "add_eos_token": True,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }


def check_backend(backend: Any, tok: Tokenizer) -> None:
    """ValueError unless ``backend`` encodes like ``tok`` (and decodes those ids like it)
    on :data:`PROBE_TEXTS` and on texts spelling every normal and user-defined piece."""
    texts = list(PROBE_TEXTS) + list(_vocabulary_texts(tok))
    texts += [" ".join(SENTINEL_FORMAT.format(i) for i in range(tok.num_sentinels))]
    expected = tok.encode_batch(texts)
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True  # as transformers with split_special_tokens
    try:
        got = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = previous
    for text, want, have in zip(texts, expected, got, strict=True):
        if want != have:
            raise NotReproducible(f"{tok.path}: the tokenizers pipeline does not reproduce "
                             f"sentencepiece on {text[:200]!r}: {have[:50]} != {want[:50]}")
        if backend.decode(have) != tok.decode(want):
            raise NotReproducible(f"{tok.path}: the tokenizers decoder does not reproduce "
                             f"sentencepiece on {text[:200]!r}")


def _vocabulary_texts(tok: Tokenizer) -> Iterator[str]:
    """Every normal and user-defined piece as text, a few dozen to a text (short texts:
    sentencepiece's float32 path scores stay exact enough)."""
    spelled = [p.replace(SPACE, " ") for p, _, kind in tok.pieces()
               if kind in ("normal", "user_defined")]
    for start in range(0, len(spelled), _PROBE_PIECES_PER_TEXT):
        yield " ".join(spelled[start: start + _PROBE_PIECES_PER_TEXT])


def _digit_split_pattern(pieces: list[tuple[str, float, str]]) -> Optional[str]:
    """The regex isolating each ASCII digit and each user-defined piece holding one; None
    if a normal piece holds a digit with another character (no split_digits)."""
    whole = []
    for piece, _, kind in pieces:
        if len(piece) > 1 and re.search("[0-9]", piece):
            if kind == "normal":
                return None
            if kind == "user_defined":
                whole.append(piece)
    return "|".join([re.escape(p) for p in sorted(whole, key=len, reverse=True)] + ["[0-9]"])
