"""The transformers tokenizer of a trained sentencepiece model (liquid_dist.data.hf_tokenizer):
loaded by AutoTokenizer in a process that cannot import liquid_dist, its ids against
Tokenizer.encode on varied real text, special ids, EOS, decoding, padding, bad input."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tokenizers
from data_fixtures import TMP, scenes, tokenizer_path

from liquid_dist.data import DataError, Tokenizer, train_tokenizer
from liquid_dist.data.hf_tokenizer import (
    HF_TOKENIZER_CONFIG_NAME,
    HF_TOKENIZER_NAME,
    build_backend,
    check_backend,
    write_hf_tokenizer,
)

MAX_LENGTH = 512
SAMPLES = [
    "", " ", "  ", "a", " a", "  a", "a ", "a  ", "a  b", "  leading, inner   and trailing   ",
    "\t", "\tindented\n\tlines", "x\t y", "\n", "\n\n\n", "a\nb", "a \n b ", " \n", "\r\n",
    "line one\r\nline two\r\n", "2026-12-01 3.14159", "x42 1,000,000 0x1F", "café naïve Ünïcödé",
    "日本語のテキスト、中文。", "emoji \U0001f600\U0001f680 end", "\u00a0nbsp \u3000ideographic",
    "ﬁ Ａ ① e\u0301", "a <extra_id_0> b<extra_id_1>c", "<extra_id_0>", "<extra_id_0> a",
    " <extra_id_99>", "<extra_id_5>\n<extra_id_6>", "<extra_id_100> <extra_id_", "<0x41> <0xE6>",
    "\u2581", "\u2581a \u2581\u2581b", "x" * 3000,
]
# decodes: texts without sentinels (skip_special_tokens drops those, sentencepiece keeps them)
DECODED = [t for t in SAMPLES if "<extra_id_" not in t]
LITERAL_SPECIALS = ["a </s> b", "<s><pad><unk>"]


def _indented(texts: Any) -> list[str]:
    """Code-like text: indentation runs and doubled spaces (whitespace-only pieces)."""
    out = []
    for k, text in enumerate(texts):
        lines = text.split("\n")
        out.append("\n".join(" " * (4 * ((i + k) % 4)) + line.replace(", ", ",  ")
                             for i, line in enumerate(lines)))
    return out


@functools.cache
def whitespace_tokenizer_path() -> Path:
    """A 600-piece model of indented text: it has "▁▁▁▁"-style pieces (under 1 s)."""
    return train_tokenizer(_indented(scenes()[:40]), TMP / "ws_tokenizer", vocab_size=600,
                           seed=0, num_threads=2)


@functools.cache
def hf_dir(name: str) -> tuple[Path, tuple[Path, ...]]:
    model = tokenizer_path() if name == "shakespeare" else whitespace_tokenizer_path()
    out = TMP / f"hf_{name}"
    out.mkdir()
    shutil.copyfile(model, out / "tokenizer.model")  # as in a converted model directory
    written = write_hf_tokenizer(out / "tokenizer.model", out, model_max_length=MAX_LENGTH)
    return out, tuple(written)


def texts_for(name: str) -> list[str]:
    if name == "shakespeare":
        return list(scenes()[400:420]) + SAMPLES  # scenes never seen in training
    return _indented(scenes()[400:410]) + SAMPLES


CHILD = r"""
import json, sys
sys.modules["liquid_dist"] = None  # the model directory alone, as on a machine without it
try:
    import liquid_dist  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
import tokenizers
from transformers import AutoTokenizer

request = json.load(sys.stdin)
result = {"liquid_dist_blocked": blocked}
for name, job in request.items():
    tok = AutoTokenizer.from_pretrained(job["dir"])
    raw = tokenizers.Tokenizer.from_file(job["dir"] + "/tokenizer.json")
    texts = job["texts"]
    batch = tok(["a b c d e", "x"], padding=True)
    result[name] = {
        "class": type(tok).__name__, "is_fast": tok.is_fast, "len": len(tok),
        "model_max_length": tok.model_max_length,
        "ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
        "ids_eos": [tok(t)["input_ids"] for t in texts],
        "raw_ids": [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)],
        "literal": [tok(t, add_special_tokens=False)["input_ids"] for t in job["literal"]],
        "literal_no_split": [tok(t, add_special_tokens=False, split_special_tokens=False)
                             ["input_ids"] for t in job["literal"]],
        "special_ids": [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id],
        "special_tokens": [tok.pad_token, tok.eos_token, tok.unk_token, tok.bos_token],
        "sentinel_ids": tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)]),
        "all_special_ids": sorted(tok.all_special_ids),
        "decoded": [tok.decode(ids, skip_special_tokens=True) for ids in job["decode"]],
        "batch_ids": batch["input_ids"], "batch_mask": batch["attention_mask"],
    }
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def hf() -> dict[str, Any]:
    """Everything the transformers side computes, from one child process per module."""
    request = {}
    for name in ("shakespeare", "whitespace"):
        tok = Tokenizer(hf_dir(name)[0] / "tokenizer.model")
        request[name] = {"dir": str(hf_dir(name)[0]), "texts": texts_for(name),
                         "literal": LITERAL_SPECIALS,
                         "decode": [tok.encode(t) for t in DECODED]}
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD], input=json.dumps(request),
                          capture_output=True, text=True, cwd=TMP, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", ["shakespeare", "whitespace"])
def test_autotokenizer_ids_equal_sentencepiece_without_liquid_dist(hf, name):
    assert hf["liquid_dist_blocked"]
    out = hf[name]
    assert out["is_fast"] and out["class"] in ("TokenizersBackend", "PreTrainedTokenizerFast")
    tok = Tokenizer(hf_dir(name)[0] / "tokenizer.model")
    texts = texts_for(name)
    expected = [tok.encode(t) for t in texts]
    for text, want, have in zip(texts, expected, out["ids"], strict=True):
        assert have == want, f"{text[:80]!r}"
    # the tokenizers library alone (its encode_special_tokens default) agrees as well
    assert out["raw_ids"] == expected
    # add_special_tokens (the default) appends exactly eos, as the encoder inputs had
    assert out["ids_eos"] == [ids + [tok.eos_id] for ids in expected]
    assert out["len"] == tok.vocab_size and out["model_max_length"] == MAX_LENGTH


def test_the_whitespace_model_has_whitespace_only_pieces():
    pieces = [p for p, _, _ in Tokenizer(whitespace_tokenizer_path()).pieces()]
    assert "\u2581" * 4 in pieces and "\u2581" * 8 in pieces


@pytest.mark.parametrize("name", ["shakespeare", "whitespace"])
def test_special_and_sentinel_ids(hf, name):
    out = hf[name]
    tok = Tokenizer(hf_dir(name)[0] / "tokenizer.model")
    assert out["special_ids"] == [0, 1, 2, 3]
    assert out["special_tokens"] == ["<pad>", "</s>", "<unk>", "<s>"]
    assert out["sentinel_ids"] == [tok.sentinel_id(i) for i in range(100)]
    assert out["all_special_ids"] == sorted({0, 1, 2, 3, *tok.sentinel_ids})


@pytest.mark.parametrize("name", ["shakespeare", "whitespace"])
def test_decode_skipping_special_tokens_matches_sentencepiece(hf, name):
    tok = Tokenizer(hf_dir(name)[0] / "tokenizer.model")
    for text, decoded in zip(DECODED, hf[name]["decoded"], strict=True):
        assert decoded == tok.decode(tok.encode(text))
        assert decoded == text or "\u2581" in text  # sentencepiece decodes "▁" as a space


def test_batch_padding_is_pad_id_on_the_right(hf):
    tok = Tokenizer(tokenizer_path())
    out = hf["shakespeare"]
    long, short = tok.encode("a b c d e") + [1], tok.encode("x") + [1]
    assert out["batch_ids"] == [long, short + [0] * (len(long) - len(short))]
    assert out["batch_mask"] == [[1] * len(long), [1] * len(short) + [0] * (len(long) -
                                                                             len(short))]


def test_literal_special_token_text_is_the_documented_difference(hf):
    tok = Tokenizer(tokenizer_path())
    out = hf["shakespeare"]
    for text, default, no_split in zip(LITERAL_SPECIALS, out["literal"],
                                       out["literal_no_split"], strict=True):
        sp = tok.encode(text)
        assert not {0, 1, 2, 3} & set(sp)  # sentencepiece spells it
        # cut out as special tokens without split_special_tokens; with it (the default
        # written) still the control ids here, since "<" and ">" are no pieces of this
        # 600-piece vocabulary
        assert {0, 1, 2, 3} & set(no_split) and {0, 1, 2, 3} & set(default)


def test_files_and_config():
    out, written = hf_dir("shakespeare")
    assert written == (out / HF_TOKENIZER_NAME, out / HF_TOKENIZER_CONFIG_NAME)
    config = json.loads((out / HF_TOKENIZER_CONFIG_NAME).read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == MAX_LENGTH and config["split_special_tokens"] is True
    assert config["additional_special_tokens"][:2] == ["<extra_id_0>", "<extra_id_1>"]
    spec = json.loads((out / HF_TOKENIZER_NAME).read_text())
    assert spec["model"]["type"] == "Unigram" and spec["model"]["byte_fallback"] is True
    assert not list(out.glob(".*"))  # no temporary files left


def test_pieces_kinds_and_scores():
    tok = Tokenizer(tokenizer_path())
    pieces = tok.pieces()
    assert tok.model_type == "unigram" and len(pieces) == tok.vocab_size
    kinds = [k for _, _, k in pieces]
    assert kinds[:4] == ["control", "control", "unknown", "control"]
    assert kinds.count("user_defined") == 101 and kinds.count("byte") == 256
    assert pieces[tok.sentinel_id(3)] == ("<extra_id_3>", 0.0, "user_defined")
    assert pieces[tok.piece_to_id("<0x41>")][2] == "byte"
    normal = [(p, s) for p, s, k in pieces if k == "normal"]
    assert len(normal) == tok.vocab_size - 4 - 101 - 256 and all(s < 0 for _, s in normal)


def test_a_pipeline_that_disagrees_is_refused():
    tok = Tokenizer(tokenizer_path())
    backend = build_backend(tok)
    backend.normalizer = tokenizers.normalizers.Replace(" ", "\u2581")  # no dummy prefix
    with pytest.raises(ValueError, match="does not reproduce sentencepiece"):
        check_backend(backend, tok)


def test_bad_input_writes_nothing():
    out = TMP / "hf_refused"
    with pytest.raises(DataError, match="not found"):
        write_hf_tokenizer(TMP / "missing" / "tokenizer.model", out, model_max_length=8)
    with pytest.raises(ValueError, match="model_max_length"):
        write_hf_tokenizer(tokenizer_path(), out, model_max_length=0)
    bpe = train_tokenizer(scenes()[:10], TMP / "bpe_tokenizer", vocab_size=500,
                          model_type="bpe", seed=0, num_threads=2)
    with pytest.raises(ValueError, match="unigram"):
        write_hf_tokenizer(bpe, out, model_max_length=8)
    assert not out.exists()
    # a model directory keeps the BPE model itself, and says why AutoTokenizer cannot load it
    from liquid_dist.data import Tokenizer

    (TMP / "bpe_model_dir").mkdir()
    with pytest.warns(UserWarning, match="no transformers tokenizer files.*unigram"):
        Tokenizer(bpe).save_pretrained(TMP / "bpe_model_dir", model_max_length=64)
    assert (TMP / "bpe_model_dir" / "tokenizer.model").read_bytes() == bpe.read_bytes()
    assert not (TMP / "bpe_model_dir" / HF_TOKENIZER_NAME).exists()
