"""The merge: every task's manifest -> the one ``OUTPUT/manifest.json`` the loader reads.

The shards stay where their task wrote them (``task-RANK/train-000000.tar``
is the name the merged manifest lists), so the merge copies nothing and
reads no shard: it checks that every task finished (datatrove's completion
marker and a complete task manifest) and that every listed shard exists with
its recorded size; ``make_shards.py --verify`` checks the sha256 sums.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from liquid_dist.data.errors import DataError
from liquid_dist.data.prep.steps import task_dir_name
from liquid_dist.data.shard_writer import SPLITS
from liquid_dist.data.shards import FORMAT_VERSION, MANIFEST_NAME, read_manifest, write_json_atomic
from liquid_dist.data.text_inputs import PROBLEMS

RUN_NAME = "prep.json"
"""The run's inputs, settings and task plan, written before any task starts."""
LOGS_DIR = "datatrove"
"""datatrove's logging directory inside the output unless the run names another (its record's
``logging_dir``): ``logs/task_RANK.log``, ``completions/``, ``stats/``, ``slurm/``."""
_SHOWN = 10


def logs_dir(output_dir: Union[str, Path]) -> Path:
    """datatrove's logging directory of the run in ``output_dir``."""
    out = Path(output_dir)
    if (out / RUN_NAME).is_file():
        return out / read_run(out)["logging_dir"]  # relative to the output, or absolute
    return out / LOGS_DIR


def task_log(output_dir: Union[str, Path], rank: int) -> Path:
    """The log datatrove writes for task ``rank``."""
    return logs_dir(output_dir) / "logs" / f"task_{rank:05d}.log"


def completion_marker(output_dir: Path, rank: int) -> Path:
    return logs_dir(output_dir) / "completions" / f"{rank:05d}"


def read_run(output_dir: Union[str, Path]) -> dict:
    """The run record (``prep.json``) of a preparation output; DataError when absent."""
    path = Path(output_dir) / RUN_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no run record (is this a prepare_shards output "
                        "directory?)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable run record ({exc})") from None


def unfinished_tasks(output_dir: Union[str, Path], tasks: int) -> list[int]:
    """The ranks of ``range(tasks)`` without a completion marker or a complete manifest."""
    out = Path(output_dir)
    unfinished = []
    for rank in range(tasks):
        manifest_path = out / task_dir_name(rank) / MANIFEST_NAME
        complete = False
        if completion_marker(out, rank).is_file() and manifest_path.is_file():
            try:
                complete = json.loads(manifest_path.read_text(encoding="utf-8")).get("complete")
            except ValueError:
                complete = False
        if not complete:
            unfinished.append(rank)
    return unfinished


def describe_tasks(output_dir: Union[str, Path], ranks: list[int]) -> str:
    """'task R (log PATH)' for the first ranks of ``ranks``, and how many more."""
    shown = "; ".join(f"task {r} (log {task_log(output_dir, r)})" for r in ranks[:_SHOWN])
    more = f"; and {len(ranks) - _SHOWN} more" if len(ranks) > _SHOWN else ""
    return shown + more


def shown(path: Path, out: Path) -> str:
    """``path`` relative to ``out`` when inside it, else as it is."""
    try:
        return path.relative_to(out).as_posix()
    except ValueError:
        return str(path)


def _problem_counts(report: dict) -> dict[str, int]:
    totals = {p: sum(c.get(p, 0) for c in report["files"].values()) for p in PROBLEMS}
    return {p: n for p, n in totals.items() if n}


def merge_tasks(output_dir: Union[str, Path]) -> dict:
    """Write ``OUTPUT/manifest.json`` from the task manifests and return it.

    Lists every task's shards (train, then val, task by task in rank order)
    under their path relative to the output, with documents, tokens, bytes
    and sha256; totals per split; the per-file input report of all tasks; and
    per task its files, totals, bad-input counts and log. Raises DataError,
    naming the tasks and their logs, while any task is unfinished; and naming
    the shard when a listed shard is missing or has another size.
    """
    out = Path(output_dir)
    run = read_run(out)
    tasks = run["plan"]["tasks"]
    unfinished = unfinished_tasks(out, tasks)
    if unfinished:
        raise DataError(f"{out}: {len(unfinished)} of {tasks} tasks unfinished: "
                        f"{describe_tasks(out, unfinished)}; run the command again to run them")
    shards: list[dict[str, Any]] = []
    report: dict[str, dict] = {"files": {}, "first_error": {}}
    task_entries = []
    first: dict[str, Any] = {}
    for rank in range(tasks):
        task_dir = task_dir_name(rank)
        manifest = read_manifest(out / task_dir)
        if manifest["settings"] != run["recorded"]:
            raise DataError(f"{out / task_dir / MANIFEST_NAME}: written with other settings "
                            f"than {out / RUN_NAME}; rerun with --overwrite")
        first = first or manifest
        for shard in manifest["shards"]:
            path = out / task_dir / shard["name"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                size = path.stat().st_size if path.is_file() else "no file"
                raise DataError(f"{path}: listed by task {rank} with {shard['bytes']} bytes, "
                                f"found {size}")
        shards += [dict(s, name=f"{task_dir}/{s['name']}", task=rank)
                   for split in SPLITS for s in manifest["shards"] if s["split"] == split]
        report["files"].update(manifest["report"]["files"])
        report["first_error"].update(manifest["report"]["first_error"])
        task_entries.append({"task": rank, "files": manifest["files"],
                             "totals": manifest["totals"],
                             "problems": _problem_counts(manifest["report"]),
                             "log": shown(task_log(out, rank), out)})
    merged = {
        "format_version": FORMAT_VERSION, "dtype": first["dtype"],
        "ids_suffix": first["ids_suffix"], "tokenizer": first["tokenizer"],
        "tokenizer_sha256": first["tokenizer_sha256"], "vocab_size": first["vocab_size"],
        "inputs": run["inputs"], "settings": run["recorded"], "complete": True,
        "shards": shards,
        "totals": {split: {"shards": sum(1 for s in shards if s["split"] == split),
                           "documents": sum(s["documents"] for s in shards
                                            if s["split"] == split),
                           "tokens": sum(s["tokens"] for s in shards if s["split"] == split)}
                   for split in SPLITS},
        "report": {k: dict(sorted(v.items())) for k, v in report.items()},
        "tasks": task_entries,
    }
    write_json_atomic(out / MANIFEST_NAME, merged)
    return merged
