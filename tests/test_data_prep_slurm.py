"""``make_shards.py --executor slurm`` on the real local Slurm (tests/slurm_fixtures.py).

One scenario, in order: a job array of 4 tasks and its merge job write what
datatrove's local executor writes; ``scontrol requeue`` of a running element
reruns it keeping its complete shards; an element killed part-way leaves the
merge waiting, and the command run again submits that task alone, which
keeps its complete shards, and the merge.

The last input is a named pipe fed by a thread, so the test decides when
task 3 (which reads it last) may go on: the feeder writes the first
documents and, while ``hold`` is set, waits before the rest. Task 3 then
sits part-way through its input with complete shards on disk, as a task
does that a preemption or a lost node hits.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from data_fixtures import REPO, mixed_inputs, prep_settings, scenes
from slurm_fixtures import Cluster, job_state, wait_for

from liquid_dist.data.prep import prepare_shards, task_dir_name

pytestmark = pytest.mark.slow
TASKS = 4
LAST = TASKS - 1


class PipeFeeder:
    """Writes ``first`` then ``rest`` (bytes) into the named pipe ``path`` for every reader
    that opens it; while ``hold`` is set, waits after ``first``. ``held`` counts the
    readers that reached the hold."""

    def __init__(self, path: Path, first: bytes, rest: bytes):
        self.path, self.first, self.rest = path, first, rest
        self.hold, self.released, self.stop = threading.Event(), threading.Event(), False
        self.held = 0
        os.mkfifo(path)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                with open(self.path, "wb") as fh:  # blocks until a reader opens the pipe
                    if self.stop:
                        return
                    fh.write(self.first)
                    fh.flush()
                    if self.hold.is_set():
                        self.held += 1
                        self._wait_for_release(fh.fileno())
                    fh.write(self.rest)
            except BrokenPipeError:  # the reader was killed
                pass
            self._wait_until_unread()

    def _wait_until_unread(self) -> None:
        """Until the last reader closed the pipe: opening it for writing again before that
        would go on feeding the reader that was served."""
        while not self.stop:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no reader
                    return
                raise
            os.close(fd)
            time.sleep(0.05)

    def _wait_for_release(self, fd: int) -> None:
        """Wait until released; BrokenPipeError as soon as the reader is gone (killed)."""
        poll = select.poll()
        poll.register(fd, select.POLLERR)
        while not self.released.wait(0.2):
            if poll.poll(0):
                raise BrokenPipeError(f"{self.path}: the reader went away")

    def close(self) -> None:
        self.stop = True
        self.released.set()
        try:  # unblock a writer waiting for a reader
            os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
        except OSError:
            pass
        self.thread.join(timeout=10)


@pytest.fixture
def feeder(tmp_path: Path) -> Iterator[PipeFeeder]:
    lines = [json.dumps({"text": t}) + "\n" for t in scenes()[600:760]]
    f = PipeFeeder(tmp_path / "late.jsonl", "".join(lines[:120]).encode(),
                   "".join(lines[120:]).encode())
    yield f
    f.close()


def make_shards(cluster: Cluster, inputs: list[str], out: Path) -> str:
    """``make_shards.py --executor slurm``; its stdout. Every job it submitted is recorded
    for the fixture to cancel."""
    settings = prep_settings()
    cmd = [sys.executable, str(REPO / "data_prep" / "make_shards.py"), "--tokenizer",
           settings.tokenizer, "--input", *inputs, "--output", str(out), "--shard-size-mb",
           str(settings.shard_size_mb), "--val-fraction", str(settings.val_fraction),
           "--split-mb", str(settings.split_mb),
           "--tasks", str(TASKS), "--executor", "slurm", "--partition", "local", "--time", "10",
           "--mem-per-cpu-gb", "1"]
    done = subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    queued = cluster.cmd("squeue", "-h", "-o", "%F").split()
    cluster.jobs += sorted(set(queued))
    return done.stdout


def task_shards(out: Path, rank: int) -> dict[Path, int]:
    """The complete shards task ``rank``'s manifest lists, with their mtimes."""
    task = out / task_dir_name(rank)
    if not (task / "manifest.json").is_file():
        return {}
    listed = json.loads((task / "manifest.json").read_text())["shards"]
    return {task / s["name"]: (task / s["name"]).stat().st_mtime_ns for s in listed}


def element(job: str, rank: int) -> str:
    return f"{job}_{rank}"


def test_a_job_array_and_merge_write_the_local_shards_and_a_killed_element_reruns_alone(
        slurm: Cluster, feeder: PipeFeeder, tmp_path: Path) -> None:
    inputs = [str(mixed_inputs()), str(feeder.path)]
    reference = tmp_path / "local"
    prepare_shards(inputs, reference, prep_settings(), tasks=TASKS)
    assert feeder.held == 0

    feeder.hold.set()
    out = tmp_path / "slurm"
    printed = make_shards(slurm, inputs, out)
    array = re.search(r"^array job (\d+): 4 of 4 tasks \(0-3\)$", printed, re.M)
    merge = re.search(r"^merge job (\d+), after job (\d+): writes ", printed, re.M)
    assert array and merge and merge.group(2) == array.group(1), printed
    job, log = array.group(1), out / "datatrove" / "slurm" / f"{array.group(1)}_{LAST}.out"

    # task 3 is part-way: complete shards written, waiting for the rest of its last input
    wait_for("task 3 held with a complete shard",
             lambda: feeder.held == 1 and task_shards(out, LAST), 120, log)
    kept = task_shards(out, LAST)
    assert job_state(slurm, element(job, LAST)) == "RUNNING"

    # requeued from outside: the element runs again and keeps what it had written
    slurm.cmd("scontrol", "requeue", element(job, LAST))
    wait_for("task 3 rerun after the requeue", lambda: feeder.held == 2, 120, log)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert set(task_shards(out, LAST)) >= set(kept)

    # killed part-way: the merge can never start; the command run again runs task 3 alone
    slurm.cmd("scancel", "--signal=KILL", element(job, LAST))
    wait_for("task 3 cancelled",
             lambda: job_state(slurm, element(job, LAST)) == "CANCELLED", 60, log)
    wait_for("the merge waiting on a dependency that cannot be satisfied",
             lambda: "DependencyNeverSatisfied" in slurm.cmd(
                 "squeue", "-h", "-j", merge.group(1), "-o", "%r"), 60)
    assert all(job_state(slurm, element(job, r)) == "COMPLETED" for r in range(LAST))
    assert not (out / "manifest.json").exists()
    slurm.cmd("scancel", merge.group(1))
    feeder.released.set()
    printed = make_shards(slurm, inputs, out)
    again = re.search(r"^array job (\d+): 1 of 4 tasks \(3\)$", printed, re.M)
    merge = re.search(r"^merge job (\d+), after job (\d+): writes ", printed, re.M)
    assert again and merge and merge.group(2) == again.group(1), printed
    assert json.loads((out / "datatrove" / "ranks_to_run.json").read_text()) == [LAST]
    wait_for("the merge job completed",
             lambda: job_state(slurm, merge.group(1)) in ("COMPLETED", "FAILED"), 180)
    assert job_state(slurm, merge.group(1)) == "COMPLETED"
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())

    files = sorted(p.relative_to(reference) for p in reference.glob("task-*/*"))
    assert files == sorted(p.relative_to(out) for p in out.glob("task-*/*"))
    for name in [*files, Path("manifest.json")]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
