"""Build the preparation pipeline; run it on datatrove's local executor and merge, or submit it
to Slurm as a job array followed by a merge job."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from datatrove.data import DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from liquid_dist.data.errors import DataError
from liquid_dist.data.prep.merge import (
    LOGS_DIR,
    RUN_NAME,
    completion_marker,
    describe_tasks,
    merge_tasks,
    shown,
    unfinished_tasks,
)
from liquid_dist.data.prep.plan import TaskPlan, plan_tasks
from liquid_dist.data.prep.steps import (
    PrepSettings,
    SentencePieceTokenizer,
    TextInputsReader,
    WebDatasetShardWriter,
)
from liquid_dist.data.shard_writer import kept_shards
from liquid_dist.data.shards import MANIFEST_NAME, write_json_atomic
from liquid_dist.data.tokenizer import Tokenizer

_TASK_DIR = re.compile(r"^task-\d{5}$")


@dataclass(frozen=True)
class SlurmSettings:
    """How ``--executor slurm`` submits the tasks: one job array (``concurrency`` elements
    at a time, -1 for no limit), each element one task with ``cpus_per_task`` CPUs and
    ``mem_per_cpu_gb`` GB per CPU for at most ``time``; then the merge, a job that starts
    after every element succeeded (``--dependency=afterok``). ``sbatch_args``: further
    ``#SBATCH --KEY=VALUE`` lines (account, qos, constraint...)."""

    partition: str
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    concurrency: int = -1
    job_name: str = "liquid-prep"
    sbatch_args: tuple[tuple[str, str], ...] = ()


def build_pipeline(output_dir: Union[str, Path], plan: TaskPlan,
                   settings: PrepSettings) -> list[PipelineStep]:
    """The steps every task runs: read its files of ``plan``, tokenise, write its shards."""
    reader = TextInputsReader(plan, settings)
    return [reader, SentencePieceTokenizer(settings.tokenizer),
            WebDatasetShardWriter(str(output_dir), plan, settings, reader)]


class MergeStep(PipelineStep):
    """The merge as a pipeline of one task, so that Slurm can run it after the array."""

    name = "merge"
    type = "🔗 - MERGE"

    def __init__(self, output_dir: str):
        super().__init__()
        self.output_dir = output_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        manifest = merge_tasks(self.output_dir)
        for split, totals in manifest["totals"].items():
            self.stat_update(f"{split}_tokens", value=totals["tokens"])
        yield from ()


def run_record(inputs: Sequence[Union[str, Path]], plan: TaskPlan, settings: PrepSettings,
               logging_dir: str) -> dict[str, Any]:
    """What ``prep.json`` holds: the inputs, the settings, the recorded settings, the plan
    and datatrove's logging directory (relative to the output when inside it)."""
    tok = Tokenizer(settings.tokenizer)
    return {"inputs": [str(i) for i in inputs], "settings": asdict(settings),
            "recorded": settings.recorded(tok, plan), "plan": plan.to_dict(),
            "logging_dir": logging_dir}


def remove_run(output_dir: Path) -> None:
    """Delete the shards of an earlier run in ``output_dir``: the run record, the task
    directories, datatrove's logs and the manifest and shards at the top (a merged manifest,
    or make_shards' output). Other files stay."""
    (output_dir / RUN_NAME).unlink(missing_ok=True)
    (output_dir / MANIFEST_NAME).unlink(missing_ok=True)
    kept_shards(output_dir, None)  # keeps none: deletes every shard file at the top
    for path in output_dir.iterdir():
        if path.is_dir() and (_TASK_DIR.match(path.name) or path.name == LOGS_DIR):
            shutil.rmtree(path)


def _check_output(out: Path, record: dict[str, Any]) -> None:
    """DataError unless ``out`` is empty of shards or holds a run of the same plan and
    settings (the inputs may be named by other paths: the plan holds their keys and sizes;
    another logging directory only loses the earlier completion marks: a task run again
    keeps its shards)."""
    path = out / RUN_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{path}: unreadable run record ({exc}); use --overwrite") from None
        differs = sorted(k for k in set(old) | set(record)
                         if k not in ("inputs", "logging_dir") and old.get(k) != record.get(k))
        if differs:
            raise DataError(f"{path}: shards of a run with other {', '.join(differs)}; use a "
                            "new output directory or --overwrite")
    elif (out / MANIFEST_NAME).is_file():
        raise DataError(f"{out / MANIFEST_NAME}: shards written without tasks; use a new output "
                        "directory or --overwrite")


def _start(inputs: Sequence[Union[str, Path]], out: Path, settings: PrepSettings,
           tasks: int, overwrite: bool, logging_dir: Optional[Union[str, Path]]
           ) -> tuple[TaskPlan, Path]:
    """Plan, check or clear the output, write the run record, and unmark every task whose
    shards are not complete (so that datatrove runs it again); the plan and the logging
    directory (``OUTPUT/datatrove`` unless given)."""
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_tasks(inputs, tasks, split_bytes=settings.split_bytes,
                      txt_docs=settings.txt_docs)
    logs = Path(logging_dir).resolve() if logging_dir else out.resolve() / LOGS_DIR
    record = run_record(inputs, plan, settings, shown(logs, out.resolve()))
    if overwrite:
        remove_run(out)
    else:
        _check_output(out, record)
    write_json_atomic(out / RUN_NAME, record)
    for rank in unfinished_tasks(out, tasks):
        completion_marker(out, rank).unlink(missing_ok=True)
    return plan, logs


def prepare_shards(inputs: Sequence[Union[str, Path]], output_dir: Union[str, Path],
                   settings: PrepSettings, *, tasks: int = 1, workers: int = 1,
                   overwrite: bool = False,
                   logging_dir: Optional[Union[str, Path]] = None) -> dict:
    """Prepare ``inputs`` as ``tasks`` tasks on this machine, ``workers`` at a time; merge.

    Runs only the tasks not finished by an earlier run with the same inputs,
    settings and task count: a task is finished when datatrove marked it
    complete and its manifest says complete (a marked task whose manifest is
    gone or partial runs again, keeping its verified complete shards). Another
    run's output is refused unless ``overwrite``, which deletes it first.
    datatrove's logs, stats and completion marks go to ``logging_dir``
    (``OUTPUT/datatrove`` by default). Returns the merged manifest. A failed
    task raises DataError naming the unfinished tasks, their logs and the
    task's error.
    """
    if tasks < 1 or workers < 1:
        raise ValueError(f"tasks {tasks} and workers {workers} must be >= 1")
    out = Path(output_dir)
    plan, logs = _start(inputs, out, settings, tasks, overwrite, logging_dir)
    executor = LocalPipelineExecutor(build_pipeline(out, plan, settings), tasks=tasks,
                                     workers=min(workers, tasks), logging_dir=str(logs))
    try:
        executor.run()
    except Exception as exc:
        unfinished = unfinished_tasks(out, tasks)
        raise DataError(f"{out}: {len(unfinished)} of {tasks} tasks unfinished: "
                        f"{describe_tasks(out, unfinished)}; first error: "
                        f"{type(exc).__name__}: {exc}") from exc
    return merge_tasks(out)


@dataclass(frozen=True)
class Submitted:
    """What :func:`submit_shards` submitted: the array's job id and tasks (None, [] when
    every task had finished), the merge's job id (None when the merge had run), and the
    directory of the jobs' Slurm logs."""

    array_job: Optional[str]
    tasks: list[int]
    merge_job: Optional[str]
    slurm_logs: Path


def submit_shards(inputs: Sequence[Union[str, Path]], output_dir: Union[str, Path],
                  settings: PrepSettings, slurm: SlurmSettings, *, tasks: int,
                  overwrite: bool = False,
                  logging_dir: Optional[Union[str, Path]] = None) -> Submitted:
    """Submit ``inputs`` as a Slurm job array of ``tasks`` tasks and the merge after it.

    The same pipeline, plan and resume rules as :func:`prepare_shards`:
    launched again, only the unfinished tasks are submitted (a task keeps its
    verified complete shards), and the merge again when it has not run. A
    preempted or requeued element (``scontrol requeue``; SIGUSR1 requeues it
    through datatrove) reruns its task the same way. Returns at once; the
    merged manifest appears when the merge job ends (its log names any
    unfinished task).
    """
    if tasks < 1:
        raise ValueError(f"tasks {tasks} must be >= 1")
    out = Path(output_dir).resolve()
    plan, logs = _start(inputs, out, settings, tasks, overwrite, logging_dir)
    common: dict[str, Any] = {
        "time": slurm.time, "partition": slurm.partition, "qos": "",
        "sbatch_args": dict(slurm.sbatch_args),
        # the array elements run the python that submitted them
        "env_command": f"export PATH={Path(sys.executable).parent}:$PATH"}
    array = SlurmPipelineExecutor(
        build_pipeline(out, plan, settings), tasks=tasks, workers=slurm.concurrency,
        cpus_per_task=slurm.cpus_per_task, mem_per_cpu_gb=slurm.mem_per_cpu_gb,
        job_name=slurm.job_name, logging_dir=str(logs), slurm_logs_folder=str(logs / "slurm"),
        **common)
    to_run = array.get_incomplete_ranks()
    merge_logs = logs / "merge"
    merge = SlurmPipelineExecutor(
        [MergeStep(str(out))], tasks=1, depends=array, job_name=f"{slurm.job_name}-merge",
        logging_dir=str(merge_logs), slurm_logs_folder=str(logs / "slurm"), **common)
    if to_run:  # the merge of an earlier launch is out of date
        (merge_logs / "completions" / "00000").unlink(missing_ok=True)
    try:
        merge.run()  # submits the array first (its dependency), then the merge
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DataError(f"{out}: submitting failed: {exc} (sbatch's own message is above; "
                        f"the launch script is {logs / 'launch_script.slurm'})") from exc
    array_job = array.job_id if array.job_id not in (None, -1) else None
    merge_job = merge.job_id if merge.job_id not in (None, -1) else None
    return Submitted(array_job and str(array_job), to_run if array_job else [],
                     merge_job and str(merge_job), logs / "slurm")
