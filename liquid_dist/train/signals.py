"""Preemption: SIGTERM / SIGUSR1 set a flag that all ranks agree on at a step boundary.

A scheduler announces the end of a job with a signal (Slurm: ``--signal=USR1@120``
before the time limit; SIGTERM on preemption or ``scancel``). The handler only
records it; the trainer sums the flags of all ranks in its per-step
all-reduce, so every rank sees the same decision at the same step, saves the
same checkpoint and exits with status 75 (liquid_dist.train.exit_status). Repeated signals are
harmless (a worker may get the same one from Slurm, from ``torchrun`` and from
slurm/node_launch.sh); a process that must die now gets SIGKILL from its
launcher after the launcher's grace period.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Records the first stop signal; :meth:`install` / :meth:`restore` the handlers."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: Optional[str] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def describe(self) -> str:
        """Why the run stops: this rank's signal, or another rank's (the flags are summed)."""
        return self.received or "stop requested on another rank"

    def request(self, reason: str) -> None:
        """Raise the flag without a signal (the test hook and programmatic stops)."""
        if self.received is None:
            self.received = reason

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.request(signal.Signals(signum).name)

    def install(self) -> StopFlag:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
