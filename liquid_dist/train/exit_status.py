"""The pretraining run's exit statuses, and the exit record rank 0 leaves in the run directory.

A rank's status does not reach a Slurm job's script through ``torchrun`` (any
failure becomes 1), so rank 0 also writes its status, step and reason to
``RUN_DIR/EXIT`` (:func:`write_exit_record`) whenever the entry point returns one;
liquid_dist.train.requeue reads it. No record after an attempt means the attempt
crashed. The statuses are documented in docs/training.md ("Exit statuses and requeue").
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from liquid_dist.atomic import write_atomic

EXIT_OK = 0
"""Trained to ``train.max_steps``; the final checkpoint is written."""
EXIT_FAILED = 1
"""Anything else (a traceback on stderr); a launcher's status for any failed rank."""
EXIT_CONFIG = 2
"""Bad configuration or missing input (found before any process group), or a checkpoint
to start from that does not verify or fit: fix, resubmit."""
EXIT_DIVERGED = 3
"""The loss diverged: non-finite on more than ``train.max_nan_skips`` steps in a row, or
a loss spike again right after a rewind (``train.spike``)."""
EXIT_CRASH_LOOP = 4
"""(Slurm job) crashed more than ``train.max_restarts_without_progress`` times in a row
without passing the checkpoint it restarted from: stopped, not requeued."""
EXIT_PREEMPTED = 75
"""Stopped by a signal after a checkpoint (EX_TEMPFAIL: "try again", requeue me)."""

EXIT_RECORD = "EXIT"
"""``RUN_DIR/EXIT``: one JSON object, rank 0's status, step and reason of the attempt."""


@dataclass(frozen=True)
class ExitRecord:
    status: int
    step: Optional[int]
    reason: str


def write_exit_record(run_dir: Path, record: ExitRecord) -> None:
    """Rank 0's account of how the attempt ended (atomic: a reader sees all or nothing)."""
    write_atomic(run_dir / EXIT_RECORD, json.dumps(
        {"status": record.status, "step": record.step, "reason": record.reason,
         "time": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")


def read_exit_record(run_dir: Path) -> Optional[ExitRecord]:
    """The attempt's exit record; None when it wrote none. ValueError names a damaged one."""
    path = run_dir / EXIT_RECORD
    try:
        data = json.loads(path.read_text())
        return ExitRecord(int(data["status"]), data["step"], str(data["reason"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an exit record ({exc!r})") from exc


def clear_exit_record(run_dir: Path) -> None:
    (run_dir / EXIT_RECORD).unlink(missing_ok=True)
