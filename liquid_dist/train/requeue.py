"""After the ranks of a Slurm job exit: requeue it, or end it with a status that says why.

``slurm/pretrain.sh`` runs this twice around its ``srun`` (docs/training.md,
"Exit statuses and requeue")::

    python -m liquid_dist.train.requeue check [pretrain.py arguments]
    python -m liquid_dist.train.requeue decide STATUS [pretrain.py arguments]

``check`` loads the run config (a bad one: status 2, no ranks started), removes
the previous attempt's exit record and notes where this attempt starts.
``decide`` reads what the attempt left and exits with :data:`EXIT_REQUEUE`
(the script then requeues the job) or with the status the job ends with:

* the exit record (liquid_dist.train.exit_status: rank 0's status, step and
  reason) says 0 — finished: 0, whatever the launcher's status (a rank that
  fails at exit after the final checkpoint does not requeue finished work);
* it says 75 — preempted after a checkpoint: requeue;
* it says anything else (2 bad input, 3 non-finite loss): that status, no
  requeue — retrying cannot help;
* no record — a crash (a rank's exception, a killed rank, a lost node, a hang
  stopped by the launcher): requeue, unless the job has now crashed more than
  ``train.max_restarts_without_progress`` times in a row without a checkpoint
  newer than the one it restarted from; then :data:`EXIT_CRASH_LOOP`.

The count lives in ``RUN_DIR/restarts.json`` (:data:`LEDGER`), per Slurm job:
a new submission starts counting afresh, a requeue of the same job continues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from liquid_dist.atomic import write_atomic
from liquid_dist.checkpoint_format import latest_step
from liquid_dist.config import ConfigError, load_config
from liquid_dist.train.exit_status import (
    EXIT_CONFIG,
    EXIT_CRASH_LOOP,
    EXIT_OK,
    EXIT_PREEMPTED,
    clear_exit_record,
    read_exit_record,
)

EXIT_REQUEUE = EXIT_PREEMPTED
"""``decide``'s answer "requeue the job" (EX_TEMPFAIL, as a preempted rank's status)."""
LEDGER = "restarts.json"


@dataclass(frozen=True)
class Verdict:
    status: int
    """:data:`EXIT_REQUEUE`, or the status the job ends with."""
    message: str


def _ledger(run_dir: Path, job: str) -> dict:
    """This job's restart count; a new job (or none yet) starts from the latest checkpoint."""
    try:
        data = json.loads((run_dir / LEDGER).read_text())
        if data.get("job") == job:
            return data
    except (FileNotFoundError, ValueError):
        pass
    return {"job": job, "step": latest_step(run_dir), "crashes": 0}


def _write_ledger(run_dir: Path, data: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / LEDGER, json.dumps(data) + "\n")


def check(run_dir: Path, job: str) -> str:
    """Before an attempt: clear the last attempt's record; what this attempt resumes."""
    clear_exit_record(run_dir)
    ledger = _ledger(run_dir, job)
    _write_ledger(run_dir, ledger)
    start = f"from step {ledger['step']}" if ledger["step"] else "from the start"
    again = (f", after {ledger['crashes']} crash(es) without passing it"
             if ledger["crashes"] else "")
    return f"attempt {start}{again}"


def decide(run_dir: Path, launcher_status: int, max_restarts: int, job: str) -> Verdict:
    """What the job does after an attempt that ended with ``launcher_status`` (see the
    module doc)."""
    record = read_exit_record(run_dir)
    ledger = _ledger(run_dir, job)
    if record is not None and record.status == EXIT_OK:
        (run_dir / LEDGER).unlink(missing_ok=True)
        tail = f" (launcher status {launcher_status} at exit)" if launcher_status else ""
        return Verdict(EXIT_OK, f"finished at step {record.step}{tail}")
    step = latest_step(run_dir)
    if step > ledger["step"]:
        ledger = {"job": job, "step": step, "crashes": 0}
    if record is not None and record.status == EXIT_PREEMPTED:
        _write_ledger(run_dir, ledger)
        return Verdict(EXIT_REQUEUE, f"preempted at step {record.step} ({record.reason}): "
                                     "requeueing")
    if record is not None:
        return Verdict(record.status, f"stopped with status {record.status} at step "
                                      f"{record.step}: {record.reason}; not requeueing")
    ledger["crashes"] += 1
    _write_ledger(run_dir, ledger)
    since = f"step {step}" if step else "the start (no checkpoint yet)"
    if ledger["crashes"] > max_restarts:
        return Verdict(EXIT_CRASH_LOOP,
                       f"crashed (launcher status {launcher_status}) {ledger['crashes']} "
                       f"time(s) in a row without passing {since} "
                       f"(train.max_restarts_without_progress={max_restarts}): not "
                       "requeueing. The failures are in the log above; after a fix, a new "
                       f"submission resumes from {since}")
    return Verdict(EXIT_REQUEUE,
                   f"crashed (launcher status {launcher_status}) without an exit record: "
                   f"requeueing, restart {ledger['crashes']} of "
                   f"{max_restarts} without passing {since}")


def main(argv: Optional[list[str]] = None) -> int:
    from liquid_dist.train.entry import argument_parser

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("check", "decide"))
    p.add_argument("status", nargs="?", type=int, help="decide: the launcher's exit status")
    args, rest = p.parse_known_args(argv)
    run = argument_parser().parse_args(rest)
    job = os.environ.get("SLURM_JOB_ID", "")
    try:
        cfg = load_config(run.config, run.set)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    run_dir = Path(cfg.train.run_dir)
    if args.action == "check":
        print(check(run_dir, job), flush=True)
        return EXIT_OK
    if args.status is None:
        p.error("decide needs the launcher's exit status")
    verdict = decide(run_dir, args.status, cfg.train.max_restarts_without_progress, job)
    print(verdict.message, flush=True)
    return verdict.status


if __name__ == "__main__":
    sys.exit(main())
