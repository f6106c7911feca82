"""Which task reads which input file or byte range, and each document's key, independent of
the task count.

The plan is made once, by the command that launches the tasks, and travels
with the pipeline: a task never lists or measures the inputs itself, so every
task of a run sees the same assignment, whichever executor runs it.

Units: the input files, in the order of :func:`expand_inputs`, except that a
file larger than ``split_bytes`` that can be read in byte ranges (uncompressed
jsonl, or uncompressed txt of blank-line documents: :func:`splittable`) is
replaced by its ranges [i * split_bytes, min((i + 1) * split_bytes, size)),
keyed ``KEY@START`` (:func:`byte_range`). The units depend on the inputs and
``split_bytes`` only, never on the task count.

Rule: the units are laid end to end; the total bytes are cut into ``tasks``
equal ranges and a unit belongs to the task whose range holds its middle
byte. A task's units are therefore a contiguous run of the input order,
concatenating the tasks in rank order gives the one-task order, and a task's
bytes differ from an equal share by less than its largest unit (a unit is
never split across tasks).

A document's key is its unit's number in the input order and its index in
the unit (:func:`doc_ordinal`): the same for any task count, and increasing
in the input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from liquid_dist.data.errors import DataError
from liquid_dist.data.text_inputs import (
    InputFile,
    byte_range,
    expand_inputs,
    input_size,
    splittable,
)

DOC_INDEX_SPAN = 10**12
"""Documents per file the key can number: ``ordinal = file number * DOC_INDEX_SPAN + index``."""


def doc_ordinal(file_no: int, index: int) -> int:
    """The ordinal (sample key number) of document ``index`` of input file ``file_no``.

    Unique across the inputs and increasing in the input order; the sample key
    ``sample_key(ordinal)`` reads as the file number followed by 12 digits of index.
    """
    if not 0 <= index < DOC_INDEX_SPAN:
        raise DataError(f"input file {file_no}: document index {index} is not in "
                        f"[0, {DOC_INDEX_SPAN})")
    return file_no * DOC_INDEX_SPAN + index


def assign_tasks(sizes: Sequence[int], tasks: int) -> list[int]:
    """The task of each file, for files of ``sizes`` bytes in input order.

    Non-decreasing in the input order; every task in ``range(tasks)`` may be
    empty when there are fewer files than tasks. Files of zero total size are
    spread by count instead of bytes.
    """
    if tasks < 1:
        raise ValueError(f"tasks {tasks} must be >= 1")
    total = sum(sizes)
    if total == 0:
        return [i * tasks // len(sizes) for i in range(len(sizes))]
    assigned, start = [], 0
    for size in sizes:
        twice_middle = 2 * start + size
        assigned.append(min(tasks - 1, twice_middle * tasks // (2 * total)))
        start += size
    return assigned


@dataclass(frozen=True)
class PlannedFile:
    """One input file or byte range, its number in the input order, its size when planned
    (the range's length) and its task."""

    file: InputFile
    number: int
    size: int
    task: int


@dataclass(frozen=True)
class TaskPlan:
    """Every input file or byte range with its task, for a run of ``tasks`` tasks."""

    tasks: int
    files: tuple[PlannedFile, ...]

    def files_of(self, rank: int) -> list[PlannedFile]:
        """The files task ``rank`` reads, in input order."""
        if not 0 <= rank < self.tasks:
            raise DataError(f"task {rank} is not in a plan of {self.tasks} tasks")
        return [f for f in self.files if f.task == rank]

    def to_dict(self) -> dict:
        """The plan as JSON: per file its key, number, bytes and task, and a range's
        start and end."""
        return {"tasks": self.tasks, "files": [_planned_dict(f) for f in self.files]}


def _planned_dict(f: PlannedFile) -> dict:
    out = {"key": f.file.key, "number": f.number, "bytes": f.size, "task": f.task}
    if f.file.end is not None:
        out.update(start=f.file.start, end=f.file.end)
    return out


def _units(f: InputFile, split_bytes: Optional[int], txt_docs: str) -> list[tuple[InputFile, int]]:
    """``f`` and its size (0 when missing), or its byte ranges of ``split_bytes`` and their
    lengths when it is splittable and larger."""
    size = input_size(f) or 0
    if split_bytes is None or size <= split_bytes or not splittable(f, txt_docs):
        return [(f, size)]
    return [(byte_range(f, start, min(start + split_bytes, size)),
             min(split_bytes, size - start)) for start in range(0, size, split_bytes)]


def plan_tasks(inputs: Sequence[Union[str, Path]], tasks: int, *,
               split_bytes: Optional[int] = None,
               txt_docs: str = "blank-line") -> TaskPlan:
    """Expand ``inputs``, cut the files larger than ``split_bytes`` (None: none) that can be
    read in byte ranges, and assign every file or range to one of ``tasks`` tasks.

    ``txt_docs`` is the reading's (only blank-line txt files can be cut). A
    missing file is planned with size 0 (its task counts it unreadable, or
    fails under policy fail), so no input is left out of the plan.
    """
    if split_bytes is not None and split_bytes < 1:
        raise ValueError(f"split_bytes {split_bytes} must be >= 1")
    files = expand_inputs(inputs)
    if not files:
        raise DataError(f"no input files in {[str(i) for i in inputs]}")
    units = [unit for f in files for unit in _units(f, split_bytes, txt_docs)]
    sizes = [size for _, size in units]
    return TaskPlan(tasks, tuple(
        PlannedFile(f, number, size, task)
        for number, ((f, size), task) in enumerate(zip(units, assign_tasks(sizes, tasks),
                                                       strict=True))))
