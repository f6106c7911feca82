"""Raw text inputs: documents per format, every bad input counted per file or raised."""

from __future__ import annotations

import gzip

import pytest
from data_fixtures import TMP

from liquid_dist.data import DataError, InputReport, expand_inputs, iter_documents


def _corpus(name: str):
    root = TMP / name
    (root / "d" / "deep").mkdir(parents=True)
    (root / "d" / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n")
    (root / "d" / "deep" / "b.jsonl").write_text(
        '{"text": "json one"}\n\n{"text": ""}\nnot json\n{"other": 1}\n{"text": "json two"}\n')
    (root / "d" / "deep" / "c.txt.gz").write_bytes(gzip.compress(b"zipped doc\n"))
    (root / "d" / "latin1.txt").write_bytes("caf\u00e9 ok\n\nna\u00efve\n".encode("latin-1"))
    (root / "d" / "empty.txt").write_text("\n\n")
    (root / "d" / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n')[:-12])
    (root / "d" / "skip.bin").write_bytes(b"\x00")
    return root


def test_documents_and_problems_are_counted_per_file():
    root = _corpus("inputs_skip")
    files = expand_inputs([root / "d", root / "missing.txt"])
    assert [f.key for f in files] == [
        "d/a.txt", "d/broken.jsonl.gz", "d/deep/b.jsonl", "d/deep/c.txt.gz", "d/empty.txt",
        "d/latin1.txt", "missing.txt"]
    report = InputReport()
    docs = list(iter_documents(files, report))
    assert [(d.key, d.index, d.text) for d in docs] == [
        ("d/a.txt", 0, "first doc\nstill first"), ("d/a.txt", 1, "second doc"),
        ("d/deep/b.jsonl", 0, "json one"), ("d/deep/b.jsonl", 5, "json two"),
        ("d/deep/c.txt.gz", 0, "zipped doc")]
    assert report.problems() == {
        "d/broken.jsonl.gz": {"unreadable": 1},
        "d/deep/b.jsonl": {"empty": 1, "bad_json": 1, "missing_field": 1},
        "d/empty.txt": {"empty": 1},
        "d/latin1.txt": {"invalid_utf8": 2},
        "missing.txt": {"unreadable": 1},
    }
    assert report.first_error["d/deep/b.jsonl"] == "empty: line 3"
    assert "invalid_utf8" in report.summary()


def test_whole_file_documents():
    root = _corpus("inputs_file")
    report = InputReport()
    docs = list(iter_documents(expand_inputs([root / "d" / "a.txt"]), report, txt_docs="file"))
    assert [d.text for d in docs] == ["first doc\nstill first\n\n\nsecond doc"]


@pytest.mark.parametrize("name, message", [
    ("latin1.txt", "invalid_utf8"), ("empty.txt", "empty"), ("broken.jsonl.gz", "unreadable"),
    ("deep/b.jsonl", "empty"),
])
def test_policy_fail_raises_naming_the_file(name, message):
    root = _corpus(f"inputs_fail_{message}_{name.replace('/', '_')}")
    files = expand_inputs([root / "d" / name])
    with pytest.raises(DataError, match=message) as info:
        list(iter_documents(files, InputReport(), policy="fail"))
    assert name.split("/")[-1] in str(info.value)


def test_colliding_file_keys_are_refused():
    root = _corpus("inputs_collide")
    (root / "other").mkdir()
    (root / "other" / "a.txt").write_text("x\n")
    with pytest.raises(DataError, match="a.txt"):
        expand_inputs([root / "d" / "a.txt", root / "other" / "a.txt"])


def test_parquet_rows_are_documents_and_bad_rows_are_counted():
    import pyarrow as pa  # the test extra installs it
    import pyarrow.parquet as pq

    root = TMP / "inputs_parquet"
    (root / "d").mkdir(parents=True, exist_ok=True)
    rows = ["row zero", "", None, "row three"] + [f"more {i}" for i in range(2000)]
    pq.write_table(pa.table({"text": rows, "id": list(range(len(rows)))}),
                   root / "d" / "a.parquet", row_group_size=700)
    pq.write_table(pa.table({"body": ["x"]}), root / "d" / "nocol.parquet")
    (root / "d" / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    files = expand_inputs([root / "d"])
    assert [(f.key, f.kind) for f in files] == [
        ("d/a.parquet", "parquet"), ("d/corrupt.parquet", "parquet"),
        ("d/nocol.parquet", "parquet")]
    report = InputReport()
    docs = list(iter_documents(files, report))
    expected = [(i, t) for i, t in enumerate(rows) if t]
    assert [(d.index, d.text) for d in docs] == expected
    assert report.problems() == {
        "d/a.parquet": {"empty": 1, "missing_field": 1},
        "d/corrupt.parquet": {"unreadable": 1},
        "d/nocol.parquet": {"missing_field": 1},
    }
    with pytest.raises(DataError, match="nocol.parquet"):
        list(iter_documents(expand_inputs([root / "d" / "nocol.parquet"]), InputReport(),
                            policy="fail"))
