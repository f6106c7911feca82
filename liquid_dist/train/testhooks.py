"""Fault-injection hooks for the tests, read from environment variables.

They are inert unless the variable is set; nothing in a normal run sets them.

* ``LIQUID_TEST_NAN_STEPS=3,4`` — on rank 0 the loss of those (1-based)
  optimizer steps is replaced by NaN (after the forward, before backward), to
  exercise non-finite detection, skipping and the ``train.max_nan_skips`` stop.
* ``LIQUID_TEST_STOP_AT_STEP=n`` — rank 0 raises the stop flag after step n,
  exactly as if it had received SIGTERM there (a deterministic preemption).
* ``LIQUID_TEST_CKPT_PAUSE=step:rank`` — while writing the checkpoint of that
  step, that rank stops after its DeepSpeed files are written and before it
  marks its part complete, writes its pid to ``RUN_DIR/ckpt_pause.pid`` and
  sleeps (up to 10 minutes), so a test can ``kill -9`` it mid-write.
* ``LIQUID_TEST_HOLD_AT_STEP=n`` — after step n (and its checkpoint, if one is
  due) every rank writes its pid to ``RUN_DIR/held.rank<r>`` and waits (up to
  10 minutes) until a stop signal raises its flag; the run then preempts after
  step n+1. Once per run directory: a rank whose ``held.rank<r>`` exists (a
  requeued or resubmitted attempt) does not hold again.
  A test signals a job from outside at a known step this way (tests/test_slurm_real.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from liquid_dist.train.signals import StopFlag


def nan_steps() -> frozenset[int]:
    raw = os.environ.get("LIQUID_TEST_NAN_STEPS", "")
    return frozenset(int(s) for s in raw.split(",") if s.strip())


def stop_at_step() -> Optional[int]:
    raw = os.environ.get("LIQUID_TEST_STOP_AT_STEP", "")
    return int(raw) if raw.strip() else None


def maybe_pause_checkpoint(step: int, rank: int, run_dir: Path) -> None:
    raw = os.environ.get("LIQUID_TEST_CKPT_PAUSE", "")
    if not raw.strip():
        return
    want_step, want_rank = (int(x) for x in raw.split(":"))
    if (want_step, want_rank) != (step, rank):
        return
    tmp = run_dir / "ckpt_pause.pid.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, run_dir / "ckpt_pause.pid")
    time.sleep(600)


def maybe_hold(step: int, stop: StopFlag, run_dir: Path, rank: int) -> None:
    raw = os.environ.get("LIQUID_TEST_HOLD_AT_STEP", "")
    marker = run_dir / f"held.rank{rank}"
    if not raw.strip() or int(raw) != step or marker.exists():
        return
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 600
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.05)
