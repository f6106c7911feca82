"""Text -> tokenised WebDataset shards, in parallel, deterministic and resumable.

Documents are read in input order and numbered (their ordinal is the sample
key). Each is assigned to ``val`` or ``train`` by a hash of (file key,
position in file, split seed), so the split does not depend on worker count,
shard size or where the files live. Tokenisation runs in a process pool over
ordered chunks; the main process writes samples in ordinal order, so the
output bytes do not depend on ``workers``. Tar members carry fixed metadata
(mtime 0, uid/gid 0, mode 0444) for byte-identical reruns.

Resume: the manifest is rewritten (atomically) after every completed shard.
A rerun with the same settings keeps every listed shard whose size and sha256
still match, deletes the rest of that split (a partial ``.tmp`` shard
included), and continues from the document after the last kept shard: the
documents before it are read again (for the input report) but not tokenised.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import multiprocessing
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

from tqdm import tqdm

from liquid_dist.data.errors import DataError
from liquid_dist.data.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SUFFIX_OF_DTYPE,
    encode_ids,
    file_sha256,
    read_manifest,
    sample_files,
    sample_key,
    write_json_atomic,
)
from liquid_dist.data.text_inputs import Document, InputReport, expand_inputs, iter_documents
from liquid_dist.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)
SPLITS = ("train", "val")
_CHUNK_DOCS = 64
_CHUNK_CHARS = 1 << 20


def assign_split(key: str, index: int, val_fraction: float, seed: int) -> str:
    """'val' for a deterministic ``val_fraction`` of documents, else 'train'."""
    if val_fraction <= 0:
        return "train"
    h = hashlib.blake2b(f"{seed}\0{key}\0{index}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") < val_fraction * 2.0**64 else "train"


# ------------------------------------------------------------ tokenisation workers

_worker_tok: Optional[Tokenizer] = None


def _init_worker(model_path: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(model_path)


def _encode_chunk(texts: list[str]) -> list[bytes]:
    assert _worker_tok is not None
    dtype = _worker_tok.ids_dtype
    return [encode_ids(ids, dtype) for ids in _worker_tok.encode_batch(texts)]


def _chunks(docs: Iterable[tuple[int, str, Document]]) -> Iterator[list[tuple[int, str, Document]]]:
    chunk: list[tuple[int, str, Document]] = []
    chars = 0
    for item in docs:
        chunk.append(item)
        chars += len(item[2].text)
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encoded(docs: Iterable[tuple[int, str, Document]], model_path: str,
             workers: int) -> Iterator[tuple[int, str, Document, bytes]]:
    """Tokenise in order; at most 2 * workers chunks in flight, so memory stays bounded."""
    if workers <= 1:
        _init_worker(model_path)
        for chunk in _chunks(docs):
            payloads = _encode_chunk([d.text for _, _, d in chunk])
            for item, payload in zip(chunk, payloads, strict=True):
                yield (*item, payload)
        return
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(model_path,)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _chunks(docs):
            texts = [d.text for _, _, d in chunk]
            pending.append((chunk, pool.apply_async(_encode_chunk, (texts,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                for item, payload in zip(done, result.get(), strict=True):
                    yield (*item, payload)
        while pending:
            done, result = pending.popleft()
            for item, payload in zip(done, result.get(), strict=True):
                yield (*item, payload)


# ------------------------------------------------------------ shard writing


class SplitWriter:
    """Writes one split's shards in order; records each completed shard."""

    def __init__(self, out: Path, split: str, dtype: str, max_bytes: int, kept: list[dict],
                 on_shard: Any):
        self.out, self.split, self.dtype, self.max_bytes = out, split, dtype, max_bytes
        self.shards = list(kept)
        self.on_shard = on_shard
        self.tar: Optional[tarfile.TarFile] = None
        self.tmp: Optional[Path] = None
        self.cur: dict[str, int] = {}

    def add(self, ordinal: int, doc: Document, payload: bytes) -> None:
        if self.tar is None:
            self.tmp = self.out / f"{self.split}-{len(self.shards):06d}.tar.tmp"
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.GNU_FORMAT)
            self.cur = {"documents": 0, "tokens": 0, "first_doc": ordinal}
        meta = {"source": doc.key, "doc": doc.index}
        for name, data in sample_files(sample_key(ordinal), payload, self.dtype, meta):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
        self.cur["documents"] += 1
        self.cur["tokens"] += len(payload) // (2 if self.dtype == "uint16" else 4)
        self.cur["last_doc"] = ordinal
        if self.tar.offset >= self.max_bytes:
            self.close_shard()

    def close_shard(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        assert self.tmp is not None
        final = self.tmp.with_name(self.tmp.name[: -len(".tmp")])
        os.replace(self.tmp, final)
        self.shards.append({"name": final.name, "split": self.split, **self.cur,
                            "bytes": final.stat().st_size, "sha256": file_sha256(final)})
        self.tar = self.tmp = None
        self.on_shard()


class ShardSet:
    """The shards of one output directory being written: a :class:`SplitWriter` per split
    and ``manifest.json``, rewritten after every completed shard.

    ``manifest``: its header (:func:`manifest_header` and the writer's own fields);
    ``kept``: per split, the shards kept from an earlier run.
    """

    def __init__(self, out: Path, manifest: dict[str, Any], shard_size_mb: float,
                 kept: Optional[dict[str, list[dict]]] = None):
        self.out, self.manifest = out, manifest
        max_bytes = int(shard_size_mb * 1024 * 1024)
        self.writers = {split: SplitWriter(out, split, manifest["dtype"], max_bytes,
                                           (kept or {}).get(split, []), self.save)
                        for split in SPLITS}
        self.save()

    def save(self) -> None:
        self.manifest["shards"] = [s for w in self.writers.values() for s in w.shards]
        write_json_atomic(self.out / MANIFEST_NAME, self.manifest)

    def add(self, ordinal: int, split: str, doc: Document, payload: bytes,
            report: InputReport, policy: str) -> bool:
        """Write ``doc`` (its ids ``payload``) to ``split``; a document without tokens is
        counted ``empty`` in ``report`` instead (DataError under policy fail). Whether it
        was written."""
        if not payload:
            if policy == "fail":
                raise DataError(f"{doc.key}: document {doc.index} has no tokens")
            report.count(doc.key, "empty", f"document {doc.index}: no tokens")
            return False
        self.writers[split].add(ordinal, doc, payload)
        return True

    def finish(self, report: InputReport) -> dict[str, Any]:
        """Close the last shards; the manifest, complete, with the totals per split and
        ``report``."""
        for w in self.writers.values():
            w.close_shard()
        self.manifest["complete"] = True
        self.manifest["totals"] = {
            split: {"shards": len(w.shards), "documents": sum(x["documents"] for x in w.shards),
                    "tokens": sum(x["tokens"] for x in w.shards)}
            for split, w in self.writers.items()}
        self.manifest["report"] = report.to_dict()
        self.save()
        return self.manifest


def manifest_header(tok: Tokenizer, tokenizer_path: Union[str, Path]) -> dict[str, Any]:
    """The fields every shard manifest starts with: the format, the ids' dtype and suffix,
    the tokenizer (path, sha256, vocabulary), not yet complete."""
    dtype = tok.ids_dtype
    return {"format_version": FORMAT_VERSION, "dtype": dtype,
            "ids_suffix": SUFFIX_OF_DTYPE[dtype], "tokenizer": str(tokenizer_path),
            "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size, "complete": False}


def _settings(files: list, tok: Tokenizer,
              shard_size_mb: float, val_fraction: float, split_seed: int, txt_docs: str,
              text_field: str) -> dict:
    sizes = {f.key: (f.path.stat().st_size if f.path.is_file() else None) for f in files}
    return {"input_sizes": sizes,
            "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
            "shard_size_mb": shard_size_mb, "val_fraction": val_fraction,
            "split_seed": split_seed, "txt_docs": txt_docs, "text_field": text_field}


def _kept_shards(out: Path, old: Optional[dict], settings: dict) -> dict[str, list[dict]]:
    kept: dict[str, list[dict]] = {s: [] for s in SPLITS}
    if old is None:
        return kept
    if old.get("settings") != settings:
        differs = sorted(k for k in settings if old.get("settings", {}).get(k) != settings[k])
        raise DataError(f"{out / MANIFEST_NAME}: shards made with other settings (differs: "
                        f"{', '.join(differs)}); use a new output directory or --overwrite")
    broken: set[str] = set()
    for shard in old["shards"]:
        split = shard["split"]
        path = out / shard["name"]
        ok = (split not in broken and shard["name"] == f"{split}-{len(kept[split]):06d}.tar"
              and path.is_file() and path.stat().st_size == shard["bytes"]
              and file_sha256(path) == shard["sha256"])
        if ok:
            kept[split].append(shard)
        else:
            broken.add(split)
    return kept


def make_shards(inputs: Sequence[Union[str, Path]], output_dir: Union[str, Path],
                tokenizer_path: Union[str, Path], *, shard_size_mb: float = 64.0,
                workers: int = 1, val_fraction: float = 0.0, split_seed: int = 0,
                txt_docs: Literal["blank-line", "file"] = "blank-line", text_field: str = "text",
                policy: Literal["fail", "skip"] = "skip", overwrite: bool = False,
                progress: bool = False) -> dict:
    """Tokenise ``inputs`` into ``output_dir``/{train,val}-NNNNNN.tar + manifest.json.

    A shard is closed once it reaches ``shard_size_mb``. Returns the manifest,
    whose ``report`` holds the per-file input problems (also logged). Raises
    DataError under ``policy="fail"`` on the first bad input, naming the file.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} is not in [0, 1)")
    if shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb {shard_size_mb} must be > 0")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(tokenizer_path)
    files = expand_inputs(inputs)
    settings = _settings(files, tok, shard_size_mb, val_fraction, split_seed, txt_docs,
                         text_field)
    manifest_path = out / MANIFEST_NAME
    old = None
    if manifest_path.is_file() and not overwrite:
        old = read_manifest(out)
    kept = _kept_shards(out, old, settings)
    if old is not None and old.get("complete") and all(
            len(kept[s]) == sum(1 for x in old["shards"] if x["split"] == s) for s in SPLITS):
        log.info("%s: all %d shards complete and verified", out, len(old["shards"]))
        return old
    pattern = re.compile(r"^(train|val)-(\d{6})\.tar(\.tmp)?$")
    for path in out.iterdir():
        m = pattern.match(path.name)
        if m and (m.group(3) or int(m.group(2)) >= len(kept[m.group(1)])):
            path.unlink()
    resume_from = {s: (kept[s][-1]["last_doc"] + 1 if kept[s] else 0) for s in SPLITS}

    report = InputReport()
    shards = ShardSet(out, {**manifest_header(tok, tokenizer_path),
                            "inputs": [str(i) for i in inputs], "settings": settings},
                      shard_size_mb, kept)

    def todo() -> Iterator[tuple[int, str, Document]]:
        docs = iter_documents(files, report, txt_docs=txt_docs, text_field=text_field,
                              policy=policy)
        for ordinal, doc in enumerate(tqdm(docs, desc="documents", unit="doc",
                                           disable=not progress)):
            split = assign_split(doc.key, doc.index, val_fraction, split_seed)
            if ordinal >= resume_from[split]:
                yield ordinal, split, doc

    for ordinal, split, doc, payload in _encoded(todo(), str(tokenizer_path), workers):
        shards.add(ordinal, split, doc, payload, report, policy)
    manifest = shards.finish(report)
    log.info("%s", report.summary())
    return manifest
