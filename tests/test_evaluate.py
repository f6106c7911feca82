"""liquid_dist.evaluate: held-out ce / ppl / bits per byte (docs/evaluation.md).

A small randomly initialised model saved with ``save_pretrained`` and the
600-piece tokenizer of tests/train_fixtures.py: no training needed, except in
the one test that evaluates a training checkpoint (the 2-step run shared with
tests/test_plot.py). The references are computed here, one example at a time
and without padding: tokenise, build the windows or chunks, run the model, sum
the cross-entropy over the targets, count the bytes.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import train_fixtures as tf
from data_fixtures import scenes, write_jsonl
from test_plot import two_step_run

from liquid_dist.config import load_config
from liquid_dist.convert import load_trained_model
from liquid_dist.data import Tokenizer, example_shape, read_manifest, span_corruption
from liquid_dist.data.prep import PrepSettings, prepare_shards
from liquid_dist.evaluate import ByteCounter, main
from liquid_dist.model import LiquidFoundationModelOptimized

LE, LD = 32, 16  # the micro model's maximum lengths: the example shapes of a converted model
UNICODE_DOC = "Café naïve — 中文 😀 ½ end"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The micro model's tiny matrices gain nothing from a second thread, and two threads
    on a busy 2-core machine spin-wait each other (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def tok() -> Tokenizer:
    return Tokenizer(tf.train_data().tokenizer)


@functools.cache
def model_dir() -> Path:
    cfg = load_config(tf.REPO / "configs" / "tiny.yaml", tf.MICRO_MODEL + [
        f"model.vocab_size={tok().vocab_size}", f"data.encoder_length={LE}",
        f"data.decoder_length={LD}"])
    torch.manual_seed(0)
    model = LiquidFoundationModelOptimized(cfg.model)
    out = model.save_pretrained(tf.TMP / "eval_model")
    return tok().save_pretrained(out, model_max_length=cfg.model.max_encoder_length)


@functools.cache
def model() -> LiquidFoundationModelOptimized:
    return LiquidFoundationModelOptimized.from_pretrained(str(model_dir()))


@functools.cache
def documents() -> tuple[str, ...]:
    """Speeches of a scene the tokenizer never saw (blank-line-free, so they read back
    from .txt unchanged), a one-token document, and one with byte-fallback characters."""
    blocks = [b.strip("\n") for b in scenes()[130].split("\n\n")]
    blocks = [b for b in blocks if b and all(line.strip() for line in b.split("\n"))]
    docs = tuple(blocks[:12]) + ("I", UNICODE_DOC)
    assert len(tok().encode("I")) == 1
    assert all(tok().decode(tok().encode(d)) == d for d in docs)
    return docs


def ascii_documents() -> tuple[str, ...]:
    return tuple(d for d in documents() if d.isascii())


def evaluate(capsys, *args: str, model: Path | None = None) -> dict:
    rc = main([str(model or model_dir()), *args, "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)  # exactly one JSON object on stdout


def text_bytes(ids: list[int]) -> list[int]:
    """Bytes per token from decoding prefixes (exact for text whose every prefix decodes
    to a prefix of it, e.g. ASCII)."""
    lengths = [len(tok().decode(ids[:k]).encode("utf-8")) for k in range(len(ids) + 1)]
    return [b - a for a, b in zip(lengths[:-1], lengths[1:], strict=True)]


@functools.cache
def direct_prefix_lm(texts: tuple[str, ...]) -> list[float]:
    """:func:`direct_prefix_lm_of` the saved random model (computed once per text set)."""
    return direct_prefix_lm_of(model(), texts)


@torch.no_grad()
def direct_prefix_lm_of(net, texts) -> list[float]:
    """Per-target cross-entropy, in order: each document + EOS in windows of LD targets,
    the LE - 1 tokens before a window + EOS as its encoder input."""
    eos, start = tok().eos_id, tok().bos_id  # prefix LM's decoder starts with bos
    nll: list[float] = []
    for text in texts:
        seq = tok().encode(text) + [eos]
        for s in range(0, len(seq), LD):
            enc, tgt = seq[max(0, s - (LE - 1)): s] + [eos], seq[s: s + LD]
            logits = net(torch.tensor([enc]), torch.tensor([[start] + tgt[:-1]])).logits[0]
            nll += F.cross_entropy(logits.float(), torch.tensor(tgt), reduction="none").tolist()
    return nll


@torch.no_grad()
def direct_span_corruption(texts, seed: int = 0) -> tuple[float, int, int, int]:
    """(nats, targets, bytes of the noise text, examples): chunks of the training chunk
    length (a last 1-token chunk takes one from the one before), noise drawn from
    SeedSequence([seed, blake2b-64 of the document's ids])."""
    t = tok()
    n = example_shape("span_corruption", encoder_length=LE, decoder_length=LD,
                      noise_density=0.15, mean_noise_span_length=3.0,
                      max_spans=t.num_sentinels).raw
    nats, targets, n_bytes, examples = 0.0, 0, 0, 0
    for text in texts:
        ids = t.encode(text)
        seq = np.array(ids + [t.eos_id], dtype=np.int64)
        per_token = text_bytes(ids) + [0]
        digest = hashlib.blake2b(np.asarray(ids, "<i8").tobytes(), digest_size=8).digest()
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [seed, int.from_bytes(digest, "little")])))
        cuts = list(range(0, len(seq), n)) + [len(seq)]
        if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
            cuts[-2] -= 1
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            same = copy.deepcopy(rng)
            enc, tgt = span_corruption(seq[a:b], rng, noise_density=0.15,
                                       mean_noise_span_length=3.0,
                                       sentinel_ids=t.sentinel_ids, eos_id=t.eos_id)
            # the same draws on positions say which chunk tokens are noise
            _, where = span_corruption(np.arange(a, b), same, noise_density=0.15,
                                       mean_noise_span_length=3.0,
                                       sentinel_ids=[-1] * t.num_sentinels, eos_id=-1)
            n_bytes += sum(per_token[p] for p in where if p >= 0)
            dec = np.concatenate(([t.pad_id], tgt[:-1]))
            logits = model()(torch.from_numpy(enc)[None], torch.from_numpy(dec)[None]).logits[0]
            nats += float(F.cross_entropy(logits.float(), torch.from_numpy(tgt), reduction="sum"))
            targets += len(tgt)
            examples += 1
    return nats, targets, n_bytes, examples


def test_token_bytes_add_up_to_each_documents_text():
    counter = ByteCounter(tok())
    tricky = ["  leading spaces", "\n\nnewlines first", "tabs\tand\r\nCRLF  ", " ", "😀",
              "中", "é", "<extra_id_3> is a literal sentinel", "x\x00y", UNICODE_DOC]
    for text in [*scenes()[130:170], *tricky]:
        ids = np.asarray(tok().encode(text))
        assert tok().decode(ids.tolist()) == text
        assert counter.document(ids).sum() == len(text.encode("utf-8")), repr(text)
    # every prefix covers exactly the bytes of the text it decodes to
    ids = tok().encode(ascii_documents()[5])[:300]
    assert np.cumsum(counter.document(np.asarray(ids))).tolist() == np.cumsum(
        text_bytes(ids)).tolist()


def test_prefix_lm_is_the_direct_computation(tmp_path, capsys):
    texts = documents()
    got = evaluate(capsys, "--input", str(write_jsonl(tmp_path / "docs.jsonl", texts)))
    nll = direct_prefix_lm(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert got["tokens"] == len(nll) == sum(len(tok().encode(t)) + 1 for t in texts)
    assert got["bytes"] == n_bytes
    assert got["documents"] == len(texts) and got["truncated"] is False
    assert got["examples"] == sum(math.ceil((len(tok().encode(t)) + 1) / LD) for t in texts)
    assert got["ce"] == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(sum(nll) / math.log(2) / n_bytes, rel=1e-6)
    assert (got["objective"], got["encoder_length"], got["decoder_length"]) == (
        "prefix_lm", LE, LD)
    assert got["model_kind"] == "converted" and got["bad_inputs"] == {}


def test_span_corruption_is_the_direct_computation(tmp_path, capsys):
    texts = ascii_documents()
    src = str(write_jsonl(tmp_path / "docs.jsonl", texts))
    got = evaluate(capsys, "--input", src, "--objective", "span_corruption")
    nats, targets, n_bytes, examples = direct_span_corruption(texts)
    assert (got["tokens"], got["bytes"], got["examples"]) == (targets, n_bytes, examples)
    assert 0 < n_bytes < sum(len(t) for t in texts)  # the noise spans' text only
    assert got["ce"] == pytest.approx(nats / targets, rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
    other_seed = evaluate(capsys, "--input", src, "--objective", "span_corruption",
                          "--seed", "1")
    assert other_seed["tokens"] == targets and other_seed["ce"] != got["ce"]


def write_txt(path: Path, texts) -> Path:
    data = "\n\n".join(texts) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.mark.parametrize("objective", ["prefix_lm", "span_corruption"])
def test_numbers_do_not_depend_on_files_formats_or_batch_size(tmp_path, capsys, objective):
    texts = documents()
    one = write_jsonl(tmp_path / "one.jsonl", texts)
    tree = tmp_path / "tree"
    tree.mkdir()
    write_txt(tree / "a.txt", texts[:5])
    with gzip.open(tree / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": t}) + "\n" for t in texts[5:])
    three = [write_txt(tmp_path / "x.txt.gz", texts[:3]),
             write_jsonl(tmp_path / "y.jsonl", texts[3:9]), write_txt(tmp_path / "z.md", texts[9:])]
    base = ["--objective", objective]
    runs = [evaluate(capsys, "--input", str(one), *base),
            evaluate(capsys, "--input", str(tree), *base),
            evaluate(capsys, "--input", *map(str, three), *base)]
    batched = evaluate(capsys, "--input", str(one), "--batch-size", "3", *base)
    keys = ("tokens", "bytes", "documents", "examples")
    for r in runs[1:] + [batched]:
        assert [r[k] for k in keys] == [runs[0][k] for k in keys]
    for r in runs[1:]:
        assert r["ce"] == pytest.approx(runs[0]["ce"], rel=1e-12)
        assert r["bits_per_byte"] == pytest.approx(runs[0]["bits_per_byte"], rel=1e-12)
    assert batched["ce"] == pytest.approx(runs[0]["ce"], rel=1e-6)
    assert runs[0]["documents"] == len(texts)


def test_max_tokens_stops_after_n_targets(tmp_path, capsys):
    texts = ascii_documents()
    src = str(write_jsonl(tmp_path / "docs.jsonl", texts))
    nll = direct_prefix_lm(texts)
    n = 150  # inside a window of the 4th document
    got = evaluate(capsys, "--input", src, "--max-tokens", str(n))
    sizes = [len(tok().encode(t)) + 1 for t in texts]
    full = int(np.searchsorted(np.cumsum(sizes), n))  # documents before the cut
    k = n - sum(sizes[:full])
    assert k % LD and k < sizes[full], "the cut should split a window of a document's text"
    cut_ids = tok().encode(texts[full])[:k]
    n_bytes = sum(len(t) for t in texts[:full]) + sum(text_bytes(cut_ids))
    assert (got["tokens"], got["bytes"], got["documents"], got["truncated"]) == (
        n, n_bytes, full + 1, True)
    assert got["ce"] == pytest.approx(sum(nll[:n]) / n, rel=1e-6)
    everything = evaluate(capsys, "--input", src, "--max-tokens", str(len(nll)))
    assert everything["truncated"] is False and everything["tokens"] == len(nll)
    assert everything["ce"] == pytest.approx(sum(nll) / len(nll), rel=1e-6)


def test_max_tokens_counts_the_bytes_of_a_split_character(tmp_path, capsys):
    src = str(write_jsonl(tmp_path / "a.jsonl", ["a中b"]))
    ids = tok().encode("a中b")
    assert [tok().id_to_piece(i) for i in ids] == ["▁a", "<0xE4>", "<0xB8>", "<0xAD>", "b"]
    seen = [evaluate(capsys, "--input", src, "--max-tokens", str(k)) for k in range(1, 7)]
    # "a" 1 byte, then the 3 bytes of 中 one byte-fallback piece each, "b", EOS (no bytes)
    assert [r["bytes"] for r in seen] == [1, 2, 3, 4, 5, 5]
    assert [r["tokens"] for r in seen] == [1, 2, 3, 4, 5, 6]
    assert [r["truncated"] for r in seen] == [True] * 5 + [False]


def test_span_corruption_of_a_one_token_document_has_no_bytes(tmp_path, capsys):
    # "I" + EOS is one 2-token chunk: "I" stays in the encoder, EOS is the noise span
    got = evaluate(capsys, "--input", str(write_jsonl(tmp_path / "i.jsonl", ["I"])),
                   "--objective", "span_corruption")
    assert (got["tokens"], got["bytes"], got["bits_per_byte"]) == (3, 0, None)
    assert got["ce"] > 0


def test_shards_score_like_the_text_they_were_made_from(tmp_path, capsys):
    texts = documents()
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    shards = tmp_path / "shards"
    prepare_shards([src], shards, PrepSettings(str(tf.train_data().tokenizer),
                                               shard_size_mb=0.005))
    manifest = read_manifest(shards)
    tars = [str(shards / s["name"]) for s in manifest["shards"]]
    assert len(tars) > 1
    text = evaluate(capsys, "--input", str(src))
    for inputs in ([str(shards)], tars):
        got = evaluate(capsys, "--input", *inputs, "--split", "train")
        keys = ("tokens", "bytes", "documents", "examples", "ce", "bits_per_byte")
        assert [got[k] for k in keys] == [text[k] for k in keys]
        assert got["tokens"] == manifest["totals"]["train"]["tokens"] + len(texts)
        assert got["bad_samples"] == {}
    # the mapping of data.val_sources: each named input scored on its own
    named = evaluate(capsys, "--source", f"text={src}", "--source", f"shards={shards}",
                     "--split", "train")
    assert "ce" not in named and sorted(named["sources"]) == ["shards", "text"]
    for got in named["sources"].values():
        assert [got[k] for k in keys] == [text[k] for k in keys]
    with pytest.raises(SystemExit, match="2"):  # argparse: the names repeat
        main([str(model_dir()), "--source", f"text={src}", "--source", f"text={src}"])
    assert "--source names repeat" in capsys.readouterr().err
    Path(tars[0]).write_bytes(Path(tars[0]).read_bytes()[:700])  # cut inside a sample
    assert main([str(model_dir()), "--input", str(shards), "--split", "train", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert tars[0] in err and "unreadable_shard" in err, err


def bad_case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(arguments, what the error must say) of one bad input."""
    good = write_jsonl(tmp_path / "good.jsonl", ["To be, or not to be"])
    if case == "missing_file":
        return [str(model_dir()), "--input", str(good), str(tmp_path / "nope.txt")], \
            "nope.txt: unreadable"
    if case == "empty_file":
        (tmp_path / "empty.txt").write_text("\n\n")
        return [str(model_dir()), "--input", str(tmp_path / "empty.txt")], "empty"
    if case == "corrupt_gzip":
        (tmp_path / "bad.jsonl.gz").write_bytes(b"this is not gzip")
        return [str(model_dir()), "--input", str(tmp_path / "bad.jsonl.gz")], \
            "bad.jsonl.gz: unreadable"
    if case == "shards_and_text":
        return [str(model_dir()), "--input", str(tf.train_data().shards), str(good)], \
            "mixes shards and text files"
    if case == "no_text_inside":
        (tmp_path / "dir").mkdir()
        (tmp_path / "dir" / "weights.bin").write_bytes(b"\0\1")
        return [str(model_dir()), "--input", str(tmp_path / "dir")], "no documents to score"
    assert case == "not_a_model"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return [str(tmp_path / "model"), "--input", str(good)], \
        "neither a converted model directory"


@pytest.mark.parametrize("case", ["missing_file", "empty_file", "corrupt_gzip",
                                  "no_text_inside", "shards_and_text", "not_a_model"])
def test_bad_input_exits_2_naming_it(tmp_path, capsys, case):
    args, message = bad_case(tmp_path, case)
    assert main([*args, "--quiet"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("error: ") and message in out.err, out.err


def test_skip_counts_bad_inputs_and_scores_the_rest(tmp_path, capsys):
    good = str(write_jsonl(tmp_path / "good.jsonl", documents()))
    alone = evaluate(capsys, "--input", good)
    rc = main([str(model_dir()), "--input", good, str(tmp_path / "nope.txt"),
               "--bad-input", "skip", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0
    got = json.loads(out.out)
    assert got["bad_inputs"] == {"nope.txt": {"unreadable": 1}}
    assert "unreadable: 1" in out.err  # data_prep's report, on stderr
    assert [got[k] for k in ("tokens", "bytes", "ce")] == [alone[k] for k in
                                                            ("tokens", "bytes", "ce")]


@pytest.mark.slow
def test_a_training_run_or_checkpoint_is_evaluated_with_its_own_model(tmp_path, capsys):
    run = two_step_run()
    texts = documents()
    src = str(write_jsonl(tmp_path / "docs.jsonl", texts))
    proc = subprocess.run([sys.executable, "-m", "liquid_dist.evaluate", str(run), "--input",
                           src], cwd=tf.REPO, env=tf.env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert proc.stdout.count("\n") == 1 and got["model_kind"] == "checkpoint"
    assert f"1 input files, {len(texts)} documents" in proc.stderr
    trained, _ = load_trained_model(run)
    nll = direct_prefix_lm_of(trained, texts)
    assert got["tokens"] == len(nll)
    assert got["ce"] == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    step_dir = run / "checkpoints" / "step_00000002"
    assert evaluate(capsys, "--input", src, model=step_dir)["ce"] == got["ce"]
