"""One task's shards (make_shards' default): contents equal the tokenised input, manifest,
resume inside the task, settings, bad input, the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
import webdataset as wds
from data_fixtures import (
    REPO,
    TMP,
    corpus_docs,
    corpus_file,
    load_prep_module,
    scenes,
    shard_dir,
    tokenizer_path,
    write_jsonl,
)

from liquid_dist.data import DataError, Tokenizer, read_manifest, verify_shards
from liquid_dist.data.prep import PrepSettings, prepare_shards
from liquid_dist.data.shards import file_sha256


def _expected_docs() -> dict[int, str]:
    """Ordinal -> text of every document of corpus_file()."""
    return dict(enumerate(corpus_docs()))


def test_shards_hold_the_tokenised_documents_and_match_the_manifest():
    out = shard_dir()
    tok = Tokenizer(tokenizer_path())
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["dtype"] == "uint16"
    assert manifest["tokenizer_sha256"] == tok.sha256
    expected = _expected_docs()
    seen: dict[int, str] = {}
    for shard in manifest["shards"]:
        path = out / shard["name"]
        assert path.stat().st_size == shard["bytes"] and file_sha256(path) == shard["sha256"]
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o444 for m in members)
            names = [m.name for m in members]
            assert len(names) == 2 * shard["documents"]
            tokens = 0
            for ids_name, json_name in zip(names[::2], names[1::2], strict=True):
                key = ids_name.split(".")[0]
                assert ids_name == f"{key}.ids.u16" and json_name == f"{key}.json"
                data = tar.extractfile(ids_name).read()
                meta = json.loads(tar.extractfile(json_name).read())
                ids = np.frombuffer(data, dtype="<u2")
                ordinal = int(key)
                assert meta == {"source": "scenes.jsonl", "doc": ordinal,
                                "tokens": len(ids), "crc32": zlib.crc32(data)}
                assert ids.tolist() == tok.encode(expected[ordinal])
                seen[ordinal] = shard["split"]
                tokens += len(ids)
        assert tokens == shard["tokens"]
        assert int(names[0].split(".")[0]) == shard["first_doc"]
        assert int(names[-1].split(".")[0]) == shard["last_doc"]
    # every document exactly once, in ordinal order within each split
    assert sorted(seen) == sorted(expected)
    assert set(seen.values()) == {"train", "val"}
    totals = manifest["totals"]
    assert totals["train"]["documents"] + totals["val"]["documents"] == len(expected)
    assert verify_shards(out) == []


def test_webdataset_reads_the_same_samples():
    out = shard_dir()
    manifest = read_manifest(out)
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == sum(s["documents"] for s in manifest["shards"])
    first = samples[0]
    assert set(first) >= {"__key__", "ids.u16", "json"}
    with tarfile.open(urls[0]) as tar:
        assert first["ids.u16"] == tar.extractfile(f"{first['__key__']}.ids.u16").read()


def _settings(**overrides: object) -> PrepSettings:
    return PrepSettings(**{"tokenizer": str(tokenizer_path()), "shard_size_mb": 0.3,
                           "val_fraction": 0.1, **overrides})  # type: ignore[arg-type]


def test_a_rerun_keeps_the_verified_shards_of_a_task_and_rewrites_the_partial_one():
    reference = shard_dir()
    full = read_manifest(reference / "task-00000")
    out = TMP / "resume"
    shutil.copytree(reference, out)
    task = out / "task-00000"
    # an interrupted task: its manifest lists 1 train shard, a partial .tmp and a stale shard
    # remain, datatrove has not marked it complete and there is no merged manifest
    interrupted = dict(full, complete=False, shards=[full["shards"][0]])
    interrupted.pop("totals")
    interrupted.pop("report")
    (task / "manifest.json").write_text(json.dumps(interrupted))
    (task / "train-000001.tar.tmp").write_bytes(b"half a shard")
    (task / "train-000002.tar").write_bytes(b"stale")
    (out / "datatrove" / "completions" / "00000").unlink()
    (out / "manifest.json").unlink()
    kept = (task / "train-000000.tar").stat()
    manifest = prepare_shards([corpus_file()], out, _settings())
    assert (task / "train-000000.tar").stat().st_ino == kept.st_ino
    assert (task / "train-000000.tar").stat().st_mtime_ns == kept.st_mtime_ns
    assert not (task / "train-000001.tar.tmp").exists()
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in full["shards"]]
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    # a listed shard that no longer matches its checksum is rewritten, with all after it
    with open(task / "train-000001.tar", "r+b") as fh:
        fh.seek(700)
        fh.write(b"\xff")
    (out / "datatrove" / "completions" / "00000").unlink()
    manifest = prepare_shards([corpus_file()], out, _settings())
    assert (task / "train-000000.tar").stat().st_mtime_ns == kept.st_mtime_ns
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in full["shards"]]
    assert verify_shards(out) == []


def test_rerun_with_other_settings_is_refused():
    out = TMP / "settings"
    prepare_shards([corpus_file()], out, _settings())
    with pytest.raises(DataError, match="prep.json: shards of a run with other recorded"):
        prepare_shards([corpus_file()], out, _settings(val_fraction=0.2))
    prepare_shards([corpus_file()], out, _settings(val_fraction=0.2), overwrite=True)
    assert read_manifest(out)["settings"]["val_fraction"] == 0.2


def test_bad_inputs_are_counted_in_the_manifest_or_fail_naming_the_file():
    root = TMP / "bad_inputs"
    good = write_jsonl(root / "in" / "good.jsonl", scenes()[500:503])
    (root / "in" / "latin1.txt").write_bytes("d\u00e9j\u00e0 vu\n".encode("latin-1"))
    (root / "in" / "empty.txt").write_bytes(b"")
    manifest = prepare_shards([root / "in", root / "nope.txt"], root / "out",
                              _settings(val_fraction=0.0))
    assert manifest["report"]["files"] == {
        "in/empty.txt": {"empty": 1}, "in/good.jsonl": {"documents": 3},
        "in/latin1.txt": {"invalid_utf8": 1}, "nope.txt": {"unreadable": 1}}
    assert manifest["totals"]["train"]["documents"] == 3
    with pytest.raises(DataError, match="latin1.txt"):
        prepare_shards([good, root / "in" / "latin1.txt"], root / "out_fail",
                       _settings(policy="fail"))


def test_cli_end_to_end_and_verify(capsys):
    out = TMP / "cli_shards"
    cmd = [sys.executable, str(REPO / "data_prep" / "make_shards.py"), "--tokenizer",
           str(tokenizer_path()), "--input", str(corpus_file()), "--output", str(out),
           "--shard-size-mb", "0.3", "--val-fraction", "0.1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train: 3 shards" in done.stdout
    verify = load_prep_module("make_shards").main
    assert verify(["--verify", "--output", str(out)]) == 0
    with open(out / "task-00000" / "val-000000.tar", "r+b") as fh:
        fh.seek(600)
        fh.write(b"\x00\x01")
    assert verify(["--verify", "--output", str(out)]) == 1
    assert "task-00000/val-000000.tar: sha256 differs" in capsys.readouterr().err
