"""What a Slurm job does after an attempt (liquid_dist.train.requeue): the policy on run
directories as attempts leave them, and its command line as slurm/pretrain.sh calls it.
tests/test_slurm_real.py runs the same on a real Slurm."""

from __future__ import annotations

from pathlib import Path

import pytest

from liquid_dist.checkpoint_format import CHECKPOINTS, LATEST, tag_for
from liquid_dist.train import requeue
from liquid_dist.train.exit_status import (
    EXIT_CONFIG,
    EXIT_CRASH_LOOP,
    EXIT_DIVERGED,
    EXIT_OK,
    EXIT_PREEMPTED,
    ExitRecord,
    read_exit_record,
    write_exit_record,
)

REPO = Path(__file__).resolve().parents[1]


def checkpoint_at(run_dir: Path, step: int) -> None:
    """``latest`` names the checkpoint of ``step`` (what the policy reads of checkpoints)."""
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    (run_dir / CHECKPOINTS / LATEST).write_text(tag_for(step) + "\n")


def attempt(run_dir: Path, record: ExitRecord | None, *, launcher_status: int = 1,
            max_restarts: int = 3, job: str = "7") -> requeue.Verdict:
    requeue.check(run_dir, job)
    if record is not None:
        write_exit_record(run_dir, record)
    return requeue.decide(run_dir, launcher_status, max_restarts, job)


def test_a_finished_run_ends_the_job_with_0_whatever_the_launcher_said(tmp_path: Path) -> None:
    verdict = attempt(tmp_path, ExitRecord(EXIT_OK, 12, "done"), launcher_status=1)
    assert verdict.status == EXIT_OK
    assert "finished at step 12 (launcher status 1 at exit)" in verdict.message
    assert not (tmp_path / requeue.LEDGER).exists()


def test_a_preempted_run_is_requeued(tmp_path: Path) -> None:
    checkpoint_at(tmp_path, 6)
    verdict = attempt(tmp_path, ExitRecord(EXIT_PREEMPTED, 6, "SIGUSR1"))
    assert verdict.status == requeue.EXIT_REQUEUE
    assert "preempted at step 6 (SIGUSR1)" in verdict.message


@pytest.mark.parametrize("status", [EXIT_CONFIG, EXIT_DIVERGED])
def test_a_failure_that_retrying_cannot_mend_ends_the_job_with_its_status(
        tmp_path: Path, status: int) -> None:
    verdict = attempt(tmp_path, ExitRecord(status, None, "data.train_shards: no shards"))
    assert verdict.status == status
    assert "data.train_shards: no shards; not requeueing" in verdict.message


def test_crashes_without_progress_stop_the_job_after_k_restarts(tmp_path: Path) -> None:
    checkpoint_at(tmp_path, 4)
    verdicts = [attempt(tmp_path, None, max_restarts=2) for _ in range(3)]
    assert [v.status for v in verdicts] == [requeue.EXIT_REQUEUE, requeue.EXIT_REQUEUE,
                                            EXIT_CRASH_LOOP]
    assert "restart 1 of 2 without passing step 4" in verdicts[0].message
    assert ("crashed (launcher status 1) 3 time(s) in a row without passing step 4 "
            "(train.max_restarts_without_progress=2): not requeueing") in verdicts[2].message
    # a new submission (another job) counts afresh
    assert attempt(tmp_path, None, max_restarts=2, job="8").status == requeue.EXIT_REQUEUE


def test_a_new_checkpoint_resets_the_count(tmp_path: Path) -> None:
    assert attempt(tmp_path, None, max_restarts=1).status == requeue.EXIT_REQUEUE
    checkpoint_at(tmp_path, 2)  # the second attempt got past its start before crashing
    assert attempt(tmp_path, None, max_restarts=1).status == requeue.EXIT_REQUEUE
    verdict = attempt(tmp_path, None, max_restarts=1)
    assert verdict.status == EXIT_CRASH_LOOP
    assert "2 time(s) in a row without passing step 2" in verdict.message


def test_with_no_restarts_allowed_the_first_crash_ends_the_job(tmp_path: Path) -> None:
    verdict = attempt(tmp_path, None, max_restarts=0)
    assert verdict.status == EXIT_CRASH_LOOP
    assert "without passing the start (no checkpoint yet)" in verdict.message


def test_check_clears_the_last_attempts_record(tmp_path: Path) -> None:
    write_exit_record(tmp_path, ExitRecord(EXIT_PREEMPTED, 3, "SIGTERM"))
    requeue.check(tmp_path, "7")
    assert read_exit_record(tmp_path) is None
    # an attempt that crashed before writing anything is a crash, not a stale preemption
    assert requeue.decide(tmp_path, 1, 3, "7").message.startswith("crashed")


def test_a_damaged_record_is_named(tmp_path: Path) -> None:
    (tmp_path / "EXIT").write_text("{\"status\": 0")
    with pytest.raises(ValueError, match=r"EXIT: not an exit record"):
        read_exit_record(tmp_path)


def test_the_command_line_reads_the_run_config(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "tiny.yaml"), "--set", f"train.run_dir={run}",
            "--set", "train.max_restarts_without_progress=0"]
    assert requeue.main(["check", *args]) == EXIT_OK
    assert requeue.main(["decide", "1", *args]) == EXIT_CRASH_LOOP
    assert "train.max_restarts_without_progress=0" in capsys.readouterr().out
    bad = ["--config", str(REPO / "configs" / "tiny.yaml"), "--set", "model.d_model=-3"]
    assert requeue.main(["check", *bad]) == EXIT_CONFIG
    assert "model.d_model" in capsys.readouterr().err
