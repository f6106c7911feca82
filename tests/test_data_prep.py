"""Shard preparation as a datatrove pipeline: N tasks give one machine's documents and ids."""

from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_fixtures import (
    PREP_VAL_FRACTION,
    TMP,
    data_config,
    load_prep_module,
    mixed_inputs,
    prep_settings,
    shard_dir,
    tokenizer_path,
)

from liquid_dist.data import (
    DataError,
    InputFile,
    InputReport,
    Tokenizer,
    build_train_loader,
    expand_inputs,
    iter_documents,
)
from liquid_dist.data.prep import (
    assign_tasks,
    merge_tasks,
    plan_tasks,
    prepare_shards,
    task_dir_name,
    task_log,
    unfinished_tasks,
)
from liquid_dist.data.shard_writer import assign_split
from liquid_dist.data.shards import decode_sample, read_manifest, resolve_shards, verify_shards


def _prepare(name: str, tasks: int, **overrides: object) -> Path:
    out = TMP / name
    prepare_shards([mixed_inputs()], out, prep_settings(**overrides), tasks=tasks)
    return out


@functools.cache
def four_tasks() -> Path:
    return _prepare("prep_4", 4)


def _units() -> list[InputFile]:
    """The input units of mixed_inputs(): its files, the large ones cut in byte ranges."""
    settings = prep_settings()
    return [f.file for f in plan_tasks([mixed_inputs()], 1, split_bytes=settings.split_bytes,
                                       txt_docs=settings.txt_docs).files]


def _one_machine() -> tuple[dict[tuple[str, int], list[int]], InputReport]:
    """(unit key, index) -> Tokenizer.encode ids of every document, read in one process, and
    the input report. The units' documents are the whole files' documents, in order."""
    tok = Tokenizer(tokenizer_path())
    report = InputReport()
    docs = list(iter_documents(_units(), report))
    whole = iter_documents(expand_inputs([mixed_inputs()]), InputReport())
    assert [d.text for d in docs] == [d.text for d in whole]
    return {(d.key, d.index): tok.encode(d.text) for d in docs}, report


def _written(out: Path) -> dict[tuple[str, int], tuple[str, str, list[int]]]:
    """(file key, index) -> (split, sample key, ids) of every sample the merged manifest lists;
    fails on a document written twice."""
    manifest = read_manifest(out)
    found: dict[tuple[str, int], tuple[str, str, list[int]]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            names = tar.getnames()
            for ids_name, json_name in zip(names[::2], names[1::2], strict=True):
                meta = json.loads(tar.extractfile(json_name).read())
                ids = np.frombuffer(tar.extractfile(ids_name).read(), dtype="<u2")
                where = (meta["source"], meta["doc"])
                assert where not in found, f"{where} written twice"
                found[where] = (shard["split"], ids_name.split(".")[0], ids.tolist())
    return found


def test_four_tasks_write_every_document_once_with_the_one_machine_ids():
    out = four_tasks()
    expected, report = _one_machine()
    written = _written(out)
    assert {k: ids for k, (_, _, ids) in written.items()} == expected
    assert {k: split for k, (split, _, _) in written.items()} == {
        k: assign_split(k[0], k[1], PREP_VAL_FRACTION, 0) for k in expected}
    manifest = read_manifest(out)
    assert manifest["report"] == report.to_dict()
    assert manifest["report"]["files"]["prep_inputs/text/latin1.txt"] == {"invalid_utf8": 2}
    assert {t["task"] for t in manifest["tasks"] if t["totals"]["train"]["documents"]} == {
        0, 1, 2, 3}
    assert [f for t in manifest["tasks"] for f in t["files"]] == [
        f.key for f in _units()]
    split = [t["task"] for t in manifest["tasks"] for f in t["files"] if "part0.jsonl@" in f]
    assert len(split) == 4 and len(set(split)) == 3  # one file's ranges in three tasks
    assert sum(t["totals"]["train"]["tokens"] + t["totals"]["val"]["tokens"]
               for t in manifest["tasks"]) == sum(len(ids) for ids in expected.values())
    assert verify_shards(out) == []


def test_reruns_write_byte_identical_shards_and_manifests():
    a, b = four_tasks(), _prepare("prep_4_again", 4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()
                   and p.parts[len(a.parts)] != "datatrove")
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()
                           and p.parts[len(b.parts)] != "datatrove")
    assert sum(1 for f in files if f.suffix == ".tar") > 8
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_one_task_writes_the_same_documents_keys_ids_and_split_as_four():
    one = _prepare("prep_1", 1)
    assert _written(one) == _written(four_tasks())
    for split in ("train", "val"):
        one_totals = read_manifest(one)["totals"][split]
        four_totals = read_manifest(four_tasks())["totals"][split]
        assert (one_totals["documents"], one_totals["tokens"]) == (
            four_totals["documents"], four_totals["tokens"])
        assert one_totals["shards"] < four_totals["shards"]


def test_concurrent_tasks_write_the_same_shards_as_one_at_a_time():
    out = TMP / "prep_4_workers"
    prepare_shards([mixed_inputs()], out, prep_settings(), tasks=4, workers=2)
    shards = sorted(p.relative_to(out) for p in out.glob("task-*/*.tar"))
    assert shards == sorted(p.relative_to(four_tasks()) for p in four_tasks().glob("task-*/*.tar"))
    for name in shards:
        assert (out / name).read_bytes() == (four_tasks() / name).read_bytes(), name
    assert (out / "manifest.json").read_bytes() == (four_tasks() / "manifest.json").read_bytes()


def test_the_loader_reads_the_merged_manifest():
    out = four_tasks()
    manifest = read_manifest(out)
    tok = Tokenizer(tokenizer_path())
    for split in ("train", "val"):
        shards = resolve_shards(str(out), split)
        assert shards.urls == tuple(str(out / s["name"]) for s in manifest["shards"]
                                    if s["split"] == split)
        assert shards.documents == manifest["totals"][split]["documents"]
        assert shards.tokens == manifest["totals"][split]["tokens"]
        suffix = shards.suffix_for(tok, str(out))
        samples = list(wds.WebDataset(list(shards.urls), shardshuffle=False, empty_check=False))
        assert len(samples) == shards.documents
        assert sum(len(decode_sample(s, suffix=suffix, vocab_size=tok.vocab_size))
                   for s in samples) == shards.tokens
    cfg = data_config(train_shards=str(out), val_shards=str(out), bad_sample_policy="fail",
                      batches_per_epoch=6)
    loader = build_train_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    assert sum(1 for _ in loader) == len(loader) == 6
    assert loader.stats()["bad_samples"] == {}


def test_merge_refuses_while_a_task_is_unfinished_naming_it_and_its_log():
    out = TMP / "prep_unfinished"
    shutil.copytree(four_tasks(), out)
    (out / "datatrove" / "completions" / "00002").unlink()
    manifest_1 = out / "task-00001" / "manifest.json"
    manifest_1.write_text(json.dumps(dict(json.loads(manifest_1.read_text()), complete=False)))
    with pytest.raises(DataError) as info:
        merge_tasks(out)
    message = str(info.value)
    assert "2 of 4 tasks unfinished" in message
    assert f"task 1 (log {task_log(out, 1)})" in message
    assert f"task 2 (log {task_log(out, 2)})" in message
    assert "task 0" not in message and "task 3" not in message


def test_a_rerun_runs_only_the_unfinished_tasks():
    out = TMP / "prep_rerun"
    shutil.copytree(four_tasks(), out)
    (out / "datatrove" / "completions" / "00002").unlink()
    shutil.rmtree(out / "task-00002")
    shutil.rmtree(out / "task-00001")  # marked complete by datatrove, but its shards are gone
    (out / "manifest.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in out.glob("task-0000[03]/*")}
    prepare_shards([mixed_inputs()], out, prep_settings(), tasks=4)
    assert {p: p.stat().st_mtime_ns for p in out.glob("task-0000[03]/*")} == kept
    assert _written(out) == _written(four_tasks())
    assert (out / "manifest.json").read_bytes() == (four_tasks() / "manifest.json").read_bytes()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("task-*/*")}
    prepare_shards([mixed_inputs()], out, prep_settings(), tasks=4)
    assert {p: p.stat().st_mtime_ns for p in out.glob("task-*/*")} == finished


def test_a_task_killed_part_way_keeps_its_complete_shards_and_the_rerun_equals_one_run():
    out, rank = TMP / "prep_killed", 2
    settings = prep_settings()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("prep_kill_worker.py")), str(out),
         str(rank), json.dumps(asdict(settings)), str(mixed_inputs())],
        capture_output=True, text=True, timeout=300, start_new_session=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    task = out / task_dir_name(rank)
    left = json.loads((task / "manifest.json").read_text())
    assert not left["complete"] and left["shards"] and list(task.glob("*.tar.tmp"))
    assert unfinished_tasks(out, 4) == [2, 3]
    kept = {task / s["name"]: (task / s["name"]).stat().st_mtime_ns for s in left["shards"]}
    prepare_shards([mixed_inputs()], out, settings, tasks=4)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    reference = four_tasks()
    files = sorted(p.relative_to(reference) for p in reference.glob("task-*/*"))
    assert files == sorted(p.relative_to(out) for p in out.glob("task-*/*"))
    for name in [*files, Path("manifest.json")]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_other_settings_task_count_or_layout_are_refused_unless_overwrite():
    out = TMP / "prep_settings"
    shutil.copytree(four_tasks(), out)
    with pytest.raises(DataError, match="prep.json: shards of a run with other plan, recorded"):
        prepare_shards([mixed_inputs()], out, prep_settings(), tasks=3)
    manifest = prepare_shards([mixed_inputs()], out, prep_settings(), tasks=3, overwrite=True)
    assert len(manifest["tasks"]) == 3 and not (out / "task-00003").exists()
    one_machine = TMP / "prep_over_make_shards"  # shards of a directory without tasks
    shutil.copytree(shard_dir() / "task-00000", one_machine)
    with pytest.raises(DataError, match="manifest.json: shards written without tasks"):
        prepare_shards([mixed_inputs()], one_machine, prep_settings(), tasks=2)
    prepare_shards([mixed_inputs()], one_machine, prep_settings(), tasks=2, overwrite=True)
    assert sorted(p.name for p in one_machine.iterdir()) == [
        "datatrove", "manifest.json", "prep.json", "task-00000", "task-00001"]


def test_a_failed_task_names_the_task_its_log_and_the_file():
    out = TMP / "prep_fail"
    with pytest.raises(DataError) as info:
        prepare_shards([mixed_inputs()], out, prep_settings(policy="fail"), tasks=4)
    failing = plan_tasks([mixed_inputs()], 4, split_bytes=prep_settings().split_bytes)
    rank = next(f.task for f in failing.files if f.file.key.endswith("part2.jsonl.gz"))
    message = str(info.value)
    assert f"task {rank} (log {task_log(out, rank)})" in message
    assert "part2.jsonl.gz: bad_json" in message


def test_datatrove_logs_go_to_the_logging_directory_given():
    out, logs = TMP / "prep_logs_elsewhere", TMP / "prep_logs"
    manifest = prepare_shards([mixed_inputs()], out, prep_settings(), tasks=2, logging_dir=logs)
    assert not (out / "datatrove").exists()
    assert [t["log"] for t in manifest["tasks"]] == [str(logs / "logs" / f"task_{r:05d}.log")
                                                     for r in (0, 1)]
    assert sorted(p.name for p in (logs / "completions").iterdir()) == ["00000", "00001"]
    assert task_log(out, 1) == logs / "logs" / "task_00001.log" and task_log(out, 1).is_file()


def test_files_go_to_tasks_in_input_order_by_their_middle_byte():
    assert assign_tasks([10, 10, 10, 10], 2) == [0, 0, 1, 1]
    assert assign_tasks([100, 1, 1, 1], 2) == [0, 1, 1, 1]
    assert assign_tasks([5, 5], 4) == [1, 3]
    assert assign_tasks([0, 0, 0], 2) == [0, 0, 1]
    sizes = [f.stat().st_size for f in sorted(mixed_inputs().rglob("*")) if f.is_file()]
    for tasks in (1, 3, 4, 7):
        assigned = assign_tasks(sizes, tasks)
        assert assigned == sorted(assigned) and set(assigned) <= set(range(tasks))


def test_cli_tasks_runs_the_pipeline_and_verify_checks_its_shards(capsys):
    out = TMP / "prep_cli"
    main = load_prep_module("make_shards").main
    assert main(["--tokenizer", str(tokenizer_path()), "--input", str(mixed_inputs()),
                 "--output", str(out), "--shard-size-mb", "0.05", "--split-mb", "0.1",
                 "--val-fraction",
                 str(PREP_VAL_FRACTION), "--tasks", "4", "--workers", "1"]) == 0
    assert (out / "manifest.json").read_bytes() == (four_tasks() / "manifest.json").read_bytes()
    assert main(["--verify", "--output", str(out)]) == 0
    with open(out / "task-00002" / "train-000000.tar", "r+b") as fh:
        fh.seek(600)
        fh.write(b"\x00\x01")
    assert main(["--verify", "--output", str(out)]) == 1
    assert "task-00002/train-000000.tar: sha256 differs" in capsys.readouterr().err
