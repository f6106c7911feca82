"""Inputs at scale: byte ranges of large files, fsspec URLs over HTTP, globs, zstandard."""

from __future__ import annotations

import gzip
import http.server
import io
import itertools
import json
import random
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from liquid_dist.data import DataError, InputReport, expand_inputs, iter_documents, text_inputs
from liquid_dist.data.prep import plan_tasks
from liquid_dist.data.prep.plan import doc_ordinal
from liquid_dist.data.text_inputs import Document, InputFile, byte_range, input_size

SPLITS = (7, 64, 1000, 10**9)  # and 1 byte, on a smaller file


def _texts(rng: random.Random, n: int) -> list[str]:
    """Texts of 1 to 60 words, every 13th of 3000 words (longer than most ranges)."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "\u00e9t\u00e9"]
    return [" ".join(rng.choice(words) for _ in range(3000 if i % 13 == 5 else
                                                      rng.randint(1, 60)))
            for i in range(n)]


def _write_jsonl(path: Path, texts: list[str], rng: random.Random) -> Path:
    """One record per line, runs of blank lines here and there, no newline at the end."""
    lines = []
    for text in texts:
        lines.append(json.dumps({"text": text}))
        lines.extend([""] * rng.choice([0, 0, 0, 1, 3]))
    path.write_bytes("\n".join(lines).encode())
    return path


def _write_txt(path: Path, texts: list[str], rng: random.Random) -> Path:
    """Blocks of lines separated by runs of blank (or whitespace-only) lines, leading blank
    lines, no newline at the end."""
    parts = ["\n \n"]
    for text in texts:
        words = text.split(" ")
        parts.append("\n".join(" ".join(words[i:i + 7]) for i in range(0, len(words), 7)))
        parts.append(rng.choice(["\n\n", "\n\n\n", "\n \t\n", "\n\n\n\n\n"]))
    path.write_bytes("".join(parts).rstrip("\n").encode())
    return path


def _corpus(tmp: Path, n: int = 60, seed: int = 0) -> tuple[Path, Path, list[str]]:
    rng = random.Random(seed)
    texts = _texts(rng, n)
    tmp.mkdir(parents=True, exist_ok=True)
    return (_write_jsonl(tmp / "big.jsonl", texts, rng), _write_txt(tmp / "big.txt", texts, rng),
            texts)


def _read(files: list[InputFile], report: InputReport | None = None) -> list[Document]:
    return list(iter_documents(files, report if report is not None else InputReport(),
                               policy="fail"))


def _read_cuts(f: InputFile, cuts: list[int]) -> list[Document]:
    """The documents of ``f`` read as the ranges between consecutive ``cuts``."""
    return _read([byte_range(f, a, b) for a, b in itertools.pairwise(cuts) if a < b])


def _planned_docs(inputs: list, tasks: int, split_bytes: int | None) -> list[tuple[int, Document]]:
    """(ordinal, document) of every document, task after task, as the prep tasks read them."""
    plan = plan_tasks(inputs, tasks, split_bytes=split_bytes)
    return [(doc_ordinal(p.number, d.index), d)
            for rank in range(tasks) for p in plan.files_of(rank) for d in _read([p.file])]


@pytest.mark.parametrize("name", ["big.jsonl", "big.txt"])
def test_ranges_of_every_split_size_give_the_whole_file_documents_once(tmp_path, name):
    _corpus(tmp_path)
    path = tmp_path / name
    whole = [d.text for d in _read(expand_inputs([path]))]
    assert len(whole) == 60 and max(map(len, whole)) > 10_000
    size = path.stat().st_size
    for split in SPLITS:
        plan = plan_tasks([path], 1, split_bytes=split)
        assert len(plan.files) == (-(-size // split) if size > split else 1)
        report = InputReport()
        docs = [d for p in plan.files for d in _read([p.file], report)]
        assert [d.text for d in docs] == whole, split
        assert report.problems() == {}


@pytest.mark.parametrize("name", ["big.jsonl", "big.txt"])
def test_ranges_of_one_byte_give_the_whole_file_documents(tmp_path, name):
    _corpus(tmp_path, n=12, seed=1)
    path = tmp_path / name
    whole = [d.text for d in _read(expand_inputs([path]))]
    plan = plan_tasks([path], 1, split_bytes=1)
    assert len(plan.files) == path.stat().st_size
    assert [d.text for p in plan.files for d in _read([p.file])] == whole


@pytest.mark.parametrize("name", ["big.jsonl", "big.txt"])
def test_one_cut_anywhere_gives_the_whole_file_documents(tmp_path, name):
    """Cuts on every line start, inside every line, on every blank line of a small file."""
    _corpus(tmp_path, n=5, seed=2)
    path = tmp_path / name
    (f,) = expand_inputs([path])
    whole = [d.text for d in _read([f])]
    data = path.read_bytes()
    line_starts = [0] + [m.end() for m in re.finditer(b"\n", data)]
    assert any(not data[a:a + 1].strip() for a in line_starts[1:])  # blank lines are cut too
    for cut in range(1, len(data)):
        assert [d.text for d in _read_cuts(f, [0, cut, len(data)])] == whole, cut
    for a, b in zip(line_starts, line_starts[2:], strict=False):
        assert [d.text for d in _read_cuts(f, [0, a, b, len(data)])] == whole, (a, b)


def test_documents_of_a_range_are_numbered_from_0_and_problems_name_the_range(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n\nnot json\n{"text": "c"}\n')
    (f,) = expand_inputs([path])
    size = path.stat().st_size
    second = byte_range(f, 14, size)
    report = InputReport()
    docs = list(iter_documents([second], report))
    assert [(d.key, d.index, d.text) for d in docs] == [("bad.jsonl@14", 0, "b"),
                                                        ("bad.jsonl@14", 3, "c")]
    assert report.first_error == {"bad.jsonl@14": "bad_json: line 3: Expecting value, "
                                                  f"in bytes [14, {size})"}
    with pytest.raises(DataError, match=rf"bad\.jsonl: bad_json \(line 3.*bytes \[14, {size}\)"):
        list(iter_documents([second], InputReport(), policy="fail"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n\n\n")
    (f,) = expand_inputs([blank])
    report = InputReport()
    assert _read([byte_range(f, 0, 2), byte_range(f, 2, 4)], report) == []
    assert report.problems() == {}  # an empty range is no problem; an empty file is
    assert list(iter_documents([f], report)) == [] and report.problems() == {
        "blank.jsonl": {"empty": 1}}


def test_keys_and_ordinals_of_ranges_are_unique_and_independent_of_the_task_count(tmp_path):
    _corpus(tmp_path / "c")
    (tmp_path / "c" / "small.jsonl.gz").write_bytes(gzip.compress(b'{"text": "zipped"}\n' * 50))
    one = _planned_docs([tmp_path / "c"], 1, 500)
    keys = [(d.key, d.index) for _, d in one]
    assert len(set(keys)) == len(keys) and len({o for o, _ in one}) == len(one)
    assert [o for o, _ in one] == sorted(o for o, _ in one)
    assert {k.split("@")[0] for k, _ in keys} == {"c/big.jsonl", "c/big.txt",
                                                  "c/small.jsonl.gz"}
    assert "c/small.jsonl.gz" in {k for k, _ in keys}  # compressed: never cut
    for tasks in (2, 3, 7):
        assert _planned_docs([tmp_path / "c"], tasks, 500) == one
    plan = plan_tasks([tmp_path / "c"], 3, split_bytes=500)
    rows = plan.to_dict()["files"]
    assert rows[0] == {"key": "c/big.jsonl@0", "number": 0, "bytes": 500, "task": 0,
                       "start": 0, "end": 500}
    assert rows[-1] == {"key": "c/small.jsonl.gz", "number": len(rows) - 1,
                        "bytes": input_size(plan.files[-1].file), "task": 2}
    assert sum(p.size for p in plan.files) == sum(
        p.stat().st_size for p in (tmp_path / "c").iterdir())


def test_txt_read_per_file_is_not_cut(tmp_path):
    _, txt, _ = _corpus(tmp_path, n=5)
    assert len(plan_tasks([txt], 2, split_bytes=100, txt_docs="file").files) == 1
    ranges = plan_tasks([txt], 2, split_bytes=100).files
    assert len(ranges) > 1
    with pytest.raises(DataError, match="cannot be read in byte ranges"):
        list(iter_documents([ranges[0].file], InputReport(), txt_docs="file"))


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory with ``Range: bytes=a-b`` (206) and HEAD with Content-Length;
    records the ranges asked for."""

    ranges: list[str] = []

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            return super().send_head()  # the listing, for globs
        if not path.is_file():
            self.send_error(404)
            return None
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            self.ranges.append(match.group(0))
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1 if match.group(2) else len(data), len(data))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            data = data[start:end]
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(data)

    def copyfile(self, source, outputfile):
        try:
            super().copyfile(source, outputfile)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client read the headers only

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[str, Path]]:
    """(base URL, directory) of a loopback HTTP server of a fresh directory."""
    root = tmp_path / "www"
    root.mkdir()

    def handler(*args, **kwargs):
        return _RangeHandler(*args, directory=str(root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _RangeHandler.ranges = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_an_http_url_gives_the_local_documents_whole_and_in_ranges(served):
    base, root = served
    local, _, _ = _corpus(root)
    url = f"{base}/big.jsonl"
    (f,) = expand_inputs([url])
    assert (f.path, f.key, f.kind) == (url, "big.jsonl", "jsonl")
    assert input_size(f) == local.stat().st_size
    whole = _read(expand_inputs([local]))
    assert _read([f]) == whole
    ranged = [d for _, d in _planned_docs([url], 3, 4096)]
    assert [d.text for d in ranged] == [d.text for d in whole]
    assert [(d.key, d.index) for d in ranged] == [
        (d.key, d.index) for _, d in _planned_docs([local], 1, 4096)]
    assert any(not r.startswith("bytes=0-") for r in _RangeHandler.ranges)  # ranges were sought


def test_an_http_404_is_counted_unreadable_naming_the_url(served):
    base, _ = served
    url = f"{base}/missing.jsonl"
    files = expand_inputs([url])
    assert input_size(files[0]) is None
    assert plan_tasks([url], 2).files[0].size == 0
    report = InputReport()
    assert list(iter_documents(files, report)) == []
    assert report.problems() == {"missing.jsonl": {"unreadable": 1}}
    assert url in report.first_error["missing.jsonl"]
    with pytest.raises(DataError, match=re.escape(url) + ": unreadable"):
        list(iter_documents(files, InputReport(), policy="fail"))


def test_http_globs_and_parquet(served):
    base, root = served
    _corpus(root)
    pq.write_table(pa.table({"text": ["row zero", "", "row two"]}), root / "rows.parquet",
                   row_group_size=2)
    files = expand_inputs([f"{base}/*.jsonl", f"{base}/rows.parquet"])
    assert [(f.path, f.kind) for f in files] == [(f"{base}/big.jsonl", "jsonl"),
                                                 (f"{base}/rows.parquet", "parquet")]
    report = InputReport()
    docs = list(iter_documents(files, report))
    assert [(d.index, d.text) for d in docs[-2:]] == [(0, "row zero"), (2, "row two")]
    assert report.problems() == {"rows.parquet": {"empty": 1}}


def test_zstandard_gzip_and_plain_give_the_same_documents(tmp_path, monkeypatch):
    jsonl, txt, _ = _corpus(tmp_path / "plain")
    packed = tmp_path / "packed"
    packed.mkdir()
    for path in (jsonl, txt):
        data = path.read_bytes()
        (packed / f"{path.name}.gz").write_bytes(gzip.compress(data))
        half = len(data) // 2  # two frames, as concatenating .zst files gives
        (packed / f"{path.name}.zst").write_bytes(
            zstandard.ZstdCompressor().compress(data[:half])
            + zstandard.ZstdCompressor().compress(data[half:]))
        (packed / f"{path.name}.zstd").write_bytes(zstandard.ZstdCompressor().compress(data))
    files = expand_inputs([packed])
    assert [(f.key, f.kind) for f in files] == [
        ("packed/big.jsonl.gz", "jsonl"), ("packed/big.jsonl.zst", "jsonl"),
        ("packed/big.jsonl.zstd", "jsonl"), ("packed/big.txt.gz", "txt"),
        ("packed/big.txt.zst", "txt"), ("packed/big.txt.zstd", "txt")]
    for f in files:
        plain = jsonl if f.kind == "jsonl" else txt
        assert [(d.index, d.text) for d in _read([f])] == [
            (d.index, d.text) for d in _read(expand_inputs([plain]))], f.key
    monkeypatch.setattr(text_inputs, "ZSTD_INPUT", 7)  # frames end inside reads too
    small_reads = _read(expand_inputs([packed / "big.txt.zst"]))
    monkeypatch.undo()
    assert [d.text for d in small_reads] == [d.text for d in _read(expand_inputs([txt]))]
    assert len(plan_tasks([packed], 2, split_bytes=100).files) == 6  # compressed: never cut
    (packed / "broken.jsonl.zst").write_bytes((packed / "big.jsonl.zst").read_bytes()[:-40])
    report = InputReport()
    docs = list(iter_documents(expand_inputs([packed / "broken.jsonl.zst"]), report))
    assert docs and report.problems() == {"broken.jsonl.zst": {"unreadable": 1}}


def test_globs_pick_known_files_in_sorted_order_with_stable_keys(tmp_path):
    d = tmp_path / "d"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "sub-b").mkdir()
    for name in ("b.jsonl", "a.jsonl", "z.txt", "sub/c.jsonl", "sub/x.txt", "sub/deeper/y.txt",
                 "sub-b/w.txt", "notes.bin", "sub/odd.txt.bin"):
        (d / name).write_text('{"text": "x"}\n')
    keys = [f.key for f in expand_inputs([f"{d}/*.jsonl", f"{d}/**/*.txt"])]
    assert keys == ["d/a.jsonl", "d/b.jsonl", "d/sub/deeper/y.txt", "d/sub/x.txt",
                    "d/sub-b/w.txt", "d/z.txt"]
    walked = [f.key for f in expand_inputs([d])]
    assert walked == ["d/a.jsonl", "d/b.jsonl", "d/sub/c.jsonl", "d/sub/deeper/y.txt",
                      "d/sub/x.txt", "d/sub-b/w.txt", "d/z.txt"]
    assert walked == [f"d/{p.relative_to(d).as_posix()}"  # the order of sorted Paths
                      for p in sorted(d.rglob("*")) if p.suffix in (".jsonl", ".txt")]
    assert [f.key for f in expand_inputs([f"{d}/su?/[cx].*"])] == ["d/sub/c.jsonl",
                                                                    "d/sub/x.txt"]
    assert [f.key for f in expand_inputs([f"file://{d}/*.jsonl"])] == ["d/a.jsonl", "d/b.jsonl"]
    with pytest.raises(DataError, match=re.escape(f"{d}/*.parquet") + ": the pattern matches"):
        expand_inputs([f"{d}/*.parquet"])


def test_parquet_is_read_through_fsspec(tmp_path):
    rows = [f"row {i}" for i in range(2500)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "a.parquet", row_group_size=700)
    (f,) = expand_inputs([f"file://{tmp_path}/a.parquet"])
    assert f.path == f"file://{tmp_path}/a.parquet"
    assert [d.text for d in _read([f])] == rows
    assert len(plan_tasks([tmp_path / "a.parquet"], 2, split_bytes=100).files) == 1
