"""Hang detection, the rank's side: a heartbeat file that says where the rank is.

Every rank of a run with ``train.hang_detection`` (the default) runs a daemon
thread that rewrites ``DIR/rank<global rank>.json`` every :data:`BEAT_S`
seconds: host, pid, local rank, the last step finished, the section the rank is
in (``start``, ``first_step``, ``train``, ``eval``, ``save``, ``rewind``), its
liveness limit, the section's allowance and by when it must make progress.
``DIR`` is node-local and the same for the ranks of one launcher
(:func:`heartbeat_dir`); local rank 0 starts the node's watchdog on it
(liquid_dist.train.watchdog), whatever launched the ranks. The thread only
reads what the main thread last set, so:

* a rank that is frozen (SIGSTOP, a call that holds the interpreter) stops
  beating: the watchdog names it once its file is older than the liveness
  limit (``train.hang_liveness_s``, in every section; within a training step
  the step allowance when that is shorter);
* a rank that runs but makes no progress (a collective that never completes,
  on every rank of a dead link) keeps beating past its section's deadline.

The heartbeat owns the allowances: ``train.hang_timeout_long_s`` for the long
sections, and for a training step ``train.hang_timeout_s``, or when that is
None ten times the slowest of the attempt's steps 2 to 1 + :data:`TIMED_STEPS`
(the first warms up), at least :data:`MIN_STEP_ALLOWANCE_S` (the long
allowance until they are timed).

Each rank also dumps its Python stacks to stderr on SIGUSR2 (``faulthandler``),
which the watchdog sends to the ranks it finds alive before it stops them.
Without a directory nothing is started and every method only records.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

from liquid_dist.atomic import write_atomic

BEAT_S = 1.0
"""Seconds between two writes of a rank's heartbeat file."""
ENV = "LIQUID_HEARTBEAT_DIR"
"""Overrides the node-local directory of :func:`heartbeat_dir`."""
STACKS_SIGNAL = signal.SIGUSR2
TIMED_STEPS = 5
"""Training steps timed (after an attempt's first) for the automatic step allowance."""
MIN_STEP_ALLOWANCE_S = 60.0


def heartbeat_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """The node-local heartbeat directory of this process's launcher: ``$LIQUID_HEARTBEAT_DIR``,
    else ``<tmp>/liquid-heartbeat-<host>-<parent pid>`` — torchrun, the deepspeed launcher
    and srun start a node's ranks from one process, so its ranks share it."""
    env = os.environ if environ is None else environ
    explicit = env.get(ENV, "").strip()
    if explicit:
        return Path(explicit)
    return Path(tempfile.gettempdir()) / f"liquid-heartbeat-{socket.gethostname()}-{os.getppid()}"


class Heartbeat:
    """One rank's heartbeat (see the module doc); a context manager around the run.

    ``step_timeout_s``: ``train.hang_timeout_s`` (None: learned from the first steps);
    ``long_timeout_s``: ``train.hang_timeout_long_s``; ``liveness_s``:
    ``train.hang_liveness_s``.
    """

    def __init__(self, directory: Optional[Path], *, rank: int = 0, local_rank: int = 0,
                 step_timeout_s: Optional[float] = None, long_timeout_s: float = 1800.0,
                 liveness_s: float = 30.0):
        self.path = None if directory is None else Path(directory) / f"rank{rank}.json"
        self.rank, self.local_rank = rank, local_rank
        # Slurm's name of the node, else the host name
        self.host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.step_timeout_s, self.long_timeout_s = step_timeout_s, long_timeout_s
        self.liveness_s = liveness_s
        self._step_times: list[float] = []
        """This attempt's first 1 + TIMED_STEPS step times."""
        self.step = 0
        self.section = "start"
        self.allowance: Optional[float] = long_timeout_s
        self.deadline: Optional[float] = time.time() + long_timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def for_run(cls, train: Any, rank: int, local_rank: int,
                environ: Optional[Mapping[str, str]] = None) -> Heartbeat:
        """The heartbeat of a rank of a run with the ``train`` config section: in
        :func:`heartbeat_dir` with ``train.hang_detection``, else only recording."""
        return cls(heartbeat_dir(environ) if train.hang_detection else None, rank=rank,
                   local_rank=local_rank, step_timeout_s=train.hang_timeout_s,
                   long_timeout_s=train.hang_timeout_long_s, liveness_s=train.hang_liveness_s)

    @property
    def directory(self) -> Optional[Path]:
        return None if self.path is None else self.path.parent

    def __enter__(self) -> Heartbeat:
        if self.path is not None:
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
            self._thread = None
            faulthandler.unregister(STACKS_SIGNAL)
            self.path.unlink(missing_ok=True)  # a rank that has ended is not hung

    def step_allowance(self) -> float:
        """Seconds a training step may take (see the module doc)."""
        if self.step_timeout_s is not None:
            return self.step_timeout_s
        timed = self._step_times[1:]
        if len(timed) < TIMED_STEPS:
            return self.long_timeout_s
        return max(MIN_STEP_ALLOWANCE_S, 10 * max(timed))

    def enter(self, section: str) -> None:
        """From now on the rank is in the long section ``section`` (start-up, first step,
        evaluation, save, rewind), which must make progress within the long allowance."""
        self._set(section, self.long_timeout_s)

    def step_done(self, step: int, took_s: float) -> None:
        """Training step ``step`` finished in ``took_s`` seconds; the rank is in section
        ``train``, and the next step must finish within the step allowance."""
        if len(self._step_times) <= TIMED_STEPS:
            self._step_times.append(took_s)
        self.step = step
        self._set("train", self.step_allowance())

    @contextlib.contextmanager
    def within(self, section: str, *, bounded: bool = True) -> Iterator[None]:
        """The long section ``section`` for the duration of the block (``bounded=False``:
        without a progress deadline, only the liveness limit); back in the previous
        section, with the step allowance to make progress, after it."""
        previous = self.section
        self._set(section, self.long_timeout_s if bounded else None)
        try:
            yield
        finally:
            self._set(previous, self.step_allowance())

    def _set(self, section: str, allowance_s: Optional[float]) -> None:
        self.section, self.allowance = section, allowance_s
        self.deadline = None if allowance_s is None else time.time() + allowance_s
        if self._thread is not None:  # at once: the file says where the rank is now
            self._write()

    def _write(self) -> None:
        record = {"rank": self.rank, "local_rank": self.local_rank,
                  "host": self.host, "pid": os.getpid(), "step": self.step,
                  "section": self.section, "liveness": self.liveness_s,
                  "allowance": self.allowance, "deadline": self.deadline, "beat": time.time()}
        with self._lock:  # the main thread and the beat write the same file
            # again each time: the watchdog of an earlier run of this launcher removes
            # the directory when it finds it empty
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(record))

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            with contextlib.suppress(OSError):  # the next beat tries again
                self._write()
