"""Raw text inputs -> a stream of documents, with every bad input counted per file.

An input is a local path or an fsspec URL (``https://``, ``s3://``, ``hf://``,
``file://``...) naming

* a file, read as text unless its name has one of the suffixes below;
* a directory: its files with these suffixes, searched recursively, in sorted order;
* a glob pattern (``*``, ``?``, ``[...]``; ``**`` matches any depth; in an
  ``http(s)://`` URL ``?`` starts the query and is no pattern): the matching
  files with these suffixes, in sorted order. A pattern matching none is a
  DataError.

A file's key (its name in the document keys, the train/validation split and
the reports) is its path relative to the directory, or to the pattern's
directory before the first pattern character, prefixed by that directory's
name; a file named directly is keyed by its name. Formats:

* ``.txt`` / ``.text`` / ``.md``: one document per blank-line-separated block
  (``txt_docs="blank-line"``) or per file (``txt_docs="file"``);
* ``.jsonl`` / ``.ndjson``: one JSON object per line, the text in ``text_field``;
* any of these compressed: gzip (``.gz``) or zstandard (``.zst`` / ``.zstd``);
* ``.parquet``: one document per row, the text in column ``text_field``
  (needs ``pyarrow``: the ``parquet`` extra), read in record batches.

Every file is opened by :func:`open_input` through fsspec. Files are read as a
stream (one block or line at a time), never whole, except a
``txt_docs="file"`` document, which is the whole file by definition.

Byte ranges: an uncompressed jsonl file, or txt file of blank-line documents,
can be read in parts (:func:`byte_range`); the documents of the ranges
[0, a), [a, b), ..., [z, size) are those of the whole file, each in exactly
one range, whatever the cuts:

* jsonl: a range [s, e) holds the lines whose first byte lies in [s, e);
* txt: a range holds the blocks after its first blank line starting at or
  after s (the file start for s = 0) and before its first blank line starting
  at or after e (the file end); the next range starts at that same blank line.

Problems are counted per file (or range) in an :class:`InputReport`: invalid
UTF-8, empty documents, unreadable files (missing, HTTP 404, corrupt
compression), unparsable JSON lines, records without the text field. With
``policy="fail"`` the first problem raises DataError naming the file (path or
URL) and the document instead.
"""

from __future__ import annotations

import gzip
import io
import json
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal, Optional, Union

import fsspec
import zstandard
from fsspec.implementations.local import LocalFileSystem

from liquid_dist.data.errors import DataError

TXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
PARQUET_BATCH_ROWS = 1024
READ_BUFFER = 1 << 20
"""Bytes read at a time (fsspec's remote files find a line end slowly on their own)."""
ZSTD_INPUT = zstandard.DECOMPRESSION_RECOMMENDED_INPUT_SIZE
"""Compressed bytes decompressed at a time (bounds the memory a highly compressed file takes)."""
PROBLEMS = ("invalid_utf8", "empty", "unreadable", "bad_json", "missing_field")


@dataclass(frozen=True)
class InputFile:
    path: str
    """The local path or fsspec URL."""
    key: str
    """Path relative to the input argument (prefixed by its name): stable across machines;
    ``KEY@START`` for a byte range."""
    kind: Literal["txt", "jsonl", "parquet"]
    start: int = 0
    """The first byte of the range read."""
    end: Optional[int] = None
    """The end (exclusive) of the range read; None: the whole file."""


@dataclass(frozen=True)
class Document:
    key: str
    """The InputFile key of the file (or range) it came from."""
    index: int
    """Position in its file or range: block number (txt), line number (jsonl), row
    (parquet), 0 (whole file)."""
    text: str


@dataclass
class InputReport:
    """Per-file counts of documents read and of each problem; never silent."""

    files: dict[str, Counter] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)

    def count(self, key: str, what: str, detail: str = "") -> None:
        self.files.setdefault(key, Counter())[what] += 1
        if what != "documents" and key not in self.first_error:
            self.first_error[key] = f"{what}: {detail}" if detail else what

    def problems(self) -> dict[str, dict[str, int]]:
        """{file: {problem: count}} for files with at least one problem."""
        return {k: {p: c[p] for p in PROBLEMS if c[p]} for k, c in sorted(self.files.items())
                if any(c[p] for p in PROBLEMS)}

    def total(self, what: str) -> int:
        return sum(c[what] for c in self.files.values())

    def to_dict(self) -> dict:
        return {"files": {k: dict(sorted(c.items())) for k, c in sorted(self.files.items())},
                "first_error": dict(sorted(self.first_error.items()))}

    def summary(self) -> str:
        lines = [f"{len(self.files)} input files, {self.total('documents')} documents"]
        for p in PROBLEMS:
            if self.total(p):
                lines.append(f"  {p}: {self.total(p)}")
        for key, counts in self.problems().items():
            detail = ", ".join(f"{p}={c}" for p, c in counts.items())
            lines.append(f"  {key}: {detail} (first: {self.first_error.get(key, '')})")
        return "\n".join(lines)


def _compression(name: str) -> str:
    """The compression suffix ``name`` ends with (``.gz``, ``.zst``, ``.zstd``), or ''."""
    return next((s for s in COMPRESSED_SUFFIXES if name.lower().endswith(s)), "")


def _kind(name: str) -> Union[str, None]:
    """The format its name gives a file (after any compression suffix), or None."""
    name = name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    name = name[:len(name) - len(_compression(name))]
    if name.endswith(TXT_SUFFIXES):
        return "txt"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _pattern_start(item: str, path: str) -> int:
    """Where the first glob character of ``path`` is, or -1 when it is no pattern."""
    magic = "*[" if item.startswith(("http://", "https://")) else "*?["
    return min((i for i in map(path.find, magic) if i >= 0), default=-1)


def _url(fs: Any, path: str) -> str:
    """What InputFile.path holds for fsspec's ``path``: the local path, or the URL."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _known_files(fs: Any, root: str, found: dict[str, dict]) -> list[InputFile]:
    """The files of ``found`` (fsspec path -> info) with a known suffix, keyed by their
    path relative to ``root`` prefixed by root's name, sorted by path components."""
    name = posixpath.basename(root.rstrip("/"))
    files = []
    for path, info in found.items():
        kind = _kind(path)
        if info["type"] == "file" and kind is not None:
            rel = path[len(root):].lstrip("/")
            files.append(InputFile(_url(fs, path), f"{name}/{rel}", kind))
    return sorted(files, key=lambda f: f.key.split("/"))


def _expand(item: str) -> list[InputFile]:
    """The files one input names: a glob's matches, a directory's files, or the file."""
    fs, path = fsspec.core.url_to_fs(item)
    magic = _pattern_start(item, path)
    if magic >= 0:
        root = path[:max(path.rfind("/", 0, magic), 0)]
        files = _known_files(fs, root, fs.glob(path, detail=True))
        if not files:
            raise DataError(f"{item}: the pattern matches no input files (suffixes "
                            f"{', '.join(TXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)}, "
                            f"optionally {', '.join(COMPRESSED_SUFFIXES)})")
        return files
    if fs.isdir(path):
        return _known_files(fs, path, fs.find(path, detail=True))
    return [InputFile(item, posixpath.basename(path), _kind(path) or "txt")]


def expand_inputs(inputs: Sequence[Union[str, Path]]) -> list[InputFile]:
    """Files of every input (a path or URL of a file or directory, or a glob pattern), in
    order; a directory's or pattern's files in sorted order.

    A file given by name is read as text unless its name says jsonl or parquet;
    inside directories and patterns only known suffixes are taken. A file that
    does not exist is kept, so reading it is counted as unreadable (or fails
    under policy fail).
    """
    files = [f for item in inputs for f in _expand(str(item))]
    keys = Counter(f.key for f in files)
    dup = [k for k, c in keys.items() if c > 1]
    if dup:
        raise DataError(f"two inputs share the name {dup[0]!r}; document keys would collide "
                        "(pass their parent directories instead)")
    return files


def input_size(f: InputFile) -> Optional[int]:
    """The bytes of ``f``'s whole file as stored (compressed, for .gz / .zst); None when
    it is missing, cannot be reached, or its size is unknown."""
    fs, path = fsspec.core.url_to_fs(f.path)
    try:
        return fs.size(path)
    except OSError:
        return None


def splittable(f: InputFile, txt_docs: str) -> bool:
    """Whether ``f`` can be read in byte ranges: uncompressed jsonl, or uncompressed txt of
    blank-line documents."""
    return not _compression(f.path) and (
        f.kind == "jsonl" or (f.kind == "txt" and txt_docs == "blank-line"))


def byte_range(f: InputFile, start: int, end: int) -> InputFile:
    """Bytes [start, end) of the file ``f`` (see the module docstring for the documents
    of a range), keyed ``KEY@START``; the caller cuts only :func:`splittable` files."""
    if not 0 <= start < end:
        raise ValueError(f"{f.path}: byte range [{start}, {end}) is empty")
    return replace(f, key=f"{f.key}@{start}", start=start, end=end)


class _ZstdFrames(io.RawIOBase):
    """The zstandard frames of ``source`` decompressed one after another; a stream that ends
    inside a frame raises EOFError, as gzip does (zstandard's stream_reader would end
    the data there silently)."""

    def __init__(self, source: IO[bytes]):
        self.source = source
        self.frame = zstandard.ZstdDecompressor().decompressobj()
        self.in_frame = False
        self.out, self.pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.pos == len(self.out):
            data = self.source.read(ZSTD_INPUT)
            if not data:
                if self.in_frame:
                    raise EOFError("zstandard data ends inside a frame (truncated file?)")
                return 0
            self.out, self.pos = self._decompress(data), 0
        chunk = self.out[self.pos:self.pos + len(buffer)]
        buffer[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)

    def _decompress(self, data: bytes) -> bytes:
        """The bytes ``data`` completes; a frame's end starts a new frame on the rest."""
        out = [self.frame.decompress(data)]
        self.in_frame = True
        while self.frame.eof:
            rest = self.frame.unused_data
            self.frame = zstandard.ZstdDecompressor().decompressobj()
            self.in_frame = bool(rest)
            if not rest:
                break
            out.append(self.frame.decompress(rest))
        return b"".join(out)


@contextmanager
def open_input(f: InputFile) -> Iterator[IO[bytes]]:
    """``f``'s file opened for binary reading through fsspec (buffered, seekable unless
    compressed), decompressed by its suffix: ``.gz`` gzip, ``.zst`` / ``.zstd``
    zstandard (streamed, every frame). A missing file or an HTTP 404 raises
    FileNotFoundError."""
    fs, path = fsspec.core.url_to_fs(f.path)
    # a local file directly: fsspec's local files must be seekable (a named pipe is not)
    opened = (open(path, "rb", buffering=0) if isinstance(fs, LocalFileSystem)
              else fs.open(path, "rb"))
    with opened as raw, io.BufferedReader(raw, READ_BUFFER) as fh:
        compression = _compression(f.path)
        if compression == ".gz":
            with gzip.GzipFile(fileobj=fh) as unzipped:
                yield unzipped
        elif compression:
            with io.BufferedReader(_ZstdFrames(fh), READ_BUFFER) as unzipped:
                yield unzipped
        else:
            yield fh


def _lines(fh: IO[bytes], start: int) -> Iterator[tuple[int, bytes]]:
    """(offset in the file, line) of the lines starting at or after byte ``start``: the
    line holding byte ``start - 1`` began before ``start`` and is skipped."""
    offset = 0
    if start > 0:
        fh.seek(start - 1)
        offset = start - 1 + len(fh.readline())
    for line in fh:
        yield offset, line
        offset += len(line)


def _jsonl_lines(fh: IO[bytes], f: InputFile) -> Iterator[bytes]:
    """The lines of ``f``'s range: those whose first byte lies in [start, end)."""
    for offset, line in _lines(fh, f.start):
        if f.end is not None and offset >= f.end:
            return
        yield line


def _block_lines(fh: IO[bytes], f: InputFile) -> Iterator[bytes]:
    """The lines of ``f``'s range of blank-line documents: after its first blank line
    starting at or after ``start`` (from the file start for 0), until its first
    blank line starting at or after ``end`` (the file end for None)."""
    started = f.start == 0
    for offset, line in _lines(fh, f.start):
        blank = not line.strip()
        if blank and f.end is not None and offset >= f.end:
            return
        if started:
            yield line
        started = started or blank


def _blocks(lines: Iterable[bytes]) -> Iterator[list[bytes]]:
    """The runs of non-blank lines."""
    block: list[bytes] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


class _Reader:
    def __init__(self, report: InputReport, policy: str):
        self.report, self.policy = report, policy

    def problem(self, f: InputFile, what: str, detail: str) -> None:
        if f.end is not None:
            detail = f"{detail}, in bytes [{f.start}, {f.end})"
        if self.policy == "fail":
            raise DataError(f"{f.path}: {what} ({detail})")
        self.report.count(f.key, what, detail)

    def decode(self, f: InputFile, raw: bytes, where: str) -> Union[str, None]:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problem(f, "invalid_utf8", f"{where}, byte {exc.start}")
            return None

    def documents(self, f: InputFile, fh: IO[bytes], txt_docs: str,
                  text_field: str) -> Iterator[Document]:
        if f.kind == "parquet":
            return self.parquet(f, fh, text_field)
        if f.kind == "jsonl":
            return self.jsonl(f, fh, text_field)
        if txt_docs == "file":
            return self.txt_file(f, fh)
        return self.txt_blocks(f, fh)

    def txt_file(self, f: InputFile, fh: IO[bytes]) -> Iterator[Document]:
        text = self.decode(f, fh.read(), "document 0")
        if text is not None:
            if text.strip():
                yield Document(f.key, 0, text.strip("\n"))
            else:
                self.problem(f, "empty", "document 0")

    def txt_blocks(self, f: InputFile, fh: IO[bytes]) -> Iterator[Document]:
        index = 0
        for block in _blocks(_block_lines(fh, f)):
            text = self.decode(f, b"".join(block), f"document {index}")
            if text is not None:
                yield Document(f.key, index, text.strip("\n"))
            index += 1
        if index == 0 and f.end is None:
            self.problem(f, "empty", "no text")

    def jsonl(self, f: InputFile, fh: IO[bytes], text_field: str) -> Iterator[Document]:
        n_lines = 0
        for index, raw in enumerate(_jsonl_lines(fh, f)):
            if not raw.strip():
                continue
            n_lines += 1
            line = self.decode(f, raw, f"line {index + 1}")
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                self.problem(f, "bad_json", f"line {index + 1}: {exc.msg}")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                self.problem(f, "missing_field", f"line {index + 1}: no string '{text_field}'")
            elif not text.strip():
                self.problem(f, "empty", f"line {index + 1}")
            else:
                yield Document(f.key, index, text)
        if n_lines == 0 and f.end is None:
            self.problem(f, "empty", "no records")

    def parquet(self, f: InputFile, fh: IO[bytes], text_field: str) -> Iterator[Document]:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(f"{f.path}: reading parquet needs pyarrow "
                            "(pip install 'liquid_dist[parquet]')") from exc
        try:
            table = pq.ParquetFile(fh)
            if text_field not in table.schema_arrow.names:
                self.problem(f, "missing_field", f"no column '{text_field}' "
                             f"(columns: {table.schema_arrow.names})")
                return
            index = 0
            for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    if not isinstance(text, str):
                        self.problem(f, "missing_field", f"row {index}: no string '{text_field}'")
                    elif not text.strip():
                        self.problem(f, "empty", f"row {index}")
                    else:
                        yield Document(f.key, index, text)
                    index += 1
        except pa.ArrowException as exc:
            self.problem(f, "unreadable", f"{type(exc).__name__}: {exc}")
            return
        if index == 0:
            self.problem(f, "empty", "no rows")


def iter_documents(files: Sequence[InputFile], report: InputReport, *,
                   txt_docs: Literal["blank-line", "file"] = "blank-line",
                   text_field: str = "text",
                   policy: Literal["fail", "skip"] = "skip") -> Iterator[Document]:
    """Documents of ``files`` (or byte ranges) in order; problems go to ``report`` (or
    raise under fail).

    An unreadable file (missing, HTTP 404, permission denied, corrupt gzip or
    zstandard) is counted once; the documents it gave before the error are
    kept. An empty file is counted, an empty byte range is not. A byte range of
    a file that is not :func:`splittable` is a DataError.
    """
    reader = _Reader(report, policy)
    for f in files:
        if f.end is not None and not splittable(f, txt_docs):
            raise DataError(f"{f.path}: a {f.kind} file read with txt_docs={txt_docs!r} "
                            f"cannot be read in byte ranges")
        try:
            with open_input(f) as fh:
                for doc in reader.documents(f, fh, txt_docs, text_field):
                    report.count(f.key, "documents")
                    yield doc
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            reader.problem(f, "unreadable", f"{type(exc).__name__}: {exc}")
