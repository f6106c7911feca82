"""One directory's tokenised WebDataset shards and manifest: written in order, deterministic,
resumable.

A sample is one document (``KEY.ids.u16`` or ``KEY.ids.u32`` little-endian ids
and ``KEY.json``), its key the document's ordinal. Each document goes to
``val`` or ``train`` by a hash of (file key, position in file, split seed)
(:func:`assign_split`), so the split depends on nothing else. Tar members
carry fixed metadata (mtime 0, uid/gid 0, mode 0444) for byte-identical
reruns; a shard is written as ``NAME.tmp`` and renamed when complete, and
the manifest is rewritten (atomically) after every completed shard.

Resume: :func:`kept_shards` keeps every shard an earlier attempt listed whose
size and sha256 still match, in order per split, and deletes the rest of the
directory's shards (a partial ``.tmp`` included); writing continues with the
document after the last kept shard of each split (:func:`resume_points`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Optional, Union

from liquid_dist.data.errors import DataError
from liquid_dist.data.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SUFFIX_OF_DTYPE,
    file_sha256,
    sample_files,
    sample_key,
    write_json_atomic,
)
from liquid_dist.data.text_inputs import Document, InputReport
from liquid_dist.data.tokenizer import Tokenizer

SPLITS = ("train", "val")
_SHARD_FILE = re.compile(r"^(train|val)-(\d{6})\.tar(\.tmp)?$")


def assign_split(key: str, index: int, val_fraction: float, seed: int) -> str:
    """'val' for a deterministic ``val_fraction`` of documents, else 'train'."""
    if val_fraction <= 0:
        return "train"
    h = hashlib.blake2b(f"{seed}\0{key}\0{index}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") < val_fraction * 2.0**64 else "train"


# ------------------------------------------------------------ shard writing


class SplitWriter:
    """Writes one split's shards in order; records each completed shard.

    A shard's record lists under ``no_tokens`` the ``[file key, index]`` of this
    split's documents without tokens met since the previous shard (not written,
    counted ``empty``), so a resumed writer can count them again without
    tokenising what its kept shards cover.
    """

    def __init__(self, out: Path, split: str, dtype: str, max_bytes: int, kept: list[dict],
                 on_shard: Any):
        self.out, self.split, self.dtype, self.max_bytes = out, split, dtype, max_bytes
        self.shards = list(kept)
        self.on_shard = on_shard
        self.tar: Optional[tarfile.TarFile] = None
        self.tmp: Optional[Path] = None
        self.cur: dict[str, int] = {}
        self.no_tokens: list[list] = []

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
        record = {"name": final.name, "split": self.split, **self.cur,
                  "bytes": final.stat().st_size, "sha256": file_sha256(final)}
        if self.no_tokens:
            record["no_tokens"] = self.no_tokens
        self.shards.append(record)
        self.tar = self.tmp = None
        self.no_tokens = []
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
            count_no_tokens(report, doc.key, doc.index)
            self.writers[split].no_tokens.append([doc.key, doc.index])
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


def count_no_tokens(report: InputReport, key: str, index: int) -> None:
    """Count document ``index`` of file ``key``, which has no tokens, as ``empty``."""
    report.count(key, "empty", f"document {index}: no tokens")


def kept_shards(out: Path, old: Optional[dict[str, Any]]) -> dict[str, list[dict]]:
    """The shards of ``old`` (the manifest an earlier attempt left in ``out``, or None) to
    keep, per split: in the manifest's order, while each has the next name of its split and
    its recorded size and sha256. Deletes every other shard file of ``out`` (partial
    ``.tmp`` shards included)."""
    kept: dict[str, list[dict]] = {s: [] for s in SPLITS}
    broken: set[str] = set()
    for shard in (old or {}).get("shards", []):
        split = shard["split"]
        path = out / shard["name"]
        ok = (split not in broken and shard["name"] == f"{split}-{len(kept[split]):06d}.tar"
              and path.is_file() and path.stat().st_size == shard["bytes"]
              and file_sha256(path) == shard["sha256"])
        if ok:
            kept[split].append(shard)
        else:
            broken.add(split)
    if out.is_dir():
        for path in out.iterdir():
            m = _SHARD_FILE.match(path.name)
            if m and (m.group(3) or int(m.group(2)) >= len(kept[m.group(1)])):
                path.unlink()
    return kept


def resume_points(kept: dict[str, list[dict]]) -> dict[str, int]:
    """Per split, the first ordinal not covered by its ``kept`` shards (0 when none)."""
    return {split: shards[-1]["last_doc"] + 1 if shards else 0
            for split, shards in kept.items()}


def manifest_header(tok: Tokenizer, tokenizer_path: Union[str, Path]) -> dict[str, Any]:
    """The fields every shard manifest starts with: the format, the ids' dtype and suffix,
    the tokenizer (path, sha256, vocabulary), not yet complete."""
    dtype = tok.ids_dtype
    return {"format_version": FORMAT_VERSION, "dtype": dtype,
            "ids_suffix": SUFFIX_OF_DTYPE[dtype], "tokenizer": str(tokenizer_path),
            "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size, "complete": False}


