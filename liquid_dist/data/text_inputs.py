"""Raw text inputs -> a stream of documents, with every bad input counted per file.

Inputs are files or directories (searched recursively, in sorted order):

* ``.txt`` / ``.text`` / ``.md``: one document per blank-line-separated block
  (``txt_docs="blank-line"``) or per file (``txt_docs="file"``);
* ``.jsonl`` / ``.ndjson``: one JSON object per line, the text in ``text_field``;
* any of these gzip-compressed (``.gz``);
* ``.parquet``: one document per row, the text in column ``text_field``
  (needs ``pyarrow``: the ``parquet`` extra), read in record batches.

Files are read as a stream (one block or line at a time), never whole, except
a ``txt_docs="file"`` document, which is the whole file by definition.
Problems are counted per file in an :class:`InputReport`: invalid UTF-8,
empty documents, unreadable files, unparsable JSON lines, records without
the text field. With ``policy="fail"`` the first problem raises DataError naming
the file and the document instead.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Union

from liquid_dist.data.errors import DataError

TXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
PARQUET_BATCH_ROWS = 1024
PROBLEMS = ("invalid_utf8", "empty", "unreadable", "bad_json", "missing_field")


@dataclass(frozen=True)
class InputFile:
    path: Path
    key: str
    """Path relative to the input argument (prefixed by its name): stable across machines."""
    kind: Literal["txt", "jsonl", "parquet"]


@dataclass(frozen=True)
class Document:
    key: str
    """The InputFile key of the file it came from."""
    index: int
    """Position in its file: block number (txt), line number (jsonl), row (parquet),
    0 (whole file)."""
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


def _kind(path: Path) -> Union[str, None]:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(TXT_SUFFIXES):
        return "txt"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def expand_inputs(inputs: Sequence[Union[str, Path]]) -> list[InputFile]:
    """Files of every input, directories walked recursively in sorted order.

    A file given by name is read as text unless its name says jsonl; inside
    directories only known suffixes are taken. A path that does not exist is
    kept, so reading it is counted as unreadable (or fails under policy fail).
    """
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for sub in sorted(p for p in path.rglob("*") if p.is_file()):
                kind = _kind(sub)
                if kind is not None:
                    key = f"{path.name}/{sub.relative_to(path).as_posix()}"
                    files.append(InputFile(sub, key, kind))
        else:
            files.append(InputFile(path, path.name, _kind(path) or "txt"))
    keys = Counter(f.key for f in files)
    dup = [k for k, c in keys.items() if c > 1]
    if dup:
        raise DataError(f"two inputs share the name {dup[0]!r}; document keys would collide "
                        "(pass their parent directories instead)")
    return files


def _open(path: Path) -> IO[bytes]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


class _Reader:
    def __init__(self, report: InputReport, policy: str):
        self.report, self.policy = report, policy

    def problem(self, f: InputFile, what: str, detail: str) -> None:
        if self.policy == "fail":
            raise DataError(f"{f.path}: {what} ({detail})")
        self.report.count(f.key, what, detail)

    def decode(self, f: InputFile, raw: bytes, where: str) -> Union[str, None]:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problem(f, "invalid_utf8", f"{where}, byte {exc.start}")
            return None

    def txt_blocks(self, f: InputFile, fh: IO[bytes], per_file: bool) -> Iterator[Document]:
        if per_file:
            text = self.decode(f, fh.read(), "document 0")
            if text is not None:
                if text.strip():
                    yield Document(f.key, 0, text.strip("\n"))
                else:
                    self.problem(f, "empty", "document 0")
            return
        block: list[bytes] = []
        index = 0
        for line in itertools.chain(fh, [b""]):
            if line.strip():
                block.append(line)
                continue
            if block:
                text = self.decode(f, b"".join(block), f"document {index}")
                if text is not None:
                    yield Document(f.key, index, text.strip("\n"))
                index += 1
                block = []
        if index == 0:
            self.problem(f, "empty", "no text")

    def jsonl(self, f: InputFile, fh: IO[bytes], text_field: str) -> Iterator[Document]:
        n_lines = 0
        for index, raw in enumerate(fh):
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
        if n_lines == 0:
            self.problem(f, "empty", "no records")

    def parquet(self, f: InputFile, text_field: str) -> Iterator[Document]:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(f"{f.path}: reading parquet needs pyarrow "
                            "(pip install 'liquid_dist[parquet]')") from exc
        try:
            table = pq.ParquetFile(f.path)
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
        except (OSError, pa.ArrowException) as exc:
            self.problem(f, "unreadable", f"{type(exc).__name__}: {exc}")
            return
        if index == 0:
            self.problem(f, "empty", "no rows")


def iter_documents(files: Sequence[InputFile], report: InputReport, *,
                   txt_docs: Literal["blank-line", "file"] = "blank-line",
                   text_field: str = "text",
                   policy: Literal["fail", "skip"] = "skip") -> Iterator[Document]:
    """Documents of ``files`` in order; problems go to ``report`` (or raise under fail).

    An unreadable file (missing, permission denied, corrupt gzip) is counted
    once; the documents it gave before the error are kept.
    """
    reader = _Reader(report, policy)
    for f in files:
        if f.kind == "parquet":
            for doc in reader.parquet(f, text_field):
                report.count(f.key, "documents")
                yield doc
            continue
        try:
            with _open(f.path) as fh:
                if f.kind == "jsonl":
                    docs = reader.jsonl(f, fh, text_field)
                else:
                    docs = reader.txt_blocks(f, fh, txt_docs == "file")
                for doc in docs:
                    report.count(f.key, "documents")
                    yield doc
        except (OSError, EOFError) as exc:
            reader.problem(f, "unreadable", f"{type(exc).__name__}: {exc}")
