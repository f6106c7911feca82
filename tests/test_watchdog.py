"""Hang detection (liquid_dist.train.heartbeat, liquid_dist.train.watchdog): a rank's
heartbeat file, the watchdog's verdict on records, and the watchdog stopping real
processes — one frozen with SIGSTOP, one alive whose stacks it asks for.
tests/test_slurm_real.py stops a hung training job on a real Slurm."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from liquid_dist.train import watchdog
from liquid_dist.train.heartbeat import Heartbeat


def _record(**kw) -> dict:
    r = {"rank": 1, "local_rank": 0, "host": "n2", "pid": 42, "step": 7, "section": "train",
         "liveness": 30.0, "allowance": 10.0, "deadline": 1010.0, "beat": 1000.0}
    r.update(kw)
    return r


def test_a_frozen_rank_and_a_rank_without_progress_are_hung_each_with_its_reason() -> None:
    live = _record(rank=0, beat=1019.0, deadline=1025.0)
    assert watchdog.find_hangs([live], now=1020.0) == []
    frozen = _record()
    stuck = _record(rank=2, beat=1019.5, deadline=1010.0, section="save")
    # past its deadline, within the grace that lets a frozen rank's node speak first
    late = _record(rank=4, beat=1019.5, deadline=1016.0)
    held = _record(rank=3, beat=1019.0, allowance=None, deadline=None, section="held")
    # a long section lengthens the progress deadline, not the liveness limit
    saving = _record(rank=5, beat=1000.0, liveness=15.0, allowance=1800.0, deadline=2800.0,
                     section="save")
    within = _record(rank=6, beat=1006.0, liveness=15.0, allowance=1800.0, deadline=2800.0,
                     section="save")
    hangs = watchdog.find_hangs([live, frozen, stuck, held, late, saving, within], now=1020.0)
    assert [(h.rank["rank"], h.frozen) for h in hangs] == [(1, True), (2, False), (5, True)]
    assert watchdog.describe(hangs[0]) == (
        "hang: rank 1 (host n2, pid 42, local rank 0) silent for 20 s (no heartbeat; the "
        "process is frozen or holds the interpreter), after step 7, in section 'train'")
    assert "no progress for 10 s past its 'save' allowance" in watchdog.describe(hangs[1])
    assert "silent for 20 s" in watchdog.describe(hangs[2])


def test_the_heartbeat_file_says_where_the_rank_is_and_owns_the_step_allowance(
        tmp_path: Path) -> None:
    hb = Heartbeat(tmp_path, rank=3, local_rank=1, step_timeout_s=None, long_timeout_s=100.0,
                   liveness_s=9.0)
    with hb:
        first = json.loads((tmp_path / "rank3.json").read_text())
        assert (first["rank"], first["local_rank"], first["pid"], first["section"],
                first["allowance"], first["liveness"]) == (3, 1, os.getpid(), "start", 100.0,
                                                           9.0)
        hb.step_done(1, 30.0)  # the first step warms up: not timed
        for step, took in zip(range(2, 7), (2.0, 7.0, 3.0, 1.0, 2.0), strict=True):
            # the long allowance until five steps after the first are timed
            assert hb.step_allowance() == 100.0
            hb.step_done(step, took)
        assert hb.step_allowance() == 70.0  # ten times the slowest
        with hb.within("save"):
            during = json.loads((tmp_path / "rank3.json").read_text())  # written at once
            assert (during["step"], during["section"], during["allowance"]) == (6, "save",
                                                                                100.0)
        assert (hb.section, hb.allowance) == ("train", 70.0)
        with hb.within("held", bounded=False):
            assert (hb.allowance, hb.deadline) == (None, None)
    assert not (tmp_path / "rank3.json").exists()  # a rank that has ended is not hung
    fixed = Heartbeat(None, step_timeout_s=5.0)
    fixed.step_done(1, 30.0)
    assert fixed.step_allowance() == 5.0


RANK = """import sys, time
from pathlib import Path
from liquid_dist.train.heartbeat import Heartbeat
hb = Heartbeat(Path(sys.argv[1]), rank=int(sys.argv[2]), local_rank=int(sys.argv[2]),
               step_timeout_s=3.0, liveness_s=30.0)
with hb:
    for step in range(1, int(sys.argv[3])):
        time.sleep(0.1)
        hb.step_done(step, 0.1)
"""


@contextlib.contextmanager
def _ranks(directory: Path, steps: int = 10000) -> Iterator[list[subprocess.Popen]]:
    """Two heartbeat-writing processes, past their first step; killed at the end if left."""
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(directory), str(r), str(steps)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    def training() -> bool:  # both ranks past their first step (section 'train')
        try:
            return all(json.loads((directory / f"rank{r}.json").read_text())["step"] >= 1
                       for r in (0, 1))
        except (FileNotFoundError, ValueError):
            return False

    try:
        deadline = time.monotonic() + 60
        while not training():
            assert time.monotonic() < deadline, "the ranks never trained"
            time.sleep(0.05)
        yield ranks
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()


def _watch(directory: Path, run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liquid_dist.train.watchdog", str(directory),
                           "--run-dir", str(run_dir)], stderr=subprocess.PIPE, text=True,
                          timeout=60)


def test_the_watchdog_names_the_frozen_rank_dumps_the_live_ones_stacks_and_stops_all(
        tmp_path: Path) -> None:
    beats, run_dir = tmp_path / "beats", tmp_path / "run"
    run_dir.mkdir()
    with _ranks(beats) as ranks:
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        proc = _watch(beats, run_dir)
        took = time.monotonic() - stopped
        assert proc.returncode == 1, proc.stderr
        named = re.search(rf"hang: rank 1 \(host {os.uname().nodename}, pid {ranks[1].pid}, "
                          r"local rank 1\) silent for (\d+) s", proc.stderr)
        assert named, proc.stderr
        # not before the step allowance (3 s) had passed in silence
        assert int(named.group(1)) >= 3, proc.stderr
        assert 3.0 + watchdog.STACKS_WAIT_S <= took < 3.0 + watchdog.POLL_S \
            + watchdog.STACKS_WAIT_S + 3, took
        assert "Python stacks of the live ranks 0 follow" in proc.stderr
        # what the other nodes' watchdogs see (they stop their ranks on it)
        assert (run_dir / watchdog.HANG_MARKER).read_text().startswith("hang: rank 1 ")
        assert [p.wait(timeout=10) for p in ranks] == [-signal.SIGKILL, -signal.SIGKILL]
        out0 = ranks[0].stdout.read()
        assert "Current thread" in out0 or "Thread 0x" in out0, out0  # faulthandler's dump


def test_a_hang_reported_by_another_node_stops_this_nodes_ranks(tmp_path: Path) -> None:
    beats, run_dir = tmp_path / "beats", tmp_path / "run"
    run_dir.mkdir()
    with _ranks(beats) as ranks:
        watcher = subprocess.Popen([sys.executable, "-m", "liquid_dist.train.watchdog",
                                    str(beats), "--run-dir", str(run_dir)],
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(watchdog.POLL_S * 2)
        assert watcher.poll() is None  # nothing to report yet
        (run_dir / watchdog.HANG_MARKER).write_text("hang: rank 9 (host n9, ...)\n")
        _, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 1, err
        assert "another node reported a hang" in err and "rank 9" in err, err
        assert [p.wait(timeout=10) for p in ranks] == [-signal.SIGKILL, -signal.SIGKILL]


def test_the_watchdog_ends_with_the_ranks_and_removes_their_directory(tmp_path: Path) -> None:
    beats, run_dir = tmp_path / "beats", tmp_path / "run"
    run_dir.mkdir()
    with _ranks(beats, steps=20) as ranks:  # two seconds of steps, then a clean end
        proc = _watch(beats, run_dir)
        assert [p.wait(timeout=10) for p in ranks] == [0, 0]
    assert proc.returncode == 0, proc.stderr
    assert "hang" not in proc.stderr and not beats.exists()
