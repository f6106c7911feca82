"""The sentencepiece tokenizer: training with fixed special ids, and a small wrapper.

Fixed ids (the model relies on them): pad=0 (also the decoder start token of
span corruption), eos=1, unk=2, bos=3 (the decoder start token of prefix LM,
i.e. of text continuation); then the sentinels ``<extra_id_0>``.. used by span
corruption, then ``"\\n"`` as its own piece. Normalisation is the identity and
extra whitespace is kept, with byte fallback, so ``decode(encode(text)) == text``
for any text (line breaks, tabs and unseen characters included).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import sentencepiece as spm

from liquid_dist.data.errors import DataError
from liquid_dist.data.shards import ids_dtype_for_vocab

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
DECODER_START_IDS = {"span_corruption": PAD_ID, "prefix_lm": BOS_ID}
"""The decoder's first input per objective: it tells the decoder which task it decodes
for. Span corruption starts with pad, as in T5, and its targets are sentinel-delimited
spans; prefix LM starts with bos and its targets are the text's own continuation, so a
decoder started with bos writes text (``generate``'s default, docs/model.md)."""
SENTINEL_FORMAT = "<extra_id_{}>"
MODEL_NAME = "tokenizer.model"
SETTINGS_NAME = "tokenizer_settings.json"  # not tokenizer.json: transformers' file
# sentencepiece skips longer training sentences; long lines are cut instead
_MAX_TRAIN_LINE_CHARS = 4000
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class Tokenizer:
    """A trained ``tokenizer.model``: encode/decode and the special ids.

    ``vocab_size`` is the model's vocabulary (what ``model.vocab_size: auto``
    takes). Raises DataError if the file is missing or lacks the fixed ids.
    """

    def __init__(self, model_path: Union[str, Path]):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: tokenizer model not found "
                            "(train one with data_prep/train_tokenizer.py)")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
        if got != (PAD_ID, EOS_ID, UNK_ID, BOS_ID):
            raise DataError(f"{self.path}: special ids (pad, eos, unk, bos) = {got}, "
                            f"expected {(PAD_ID, EOS_ID, UNK_ID, BOS_ID)}")
        sentinels = []
        while True:
            i = self._sp.piece_to_id(SENTINEL_FORMAT.format(len(sentinels)))
            if i == UNK_ID:
                break
            sentinels.append(i)
        self._sentinels = tuple(sentinels)
        self._sha256: Optional[str] = None

    def save_pretrained(self, path: Union[str, Path], *, model_max_length: int) -> Path:
        """Save this tokenizer into the model directory ``path``: the sentencepiece model as
        ``tokenizer.model`` (what ``python -m liquid_dist.generate`` reads) and its
        ``transformers`` tokenizer files (``AutoTokenizer``; ``model_max_length``: the
        model's longest input). A model those cannot reproduce exactly (a BPE one) gets
        none, with a warning saying so. Returns ``path``."""
        from liquid_dist.data.hf_tokenizer import NotReproducible, write_hf_tokenizer

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if self.path.resolve() != (out / MODEL_NAME).resolve():
            shutil.copyfile(self.path, out / MODEL_NAME)
        try:
            write_hf_tokenizer(out / MODEL_NAME, out, model_max_length=model_max_length)
        except NotReproducible as exc:
            warnings.warn(f"{out}: no transformers tokenizer files (AutoTokenizer will not "
                          f"load this directory): {exc}", stacklevel=2)
        return out

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID
    bos_id = BOS_ID

    @property
    def num_sentinels(self) -> int:
        return len(self._sentinels)

    @property
    def sentinel_ids(self) -> tuple[int, ...]:
        """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... in order."""
        return self._sentinels

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_{i}>``; IndexError past the last sentinel."""
        return self._sentinels[i]

    @property
    def ids_dtype(self) -> str:
        """'uint16' or 'uint32': how shards store this vocabulary's ids."""
        return ids_dtype_for_vocab(self.vocab_size)

    @property
    def sha256(self) -> str:
        """sha256 of the model file; manifests record it to catch mismatched shards."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return self._sha256

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without BOS/EOS (the objectives add EOS where it belongs)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; pad/eos/bos decode to nothing, sentinels to their piece."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    @functools.cached_property
    def piece_bytes(self) -> np.ndarray:
        """Per id, the UTF-8 bytes of the text it stands for inside a text: its piece with
        "\u2581" as a space (a sentinel its literal text), 1 for a byte-fallback piece
        (``<0xNN>``), 0 for pad, EOS and BOS (int64, ``vocab_size`` long)."""
        table = np.zeros(self.vocab_size, dtype=np.int64)
        silent = {self.pad_id, self.eos_id, self.bos_id}
        for i in range(self.vocab_size):
            if i in silent:
                continue
            piece = self.id_to_piece(i)
            table[i] = 1 if _BYTE_PIECE.match(piece) else len(
                piece.replace("\u2581", " ").encode("utf-8"))
        return table

    def is_byte_piece(self, i: int) -> bool:
        return bool(_BYTE_PIECE.match(self.id_to_piece(i)))

    def piece_to_id(self, piece: str) -> int:
        return int(self._sp.piece_to_id(piece))

    def pieces(self) -> list[tuple[str, float, str]]:
        """``(piece, score, kind)`` for every id in order; kind is the model's piece type
        in lower case ("normal", "unknown", "control", "user_defined", "unused", "byte")."""
        pieces = self._proto.pieces
        kinds = type(pieces[0]).Type
        return [(p.piece, p.score, kinds.Name(p.type).lower()) for p in pieces]

    @property
    def model_type(self) -> str:
        """The sentencepiece algorithm: "unigram" (what train_tokenizer trains), "bpe", ..."""
        proto = self._proto
        spec = proto.trainer_spec
        return type(spec).ModelType.Name(spec.model_type).lower()

    @functools.cached_property
    def _proto(self):
        """The model file as sentencepiece's own ModelProto message (parsed once)."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        return proto

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), _MAX_TRAIN_LINE_CHARS):
                piece = line[start: start + _MAX_TRAIN_LINE_CHARS]
                if piece.strip():
                    yield piece


def train_tokenizer(texts: Iterable[str], output_dir: Union[str, Path], *, vocab_size: int,
                    model_type: str = "unigram", num_sentinels: int = 100,
                    character_coverage: float = 0.9995, input_sentence_size: int = 2_000_000,
                    seed: int = 0, num_threads: int = 2) -> Path:
    """Train sentencepiece on a stream of documents; write tokenizer.model and its
    settings, tokenizer_settings.json.

    ``texts`` is consumed once, line by line, and never held whole: sentencepiece
    keeps a uniform reservoir sample of at most ``input_sentence_size`` lines
    (shuffle_input_sentence). Returns the path of tokenizer.model.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reserved = 4 + num_sentinels + 1 + 256
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size {vocab_size} must exceed the {reserved} reserved pieces "
                         f"(4 specials, {num_sentinels} sentinels, newline, 256 bytes) plus "
                         "the characters of the text")
    spm.set_random_generator_seed(seed)
    lines = {"n": 0}

    def counted() -> Iterator[str]:
        for line in _training_lines(texts):
            lines["n"] += 1
            yield line

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=counted(), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
        user_defined_symbols=[SENTINEL_FORMAT.format(i) for i in range(num_sentinels)]
        + ["\n"],
        byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=character_coverage, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, num_threads=num_threads, minloglevel=2,
    )
    if lines["n"] == 0:
        raise DataError("no training text: every input was empty or unreadable")
    # written only after training succeeded: a failed run leaves no model behind
    model_path = output_dir / MODEL_NAME
    model_path.write_bytes(model.getvalue())
    tok = Tokenizer(model_path)
    settings = {
        "model_type": model_type, "vocab_size": tok.vocab_size, "requested_vocab_size": vocab_size,
        "pad_id": PAD_ID, "eos_id": EOS_ID, "unk_id": UNK_ID, "bos_id": BOS_ID,
        "num_sentinels": num_sentinels, "sentinel_format": SENTINEL_FORMAT,
        "sentinel_ids": [tok.sentinel_ids[0], tok.sentinel_ids[-1]] if num_sentinels else [],
        "newline_id": tok.piece_to_id("\n"), "byte_fallback": True,
        "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
        "split_digits": True, "character_coverage": character_coverage,
        "input_sentence_size": input_sentence_size, "training_lines": lines["n"], "seed": seed,
        "ids_dtype": tok.ids_dtype, "sha256": tok.sha256,
        "sentencepiece_version": spm.__version__,
    }
    (output_dir / SETTINGS_NAME).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    return model_path

