"""Tokenizer: lossless round trip on real text, fixed ids, sentinels, training CLI."""

from __future__ import annotations

import gzip
import io
import json

import pytest
import sentencepiece as spm
from data_fixtures import TMP, VOCAB, load_prep_module, scenes, tokenizer_path

from liquid_dist.data import DataError, Tokenizer


def test_round_trip_is_lossless_on_unseen_shakespeare():
    tok = Tokenizer(tokenizer_path())
    texts = scenes()[400:430]  # never seen in training (scenes 0..79 were)
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    odd = "  two  spaces,\ttab,\n\n\nthree newlines, é, 日本語, emoji \U0001f600 "
    assert tok.decode(tok.encode(odd)) == odd


def test_fixed_special_ids_and_sentinels():
    tok = Tokenizer(tokenizer_path())
    assert tok.vocab_size == VOCAB
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "</s>", "<unk>", "<s>"]
    assert tok.num_sentinels == 100
    assert len(set(tok.sentinel_ids)) == 100 and min(tok.sentinel_ids) > 3
    for i in (0, 7, 99):
        assert tok.id_to_piece(tok.sentinel_id(i)) == f"<extra_id_{i}>"
        # a sentinel in text is one token, never split into pieces
        assert tok.sentinel_id(i) in tok.encode(f"a <extra_id_{i}> b")
    with pytest.raises(IndexError):
        tok.sentinel_id(100)
    settings = json.loads((tokenizer_path().parent / "tokenizer_settings.json").read_text())
    assert settings["sha256"] == tok.sha256
    assert settings["vocab_size"] == VOCAB and settings["byte_fallback"] is True
    assert settings["ids_dtype"] == "uint16" == tok.ids_dtype


def test_model_without_the_fixed_ids_is_rejected():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(scenes()[0].split("\n")),
                                   model_writer=model, vocab_size=120, minloglevel=2)
    path = TMP / "default_ids.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(DataError, match="special ids"):
        Tokenizer(path)
    with pytest.raises(DataError, match="not found"):
        Tokenizer(TMP / "missing.model")


def test_cli_reads_txt_jsonl_gzip_and_directories_and_counts_bad_input():
    root = TMP / "tok_cli"
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    blocks = scenes()[10:14]
    (corpus / "plays.txt").write_text("\n\n".join(b.replace("\n\n", "\n") for b in blocks))
    with gzip.open(corpus / "sub" / "more.jsonl.gz", "wt", encoding="utf-8") as fh:
        for text in scenes()[20:25]:
            fh.write(json.dumps({"body": text}) + "\n")
    (corpus / "sub" / "broken.txt").write_bytes(b"good line\n\nbad \xff\xfe byte\n")
    (corpus / "empty.md").write_text("")
    (corpus / "ignored.bin").write_bytes(b"\x00\x01")
    extra = root / "extra.txt"
    extra.write_text(scenes()[30])
    out = root / "tok"
    cli = load_prep_module("train_tokenizer")
    rc = cli.main(["--input", str(corpus), str(extra), "--vocab-size", "500", "--output",
                   str(out), "--text-field", "body", "--txt-docs", "blank-line",
                   "--input-sentence-size", "200", "--threads", "1", "--no-progress"])
    assert rc == 0
    settings = json.loads((out / "tokenizer_settings.json").read_text())
    report = settings["input_report"]["files"]
    assert report["corpus/plays.txt"]["documents"] == 4
    assert report["corpus/sub/more.jsonl.gz"]["documents"] == 5
    assert report["corpus/sub/broken.txt"] == {"documents": 1, "invalid_utf8": 1}
    assert report["corpus/empty.md"] == {"empty": 1}
    assert "corpus/ignored.bin" not in report
    # more lines than the sample size: sentencepiece trained on a 200-line sample
    assert settings["training_lines"] > 200 == settings["input_sentence_size"]
    tok = Tokenizer(out / "tokenizer.model")
    assert tok.vocab_size == 500 and tok.decode(tok.encode(scenes()[31])) == scenes()[31]
    # policy fail stops at the first bad input, naming the file
    rc = cli.main(["--input", str(corpus), "--vocab-size", "500", "--output", str(root / "t2"),
                   "--bad-input", "fail", "--no-progress"])
    assert rc == 2
    assert not (root / "t2" / "tokenizer.model").exists()
