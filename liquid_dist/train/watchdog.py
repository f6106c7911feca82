"""Hang detection, the node's side: watch one node's ranks, stop them when one hangs.

    python -m liquid_dist.train.watchdog DIR [--run-dir RUN_DIR]

Local rank 0 of every node starts it (:func:`start`) on the node's heartbeat
directory (liquid_dist.train.heartbeat), whatever launched the ranks: torchrun,
the deepspeed launcher, slurm/pretrain.sh, or one ``python`` process. Every
second it reads the ranks' heartbeat files; a rank is **hung** when its last
beat is older than its liveness limit (the rank is frozen: its heartbeat thread
cannot run; in every section) or it is :data:`STUCK_GRACE_S` past its
section's deadline (it runs but makes no progress: a collective that never
completes). The grace lets the node of a frozen rank name it before the other
nodes, whose ranks wait for it in a collective, report them. Then it:

1. logs each hung rank — host, pid, local and global rank, last step, section,
   for how long — on stderr (the job's log), and writes them to
   ``RUN_DIR/HANG``;
2. sends SIGUSR2 to the node's ranks still alive, which dump their Python
   stacks on stderr (``faulthandler``); it waits :data:`STACKS_WAIT_S`;
3. SIGKILLs every rank of the node, so that the launcher fails (torchrun and
   the deepspeed launcher stop the other local ranks and exit non-zero; under
   Slurm the job is requeued as after a crash: docs/training.md, "Exit
   statuses and requeue").

The watchdogs of the other nodes see ``RUN_DIR/HANG`` (the run directory is
shared) and do steps 2 and 3 for their ranks. A record whose process is gone
is the launcher's to handle, not a hang. The watchdog exits when no record
names a live process: 0, or 1 after it stopped the ranks. It ignores the
signals a launcher or a terminal sends to stop a run (SIGINT, SIGTERM,
SIGUSR1): the ranks answer those, and it watches them while they checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from liquid_dist.atomic import write_atomic
from liquid_dist.train.heartbeat import STACKS_SIGNAL

POLL_S = 1.0
STACKS_WAIT_S = 3.0
STUCK_GRACE_S = 5.0
HANG_MARKER = "HANG"


@dataclass(frozen=True)
class Hang:
    rank: dict
    """The rank's last heartbeat record."""
    frozen: bool
    """Silent (its stacks cannot be had), not only without progress."""
    why: str


def silence_limit(record: dict) -> float:
    """How long the rank of ``record`` may go without a beat: its liveness limit, or its
    section's allowance when that is shorter (a training step)."""
    allowance = record["allowance"]
    return record["liveness"] if allowance is None else min(record["liveness"], allowance)


def find_hangs(records: list[dict], now: float) -> list[Hang]:
    """The hung ranks among heartbeat records read at ``now`` (see the module doc)."""
    hangs = []
    for r in records:
        silent = now - r["beat"]
        if silent > silence_limit(r):
            hangs.append(Hang(r, True, f"silent for {silent:.0f} s (no heartbeat; the "
                                       "process is frozen or holds the interpreter)"))
        elif r["deadline"] is not None and now > r["deadline"] + STUCK_GRACE_S:
            hangs.append(Hang(r, False, f"no progress for {now - r['deadline']:.0f} s past "
                                        f"its '{r['section']}' allowance"))
    return hangs


def describe(h: Hang) -> str:
    r = h.rank
    return (f"hang: rank {r['rank']} (host {r['host']}, pid {r['pid']}, local rank "
            f"{r['local_rank']}) {h.why}, after step {r['step']}, in section "
            f"'{r['section']}'")


def read_records(directory: Path) -> list[dict]:
    """The heartbeat records of the ranks alive in ``directory`` (a record whose process is
    gone is left out: that rank ended, or died and its launcher handles it)."""
    records = []
    for path in sorted(directory.glob("rank*.json")):
        try:
            record = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            continue  # being replaced, or gone with its rank
        if _alive(record["pid"]):
            records.append(record)
    return records


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} watchdog: {message}", file=sys.stderr,
          flush=True)


def dump_stacks(records: list[dict], frozen: set[int]) -> None:
    """Have the ranks that are alive and not frozen write their Python stacks to stderr."""
    live = [r for r in records if r["pid"] not in frozen and _alive(r["pid"])]
    if live:
        _say("Python stacks of the live ranks " + ", ".join(str(r["rank"]) for r in live)
             + " follow on their stderr")
    for r in live:
        with contextlib.suppress(ProcessLookupError):  # gone meanwhile
            os.kill(r["pid"], STACKS_SIGNAL)


def stop_ranks(records: list[dict], frozen: set[int]) -> None:
    """Have the live ranks dump their stacks, then SIGKILL every rank of the node."""
    dump_stacks(records, frozen)
    time.sleep(STACKS_WAIT_S)
    for r in records:
        with contextlib.suppress(ProcessLookupError):
            os.kill(r["pid"], signal.SIGKILL)
    _say("stopped the node's ranks; the job ends as after a crash (requeued under Slurm)")


def _reported_since(run_dir: Optional[Path], started: float) -> Optional[str]:
    """The hangs another node's watchdog reported in ``RUN_DIR/HANG`` since ``started``."""
    if run_dir is None:
        return None
    marker = run_dir / HANG_MARKER
    try:
        if marker.stat().st_mtime < started:
            return None
        return marker.read_text().strip()
    except FileNotFoundError:
        return None


def watch(directory: Path, run_dir: Optional[Path] = None) -> int:
    """Watch the ranks of ``directory`` until none is alive (see the module doc)."""
    started = time.time()
    while records := read_records(directory):
        hangs = find_hangs(records, time.time())
        if hangs:
            lines = [describe(h) for h in hangs]
            for line in lines:
                _say(line)
            if run_dir is not None:
                write_atomic(run_dir / HANG_MARKER, "\n".join(lines) + "\n")
            stop_ranks(records, {h.rank["pid"] for h in hangs if h.frozen})
            return 1
        elsewhere = _reported_since(run_dir, started)
        if elsewhere:
            _say(f"another node reported a hang in {run_dir / HANG_MARKER}: {elsewhere}")
            stop_ranks(records, set())
            return 1
        time.sleep(POLL_S)
    with contextlib.suppress(OSError):  # not empty: the ranks of a later run beat there
        directory.rmdir()
    return 0


def start(directory: Path, run_dir: Optional[Path]) -> subprocess.Popen:
    """Start the watchdog of ``directory`` (local rank 0 does, once its own heartbeat
    record is written); its messages go to this process's stderr."""
    command = [sys.executable, "-m", "liquid_dist.train.watchdog", str(directory)]
    if run_dir is not None:
        command += ["--run-dir", str(run_dir)]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--run-dir", type=Path, default=None,
                   help="train.run_dir, shared by the nodes: where a hang is reported")
    args = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    return watch(args.directory, args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
