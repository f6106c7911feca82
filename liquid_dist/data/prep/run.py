"""Build the preparation pipeline and run it on datatrove's local executor, then merge."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Union

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from liquid_dist.data.errors import DataError
from liquid_dist.data.prep.merge import (
    LOGS_DIR,
    RUN_NAME,
    completion_marker,
    describe_tasks,
    merge_tasks,
    unfinished_tasks,
)
from liquid_dist.data.prep.plan import TaskPlan, plan_tasks
from liquid_dist.data.prep.steps import (
    PrepSettings,
    SentencePieceTokenizer,
    TextInputsReader,
    WebDatasetShardWriter,
    clear_shard_dir,
)
from liquid_dist.data.shards import MANIFEST_NAME, write_json_atomic
from liquid_dist.data.tokenizer import Tokenizer

_TASK_DIR = re.compile(r"^task-\d{5}$")


def build_pipeline(output_dir: Union[str, Path], plan: TaskPlan,
                   settings: PrepSettings) -> list[PipelineStep]:
    """The steps every task runs: read its files of ``plan``, tokenise, write its shards."""
    reader = TextInputsReader(plan, settings)
    return [reader, SentencePieceTokenizer(settings.tokenizer),
            WebDatasetShardWriter(str(output_dir), plan, settings, reader)]


def run_record(inputs: Sequence[Union[str, Path]], plan: TaskPlan,
               settings: PrepSettings) -> dict[str, Any]:
    """What ``prep.json`` holds: the inputs, the settings, the recorded settings and the plan."""
    tok = Tokenizer(settings.tokenizer)
    return {"inputs": [str(i) for i in inputs], "settings": asdict(settings),
            "recorded": settings.recorded(tok, plan), "plan": plan.to_dict()}


def remove_run(output_dir: Path) -> None:
    """Delete the shards of an earlier run in ``output_dir``: the run record, the task
    directories, datatrove's logs and the manifest and shards at the top (a merged manifest,
    or make_shards' output). Other files stay."""
    (output_dir / RUN_NAME).unlink(missing_ok=True)
    clear_shard_dir(output_dir)
    for path in output_dir.iterdir():
        if path.is_dir() and (_TASK_DIR.match(path.name) or path.name == LOGS_DIR):
            shutil.rmtree(path)


def _check_output(out: Path, record: dict[str, Any]) -> None:
    """DataError unless ``out`` is empty of shards or holds a run of the same plan and
    settings (the inputs may be named by other paths: the plan holds their keys and sizes)."""
    path = out / RUN_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{path}: unreadable run record ({exc}); use --overwrite") from None
        differs = sorted(k for k in set(old) | set(record)
                         if k != "inputs" and old.get(k) != record.get(k))
        if differs:
            raise DataError(f"{path}: shards of a run with other {', '.join(differs)}; use a "
                            "new output directory or --overwrite")
    elif (out / MANIFEST_NAME).is_file():
        raise DataError(f"{out / MANIFEST_NAME}: shards written without tasks; use a new output "
                        "directory or --overwrite")


def prepare_shards(inputs: Sequence[Union[str, Path]], output_dir: Union[str, Path],
                   settings: PrepSettings, *, tasks: int = 1, workers: int = 1,
                   overwrite: bool = False) -> dict:
    """Prepare ``inputs`` as ``tasks`` tasks on this machine, ``workers`` at a time; merge.

    Runs only the tasks not finished by an earlier run with the same inputs,
    settings and task count: a task is finished when datatrove marked it
    complete and its manifest says complete (a marked task whose manifest is
    gone or partial runs again). Another run's output is refused unless
    ``overwrite``, which deletes it first. Returns the merged manifest. A
    failed task raises DataError naming the unfinished tasks, their logs and
    the task's error.
    """
    if tasks < 1 or workers < 1:
        raise ValueError(f"tasks {tasks} and workers {workers} must be >= 1")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_tasks(inputs, tasks)
    record = run_record(inputs, plan, settings)
    if overwrite:
        remove_run(out)
    else:
        _check_output(out, record)
    write_json_atomic(out / RUN_NAME, record)
    for rank in unfinished_tasks(out, tasks):
        completion_marker(out, rank).unlink(missing_ok=True)
    executor = LocalPipelineExecutor(build_pipeline(out, plan, settings), tasks=tasks,
                                     workers=min(workers, tasks),
                                     logging_dir=str(out / LOGS_DIR))
    try:
        executor.run()
    except Exception as exc:
        unfinished = unfinished_tasks(out, tasks)
        raise DataError(f"{out}: {len(unfinished)} of {tasks} tasks unfinished: "
                        f"{describe_tasks(out, unfinished)}; first error: "
                        f"{type(exc).__name__}: {exc}") from exc
    return merge_tasks(out)
