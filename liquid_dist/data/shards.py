"""The shard format: samples, manifest, and resolving a shard spec to URLs.

A shard is a WebDataset tar file. Each sample is one document, stored as two
members sharing the key ``{ordinal:012d}`` (the document's position in the
input stream):

* ``KEY.ids.u16`` (or ``KEY.ids.u32``): the token ids as a raw little-endian
  buffer; uint16 whenever every id fits (vocab_size <= 65536), else uint32.
  The suffix names the dtype, so a reader never guesses.
* ``KEY.json``: ``{"source": file, "doc": index in file, "tokens": n,
  "crc32": zlib.crc32 of the ids buffer}``.

``manifest.json`` next to the shards lists, per shard, the split, documents,
tokens, bytes and sha256, plus the ids dtype and the tokenizer's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import braceexpand
import numpy as np

from liquid_dist.atomic import write_atomic
from liquid_dist.data.errors import BadSample, DataError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SUFFIX_OF_DTYPE = {"uint16": "ids.u16", "uint32": "ids.u32"}
DTYPE_OF_SUFFIX = {v: k for k, v in SUFFIX_OF_DTYPE.items()}


def ids_dtype_for_vocab(vocab_size: int) -> str:
    """'uint16' when every id of a ``vocab_size`` vocabulary fits 16 bits, else 'uint32'."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def sample_key(ordinal: int) -> str:
    return f"{ordinal:012d}"


def encode_ids(ids: Sequence[int], dtype: str) -> bytes:
    """Token ids -> the raw little-endian buffer stored in a shard."""
    return np.asarray(ids, dtype="<u2" if dtype == "uint16" else "<u4").tobytes()


def sample_files(key: str, payload: bytes, dtype: str, meta: dict[str, Any]) -> list[
        tuple[str, bytes]]:
    """The (member name, bytes) pairs of one sample; ``meta`` gains tokens and crc32."""
    itemsize = 2 if dtype == "uint16" else 4
    meta = dict(meta, tokens=len(payload) // itemsize, crc32=zlib.crc32(payload))
    return [(f"{key}.{SUFFIX_OF_DTYPE[dtype]}", payload),
            (f"{key}.json", json.dumps(meta, sort_keys=True).encode())]


def decode_sample(sample: dict[str, Any], *, suffix: str, vocab_size: int) -> np.ndarray:
    """Validate one WebDataset sample and return its ids (n,) as uint16/uint32.

    Raises BadSample (with a reason code) for a wrong dtype, a missing or
    unparsable JSON, a byte length that is not a whole number of ids, a token
    count or checksum that disagrees with the JSON, no tokens, or an id
    outside the vocabulary.
    """
    if suffix not in sample:
        other = sorted(k for k in sample if k.startswith("ids."))
        if other:
            raise BadSample("wrong_dtype", f"has {other[0]}, expected {suffix}")
        raise BadSample("missing_ids", f"no {suffix} member")
    data = sample[suffix]
    itemsize = 2 if suffix == "ids.u16" else 4
    if len(data) % itemsize:
        raise BadSample("bad_length", f"{len(data)} bytes is not a multiple of {itemsize}")
    if "json" not in sample:
        raise BadSample("missing_json", "no json member")
    try:
        meta = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSample("bad_json", str(exc)) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", "json member is not an object")
    n = len(data) // itemsize
    if meta.get("tokens") != n:
        raise BadSample("corrupt", f"{n} ids but json says {meta.get('tokens')}")
    if meta.get("crc32") != zlib.crc32(data):
        raise BadSample("corrupt", "crc32 of the ids does not match the json")
    if n == 0:
        raise BadSample("empty", "no tokens")
    ids = np.frombuffer(data, dtype="<u2" if itemsize == 2 else "<u4")
    top = int(ids.max())
    if top >= vocab_size:
        raise BadSample("id_out_of_range", f"id {top} >= vocab_size {vocab_size}")
    return ids


# ------------------------------------------------------------ manifest


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: Union[str, Path]) -> dict:
    """The manifest.json of a shard directory; DataError when absent or unreadable."""
    path = Path(directory) / MANIFEST_NAME
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest (is this a make_shards output directory?)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r}, "
                        f"expected {FORMAT_VERSION}")
    return manifest


def write_json_atomic(path: Union[str, Path], obj: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def verify_shards(directory: Union[str, Path]) -> list[str]:
    """Check every shard of a manifest (exists, byte size, sha256); returns the problems."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for shard in manifest["shards"]:
        path = directory / shard["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
        elif file_sha256(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


# ------------------------------------------------------------ shard specs


@dataclass(frozen=True)
class ShardSet:
    """The URLs of one source, with what the manifest knows about each.

    ``shard_documents`` / ``shard_tokens`` hold None for a URL without a
    manifest entry (e.g. a ``pipe:`` command without a ``manifest``); ``dtype``
    and ``tokenizer_sha256`` are None when no manifest was found at all.
    """

    urls: tuple[str, ...]
    shard_documents: tuple[Optional[int], ...]
    shard_tokens: tuple[Optional[int], ...]
    dtype: Optional[str]
    tokenizer_sha256: Optional[str]

    @property
    def tokens(self) -> Optional[int]:
        """Total tokens, or None if any shard is unknown to the manifests."""
        if any(t is None for t in self.shard_tokens):
            return None
        return sum(self.shard_tokens)

    def suffix_for(self, tok: Any, what: str) -> str:
        """The ids suffix of these shards for tokenizer ``tok``; DataError naming ``what``
        when the manifest says another tokenizer or an ids dtype ``tok`` cannot use."""
        if self.tokenizer_sha256 not in (None, tok.sha256):
            raise DataError(f"{what}: shards were made with another tokenizer (sha256 "
                            f"{self.tokenizer_sha256[:12]}..., {tok.path} is "
                            f"{tok.sha256[:12]}...)")
        dtype = self.dtype or tok.ids_dtype
        if dtype != tok.ids_dtype:
            raise DataError(f"{what}: manifest dtype {dtype}, the tokenizer's vocabulary "
                            f"needs {tok.ids_dtype}")
        return SUFFIX_OF_DTYPE[dtype]

    @property
    def documents(self) -> Optional[int]:
        if any(d is None for d in self.shard_documents):
            return None
        return sum(self.shard_documents)


def _is_pattern_or_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec or any(c in spec for c in "{}*")


def resolve_shards(spec: Union[str, Sequence[str]], split: str,
                   manifest: Optional[str] = None) -> ShardSet:
    """Resolve a shard spec to URLs for ``split`` ('train' or 'val').

    ``spec`` is a directory holding manifest.json (its shards of ``split``), a
    brace pattern or single path/URL (``/d/train-{000000..000009}.tar``,
    ``pipe:aws s3 cp s3://b/train-{0000..0099}.tar -``), or a list of these.
    Token counts come from ``manifest`` (a manifest.json path or its directory)
    when given, else from a manifest.json next to local shards.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise DataError("empty shard list")
    urls: list[str] = []
    infos: dict[str, dict] = {}
    manifests: list[dict] = []

    loaded: dict[str, dict] = {}

    def load(directory: Path) -> dict:
        key = os.path.normpath(directory)
        if key not in loaded:
            loaded[key] = m = read_manifest(directory)
            manifests.append(m)
            for shard in m["shards"]:
                infos[os.path.normpath(directory / shard["name"])] = shard
        return loaded[key]

    if manifest is not None:
        mpath = Path(manifest)
        load(mpath.parent if mpath.name == MANIFEST_NAME else mpath)
    for item in specs:
        if not isinstance(item, str):
            raise DataError(f"shard spec {item!r} is not a string")
        if not _is_pattern_or_url(item) and Path(item).is_dir():
            m = load(Path(item))
            if not m.get("complete"):
                raise DataError(f"{Path(item) / MANIFEST_NAME}: incomplete (make_shards did not "
                                "finish; rerun it to resume)")
            names = [s["name"] for s in m["shards"] if s["split"] == split]
            if not names:
                raise DataError(f"{Path(item) / MANIFEST_NAME}: no '{split}' shards")
            urls.extend(str(Path(item) / n) for n in names)
            continue
        expanded = list(braceexpand.braceexpand(item))
        urls.extend(expanded)
        if manifest is None and not item.startswith("pipe:") and "://" not in item:
            for directory in {Path(u).parent for u in expanded}:
                if (directory / MANIFEST_NAME).is_file():
                    load(directory)
    missing = [u for u in urls if not u.startswith("pipe:") and "://" not in u
               and not Path(u).is_file()]
    if missing:
        raise DataError(f"shard file not found: {missing[0]} ({len(missing)} missing)")
    if len(set(urls)) != len(urls):
        raise DataError(f"shard spec {spec!r} lists a shard twice")
    known = [infos.get(os.path.normpath(u)) for u in urls]
    dtypes = {m["dtype"] for m in manifests}
    shas = {m["tokenizer_sha256"] for m in manifests}
    if len(dtypes) > 1 or len(shas) > 1:
        raise DataError(f"shard spec {spec!r} mixes manifests with different dtypes or "
                        "tokenizers")
    return ShardSet(
        urls=tuple(urls),
        shard_documents=tuple(k["documents"] if k else None for k in known),
        shard_tokens=tuple(k["tokens"] if k else None for k in known),
        dtype=next(iter(dtypes)) if dtypes else None,
        tokenizer_sha256=next(iter(shas)) if shas else None,
    )
