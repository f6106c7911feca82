"""Hang detection, the launcher's side: watch one node's ranks, stop them when one hangs.

    python -m liquid_dist.train.watchdog DIR --launcher-pid PID [--run-dir RUN_DIR]

slurm/node_launch.sh runs it beside torchrun, with ``DIR`` the node's heartbeat
directory (liquid_dist.train.heartbeat). Every second it reads the ranks'
heartbeat files; a rank is **hung** when its last beat is older than its
section's allowance (the rank is frozen: its heartbeat thread cannot run) or
it is :data:`STUCK_GRACE_S` past its section's deadline (it runs but makes no
progress: a collective that never completes). The allowances are the rank's
(``train.hang_timeout_s``), written in its file; the grace lets the node of a
frozen rank name it before the other nodes, whose ranks wait for it in a
collective, report them. Then it:

1. logs each hung rank — host, pid, local and global rank, last step, section,
   for how long — on stderr (the job's log), and writes them to
   ``RUN_DIR/HANG``;
2. sends SIGUSR2 to the node's ranks still alive, which dump their Python
   stacks on stderr (``faulthandler``); the other nodes' watchdogs see
   ``RUN_DIR/HANG`` and do the same for theirs; it waits :data:`STACKS_WAIT_S`;
3. SIGKILLs every rank of the node, so that torchrun fails, srun ends the
   other nodes' tasks and the job is requeued as after a crash (docs/training.md,
   "Exit statuses and requeue").

It exits when ``--launcher-pid`` is gone: 0, or 1 after it stopped the ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
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


def find_hangs(records: list[dict], now: float) -> list[Hang]:
    """The hung ranks among heartbeat records read at ``now`` (see the module doc)."""
    hangs = []
    for r in records:
        silent = now - r["beat"]
        if r["allowance"] is not None and silent > r["allowance"]:
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
    records = []
    for path in sorted(directory.glob("rank*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            continue  # being replaced, or gone with its rank
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


def stop_ranks(records: list[dict], hangs: list[Hang], run_dir: Optional[Path]) -> None:
    """Log the hangs (and tell the other nodes), have the live ranks dump their stacks,
    SIGKILL every rank of the node."""
    lines = [describe(h) for h in hangs]
    for line in lines:
        _say(line)
    if run_dir is not None:
        write_atomic(run_dir / HANG_MARKER, "\n".join(lines) + "\n")
    dump_stacks(records, {h.rank["pid"] for h in hangs if h.frozen})
    time.sleep(STACKS_WAIT_S)
    for r in records:
        with contextlib.suppress(ProcessLookupError):
            os.kill(r["pid"], signal.SIGKILL)
    _say("stopped the node's ranks; the job ends as after a crash (requeued)")


def _reported_since(run_dir: Optional[Path], started: float) -> bool:
    try:
        return run_dir is not None and (run_dir / HANG_MARKER).stat().st_mtime >= started
    except FileNotFoundError:
        return False


def watch(directory: Path, launcher_pid: int, run_dir: Optional[Path] = None) -> int:
    started, dumped = time.time(), False
    while _alive(launcher_pid):
        records = read_records(directory)
        hangs = find_hangs(records, time.time())
        if hangs:
            stop_ranks(records, hangs, run_dir)
            return 1
        if not dumped and _reported_since(run_dir, started):  # a hang on another node
            _say(f"a hang reported in {run_dir / HANG_MARKER}")
            dump_stacks(records, set())
            dumped = True
        time.sleep(POLL_S)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--launcher-pid", type=int, required=True)
    p.add_argument("--run-dir", type=Path, default=None,
                   help="train.run_dir, shared by the nodes: where a hang is reported")
    args = p.parse_args(argv)
    return watch(args.directory, args.launcher_pid, args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
