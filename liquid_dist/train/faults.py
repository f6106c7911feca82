"""Fault injection: the one seam through which a test makes a run fail on purpose.

A :class:`Faults` is built once, at entry (:meth:`Faults.from_environment`), and
handed to the trainer and the checkpoint manager; its methods are the points
where a fault may enter a run, and with its defaults (a normal run) each does
nothing. Nothing in the step loop or the checkpoint protocol reads the
environment. The variables, read once at start-up (inert when unset):

* ``LIQUID_TEST_NAN_STEPS=3,4`` — on rank 0 the loss of those (1-based)
  optimizer steps is replaced by NaN (after the forward, before backward), to
  exercise non-finite detection, skipping and the ``train.max_nan_skips`` stop.
* ``LIQUID_TEST_SPIKE_STEPS=5,6`` — on rank 0 the loss of those steps is
  multiplied by :data:`SPIKE_FACTOR` (gradients with it): outlier batches, to
  exercise the loss-spike policy (``train.spike``).
* ``LIQUID_TEST_STOP_AT_STEP=n`` — rank 0 raises the stop flag after step n,
  exactly as if it had received SIGTERM there (a deterministic preemption).
* ``LIQUID_TEST_CKPT_PAUSE=step:rank`` — while writing the checkpoint of that
  step, that rank stops after its DeepSpeed files are written and before it
  marks its part complete, writes its pid to ``RUN_DIR/ckpt_pause.pid`` and
  sleeps (up to 10 minutes), so a test can ``kill -9`` it mid-write.
* ``LIQUID_TEST_CKPT_FAIL=step:rank`` — at the same point that rank raises
  an OSError, as a full disk or an unwritable run directory would on one node.
* ``LIQUID_TEST_PARK_AT_STEP=step:rank`` — after that step (and its checkpoint,
  if one is due) that rank writes its pid to ``RUN_DIR/parked.rank<r>`` and
  sleeps (up to 10 minutes) in its section ``train``, so that a test can stop
  it (SIGSTOP) at a known place; once per run directory, as the hold below.
* ``LIQUID_TEST_HOLD_AT_STEP=n`` — after step n (and its checkpoint, if one is
  due) every rank writes its pid to ``RUN_DIR/held.rank<r>`` and waits (up to
  10 minutes, in the heartbeat section ``held``, without a progress deadline)
  until a stop signal raises its flag; the run then preempts after step n+1.
  Once per run directory: a rank whose ``held.rank<r>`` exists (a requeued or
  resubmitted attempt) does not hold again. A test signals a job
  from outside at a known step this way (tests/test_slurm_real.py).
* ``LIQUID_TEST_CRASH_AT_STEP=step:rank`` — after that step (and its checkpoint,
  if one is due) that rank raises :class:`InjectedCrash`, on every attempt: a
  run that crashes until someone fixes it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from liquid_dist.atomic import write_atomic
from liquid_dist.train.heartbeat import Heartbeat
from liquid_dist.train.signals import StopFlag

SPIKE_FACTOR = 1000.0
PAUSE_S = 600.0
"""The longest a paused or held rank waits."""


class InjectedCrash(RuntimeError):
    """The crash ``LIQUID_TEST_CRASH_AT_STEP`` asks for."""


@dataclass(frozen=True)
class Faults:
    """The faults of one run; the defaults inject none."""

    nan_steps: frozenset[int] = frozenset()
    spike_steps: frozenset[int] = frozenset()
    stop_at_step: Optional[int] = None
    checkpoint_pause: Optional[tuple[int, int]] = None
    """(step, rank)"""
    checkpoint_fail: Optional[tuple[int, int]] = None
    """(step, rank)"""
    park_at: Optional[tuple[int, int]] = None
    """(step, rank)"""
    hold_at_step: Optional[int] = None
    crash_at: Optional[tuple[int, int]] = None
    """(step, rank)"""

    @classmethod
    def from_environment(cls, environ: Optional[Mapping[str, str]] = None) -> Faults:
        """The faults the ``LIQUID_TEST_*`` variables ask for (see the module doc)."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(f"LIQUID_TEST_{name}", "").strip()

        def step_rank(name: str) -> Optional[tuple[int, int]]:
            value = get(name)
            return tuple(int(x) for x in value.split(":")) if value else None

        return cls(
            nan_steps=frozenset(int(s) for s in get("NAN_STEPS").split(",") if s.strip()),
            spike_steps=frozenset(int(s) for s in get("SPIKE_STEPS").split(",") if s.strip()),
            stop_at_step=int(get("STOP_AT_STEP")) if get("STOP_AT_STEP") else None,
            checkpoint_pause=step_rank("CKPT_PAUSE"),
            checkpoint_fail=step_rank("CKPT_FAIL"),
            park_at=step_rank("PARK_AT_STEP"),
            hold_at_step=int(get("HOLD_AT_STEP")) if get("HOLD_AT_STEP") else None,
            crash_at=step_rank("CRASH_AT_STEP"))

    def loss_factor(self, step: int, rank: int) -> Optional[float]:
        """What ``rank`` multiplies its loss of (1-based) ``step`` by (NaN, or
        :data:`SPIKE_FACTOR`); None: leave it alone."""
        if rank != 0:
            return None
        if step in self.nan_steps:
            return float("nan")
        return SPIKE_FACTOR if step in self.spike_steps else None

    def stop_after(self, step: int, rank: int) -> bool:
        """Whether ``rank`` raises the stop flag after ``step``, as a signal would."""
        return rank == 0 and self.stop_at_step is not None and step >= self.stop_at_step

    def in_checkpoint_write(self, step: int, rank: int, run_dir: Path) -> None:
        """Called by every rank between its DeepSpeed files and its completion marker."""
        if self.checkpoint_fail == (step, rank):
            raise OSError(f"LIQUID_TEST_CKPT_FAIL: rank {rank} cannot write the checkpoint "
                          f"of step {step}")
        if self.checkpoint_pause == (step, rank):
            write_atomic(run_dir / "ckpt_pause.pid", str(os.getpid()))
            time.sleep(PAUSE_S)

    def after_step(self, step: int, rank: int, run_dir: Path, stop: StopFlag,
                   heartbeat: Heartbeat) -> None:
        """Called by every rank after a step and its checkpoint."""
        if self.crash_at == (step, rank):
            raise InjectedCrash(f"LIQUID_TEST_CRASH_AT_STEP: rank {rank} after step {step}")
        parked = run_dir / f"parked.rank{rank}"
        if self.park_at == (step, rank) and not parked.exists():
            write_atomic(parked, str(os.getpid()))
            time.sleep(PAUSE_S)
        marker = run_dir / f"held.rank{rank}"
        if self.hold_at_step != step or marker.exists():
            return
        marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + PAUSE_S
        with heartbeat.within("held", bounded=False):
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.05)


NO_FAULTS = Faults()
"""A normal run."""
