"""Hang detection (liquid_dist.train.heartbeat, liquid_dist.train.watchdog): a rank's
heartbeat file, the watchdog's verdict on records, and the watchdog stopping real
processes — one frozen with SIGSTOP, one alive whose stacks it asks for.
tests/test_slurm_real.py stops a hung training job on a real Slurm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from liquid_dist.train import watchdog
from liquid_dist.train.heartbeat import Heartbeat


def _record(**kw) -> dict:
    r = {"rank": 1, "local_rank": 0, "host": "n2", "pid": 42, "step": 7, "section": "train",
         "allowance": 10.0, "deadline": 1010.0, "beat": 1000.0}
    r.update(kw)
    return r


def test_a_frozen_rank_and_a_rank_without_progress_are_hung_each_with_its_reason() -> None:
    live = _record(rank=0, beat=1019.0, deadline=1025.0)
    assert watchdog.find_hangs([live], now=1020.0) == []
    frozen = _record()
    stuck = _record(rank=2, beat=1019.5, deadline=1010.0, section="save")
    # past its deadline, within the grace that lets a frozen rank's node speak first
    late = _record(rank=4, beat=1019.5, deadline=1016.0)
    held = _record(rank=3, beat=900.0, allowance=None, deadline=None, section="test_fault")
    hangs = watchdog.find_hangs([live, frozen, stuck, held, late], now=1020.0)
    assert [h.rank["rank"] for h in hangs] == [1, 2]
    assert watchdog.describe(hangs[0]) == (
        "hang: rank 1 (host n2, pid 42, local rank 0) silent for 20 s (no heartbeat; the "
        "process is frozen or holds the interpreter), after step 7, in section 'train'")
    assert "no progress for 10 s past its 'save' allowance" in watchdog.describe(hangs[1])


def test_the_heartbeat_file_says_where_the_rank_is(tmp_path: Path) -> None:
    hb = Heartbeat(tmp_path, rank=3, local_rank=1)
    hb.enter("start", 100.0)
    with hb:
        first = json.loads((tmp_path / "rank3.json").read_text())
        assert (first["rank"], first["local_rank"], first["pid"], first["section"]) == (
            3, 1, os.getpid(), "start")
        hb.progress(5, 2.0)
        with hb.within("save", 50.0, 3.0):
            time.sleep(1.3)  # a beat
            during = json.loads((tmp_path / "rank3.json").read_text())
        assert (during["step"], during["section"], during["allowance"]) == (5, "save", 50.0)
        assert (hb.section, hb.allowance) == ("train", 3.0)
    assert not (tmp_path / "rank3.json").exists()  # a rank that has ended is not hung


RANK = """import sys, time
from pathlib import Path
from liquid_dist.train.heartbeat import Heartbeat
hb = Heartbeat(Path(sys.argv[1]), rank=int(sys.argv[2]), local_rank=int(sys.argv[2]))
with hb:
    for step in range(1, 10000):
        time.sleep(0.1)
        hb.progress(step, 3.0)
"""


def test_the_watchdog_names_the_frozen_rank_dumps_the_live_ones_stacks_and_stops_all(
        tmp_path: Path) -> None:
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path), str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("rank*.json"))) < 2:
            assert time.monotonic() < deadline, "the ranks never beat"
            time.sleep(0.1)
        time.sleep(1.5)
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        proc = subprocess.run([sys.executable, "-m", "liquid_dist.train.watchdog", str(tmp_path),
                               "--launcher-pid", str(ranks[0].pid), "--run-dir", str(run_dir)],
                              stderr=subprocess.PIPE, text=True, timeout=60)
        took = time.monotonic() - stopped
        assert proc.returncode == 1, proc.stderr
        assert 3.0 < took < 3.0 + watchdog.POLL_S + watchdog.STACKS_WAIT_S + 3, took
        assert f"hang: rank 1 (host {os.uname().nodename}, pid {ranks[1].pid}, local rank 1) " \
               "silent for" in proc.stderr
        assert "Python stacks of the live ranks 0 follow" in proc.stderr
        # what the other nodes' watchdogs see (they dump their ranks' stacks on it)
        assert (run_dir / watchdog.HANG_MARKER).read_text().startswith("hang: rank 1 ")
        assert [p.wait(timeout=10) for p in ranks] == [-signal.SIGKILL, -signal.SIGKILL]
        out0 = ranks[0].stdout.read()
        assert "Current thread" in out0 or "Thread 0x" in out0, out0  # faulthandler's dump
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
