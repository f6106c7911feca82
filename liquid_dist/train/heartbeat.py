"""Hang detection, the rank's side: a heartbeat file that says where the rank is.

With ``LIQUID_HEARTBEAT_DIR`` set (slurm/node_launch.sh sets it, one directory per
node, and runs liquid_dist.train.watchdog beside the ranks), each rank starts a
daemon thread that rewrites ``DIR/rank<global rank>.json`` every
:data:`BEAT_S` seconds: host, pid, local rank, the last step finished, the
section the rank is in (``start``, ``first_step``, ``train``, ``eval``, ``save``,
``rewind``), the section's allowance and by when it must make progress. The
thread only reads what the main thread last set, so:

* a rank that is frozen (SIGSTOP, a call that holds the interpreter) stops
  beating: the watchdog names it once its file is older than the hang timeout;
* a rank that runs but makes no progress (a collective that never completes,
  on every rank of a dead link) keeps beating past its section's deadline.

Each rank also dumps its Python stacks to stderr on SIGUSR2 (``faulthandler``),
which the watchdog sends to the ranks it finds alive before it stops them.
Without the variable nothing is started and every method only records.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Optional

from liquid_dist.atomic import write_atomic

BEAT_S = 1.0
"""Seconds between two writes of a rank's heartbeat file."""
ENV = "LIQUID_HEARTBEAT_DIR"
STACKS_SIGNAL = signal.SIGUSR2


class Heartbeat:
    """One rank's heartbeat (see the module doc); a context manager around the run."""

    def __init__(self, directory: Optional[Path], *, rank: int = 0, local_rank: int = 0):
        self.path = None if directory is None else Path(directory) / f"rank{rank}.json"
        self.rank, self.local_rank = rank, local_rank
        # Slurm's name of the node, else the host name
        self.host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.step = 0
        self.section = "start"
        self.allowance: Optional[float] = None
        self.deadline: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def from_environment(cls, rank: int, local_rank: int,
                         environ: Optional[Mapping[str, str]] = None) -> Heartbeat:
        env = os.environ if environ is None else environ
        directory = env.get(ENV, "").strip()
        return cls(Path(directory) if directory else None, rank=rank, local_rank=local_rank)

    def __enter__(self) -> Heartbeat:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            faulthandler.register(STACKS_SIGNAL, all_threads=True)
            self._write()
            self._thread = threading.Thread(target=self._beat, name="liquid-heartbeat",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            faulthandler.unregister(STACKS_SIGNAL)
            self.path.unlink(missing_ok=True)  # a rank that has ended is not hung

    def enter(self, section: str, allowance_s: Optional[float]) -> None:
        """From now on the rank is in ``section``, which must make progress (another
        :meth:`enter` or :meth:`progress`) within ``allowance_s`` seconds (None: no limit)."""
        self.section, self.allowance = section, allowance_s
        self.deadline = None if allowance_s is None else time.time() + allowance_s

    def progress(self, step: int, allowance_s: Optional[float]) -> None:
        """Training step ``step`` finished; the rank is in section ``train``, and the next
        step must finish within ``allowance_s``."""
        self.step = step
        self.enter("train", allowance_s)

    @contextlib.contextmanager
    def within(self, section: str, allowance_s: Optional[float],
               then_s: Optional[float]) -> Iterator[None]:
        """``section`` for the duration of the block; back in the previous section, with
        ``then_s`` to make progress, after it."""
        previous = self.section
        self.enter(section, allowance_s)
        try:
            yield
        finally:
            self.enter(previous, then_s)

    def _write(self) -> None:
        record = {"rank": self.rank, "local_rank": self.local_rank,
                  "host": self.host, "pid": os.getpid(), "step": self.step,
                  "section": self.section, "allowance": self.allowance,
                  "deadline": self.deadline, "beat": time.time()}
        write_atomic(self.path, json.dumps(record))

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            self._write()
