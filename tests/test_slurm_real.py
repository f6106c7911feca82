"""``sbatch slurm/pretrain.sh`` on a real Slurm cluster: completion, preemption, requeue, faults.

The session's throw-away cluster of 2 nodes on this machine
(tests/slurm_fixtures.py: scripts/local_slurm.sh up, its own directory,
ports and node names) serves every test; each submits the real slurm/pretrain.sh
with the real sbatch and drives it with the real scancel / scontrol, on 2
nodes x 1 CPU rank (gloo) with the micro model of tests/train_fixtures.py.
The #SBATCH GPU and CPU requests are overridden on the command line
(``--gpus-per-node=0 --cpus-per-task=1``, ``GPUS_PER_NODE=1``). A missing
Slurm is an error, not a skip (.ci/run installs it).

A test signals a job at a known step through ``LIQUID_TEST_HOLD_AT_STEP``
(liquid_dist/train/faults.py): the ranks wait after that step until a
stop signal arrives, so the preemption checkpoint is the next step's.

Requeue delay: Slurm lets a requeued job start again only after the
credential lifetime (``AuthInfo=cred_expire``, 120 s by default: the
"~2 minutes" seen by hand). local_slurm.sh sets ``cred_expire=5`` and
``SchedulerParameters=sched_interval=2``, so a requeued job restarts within
about 10 s with no action from the test.

Every wait has a timeout, and every job a test submitted is scancelled when
the test ends.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import train_fixtures as tf
from slurm_fixtures import FINAL, Cluster, job_state, wait_for

from liquid_dist.checkpoint_format import CHECKPOINTS, LATEST, TRAINER_STATE, find_checkpoint
from liquid_dist.parallel import free_port
from liquid_dist.train.exit_status import (
    EXIT_CONFIG,
    EXIT_CRASH_LOOP,
    EXIT_OK,
    ExitRecord,
    read_exit_record,
)
from liquid_dist.train.metrics import read_metrics

REPO = tf.REPO
pytestmark = pytest.mark.slow


def submit(cluster: Cluster, run_dir: Path, *, overrides: Sequence[str] = (),
           sbatch_args: Sequence[str] = (), extra_env: dict[str, str] | None = None) -> int:
    """``sbatch slurm/pretrain.sh`` of the micro model into ``run_dir``; output to run_dir.out."""
    args = []
    for o in [*tf.base_overrides(run_dir), *overrides]:
        args += ["--set", o]
    env = cluster.env(CONFIG="configs/tiny.yaml", RUN_DIR=str(run_dir), GPUS_PER_NODE="1",
                      MASTER_PORT=str(free_port()), **(extra_env or {}))
    proc = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=5", f"--output={output(run_dir)}", *sbatch_args, "slurm/pretrain.sh", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=30)
    assert proc.returncode == 0, proc.stdout
    job = int(proc.stdout.strip().split(";")[0])
    cluster.jobs.append(job)
    return job


def output(run_dir: Path) -> Path:
    return run_dir.with_suffix(".out")


def job_info(cluster: Cluster, job: int) -> dict[str, str]:
    text = cluster.cmd("scontrol", "show", "job", "-o", str(job))
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_final(cluster: Cluster, job: int, run_dir: Path, timeout: float) -> dict[str, str]:
    """The job's record once it has ended (after every requeue)."""
    wait_for(f"job {job} ended", lambda: job_state(cluster, job) in FINAL, timeout,
             output(run_dir))
    return job_info(cluster, job)


def wait_held(cluster: Cluster, job: int, run_dir: Path, timeout: float = 120) -> None:
    """Both ranks wait at LIQUID_TEST_HOLD_AT_STEP (the job still running)."""
    def held() -> bool:
        assert job_state(cluster, job) in ("PENDING", "RUNNING"), output(run_dir).read_text()
        return all((run_dir / f"held.rank{r}").exists() for r in (0, 1))
    wait_for("held at the test step", held, timeout, output(run_dir))


def assert_losses_equal(run_dir: Path, ref: dict[int, float], steps: Sequence[int]) -> None:
    got = tf.train_losses(run_dir)
    assert sorted(got) == list(range(1, 9)), sorted(got)
    for step in steps:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), step


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run_dir, "event") if r["event"] == name]


def latest_step(run_dir: Path) -> int:
    """The step of ``latest``, which must name a complete checkpoint."""
    ref = find_checkpoint(str(run_dir))
    assert ref is not None, "no latest checkpoint"
    assert (ref.path / TRAINER_STATE).exists()
    assert (run_dir / CHECKPOINTS / LATEST).read_text().strip() == ref.tag
    return int(ref.tag.split("_")[1])


# ---------------------------------------------------------------------- wandb


def wandb_history(run_dir: Path) -> list[tuple[str, dict[int, float]]]:
    """Per offline wandb run of ``run_dir`` (one per attempt, oldest first): its id and
    ``{step: train/loss}``, read back from its ``run-*.wandb`` file by wandb's own reader
    (``wandb leet inspect --json``). A step logged twice in one file fails."""
    runs = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        files = list(d.glob("run-*.wandb"))
        assert len(files) == 1, files
        proc = subprocess.run([str(tf.BIN / "wandb"), "leet", "inspect", "--json",
                               str(files[0])], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        losses: dict[int, float] = {}
        run_id = None
        for line in proc.stdout.splitlines():
            rec = json.loads(line)
            if rec["type"] == "run":
                run_id = rec["run"]["run_id"]
            if rec["type"] == "history" and "train/loss" in rec["history"]["item"]:
                step = int(rec["history"]["step"]["num"])
                assert step not in losses, f"step {step} logged twice in {files[0]}"
                losses[step] = float(rec["history"]["item"]["train/loss"])
        runs.append((run_id, losses))
    return runs


def assert_wandb_continues(run_dir: Path, attempts: int, resumed_at: int,
                           first_lost: bool = False) -> None:
    """One offline wandb run per attempt (rank 0 only), all with one id; together
    they hold steps 1..8 once each, with metrics.jsonl's losses for the steps the
    last attempt computed, which starts after ``resumed_at``. ``first_lost``: the
    first attempt's wandb service was killed by SIGTERM (its run file holds what the
    service wrote before it died: seen empty, but not guaranteed), its steps are
    voided, and the second attempt sends every step from metrics.jsonl."""
    runs = wandb_history(run_dir)
    assert len(runs) == attempts, f"{len(runs)} wandb runs for {attempts} attempts"
    if first_lost:
        assert set(runs[0][1]) <= set(range(1, resumed_at + 1)), runs[0]
        runs = runs[1:]
        resumed_at = 0
    assert len({run_id for run_id, _ in runs}) == 1, [r for r, _ in runs]
    assert min(runs[-1][1]) == resumed_at + 1, sorted(runs[-1][1])
    merged: dict[int, float] = {}
    for _, losses in runs:
        assert not set(losses) & set(merged), "a step logged by two attempts"
        merged.update(losses)
    assert sorted(merged) == list(range(1, 9))
    metrics = tf.train_losses(run_dir)
    for step in runs[-1][1]:
        assert runs[-1][1][step] == metrics[step], step


WANDB = ["train.wandb.mode=offline", "train.wandb.project=liquid-slurm-test"]


# ---------------------------------------------------------------------- tests


def test_sbatch_trains_to_the_end_with_the_losses_of_torchrun(slurm: Cluster,
                                                              tmp_path: Path) -> None:
    ref = tf.train_losses(tf.reference_run())
    run = tmp_path / "run"
    job = submit(slurm, run)
    info = wait_final(slurm, job, run, timeout=180)
    log = output(run).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "0"
    assert f"job {job} (restart 0): 2 node(s) x 1 rank(s), rendezvous {slurm.nodes[0]}:" in log
    assert events(run, "start")[0]["world_size"] == 2
    assert_losses_equal(run, ref, range(1, 9))


def test_usr1_preempts_requeues_and_resumes_the_same_wandb_run(slurm: Cluster,
                                                               tmp_path: Path) -> None:
    ref = tf.train_losses(tf.reference_run())
    run = tmp_path / "run"
    job = submit(slurm, run, overrides=WANDB, extra_env={"LIQUID_TEST_HOLD_AT_STEP": "3"})
    wait_held(slurm, job, run)
    # to the job steps (srun -> node_launch.sh -> torchrun -> ranks), not the batch shell
    slurm.cmd("scancel", "--signal=USR1", str(job))
    info = wait_final(slurm, job, run, timeout=240)
    log = output(run).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    # both attempts append to the one output file
    assert f"job {job} (restart 0)" in log and f"job {job} (restart 1)" in log, log
    assert "preempted at step 4 (SIGUSR1): requeueing" in log, log
    assert f"requeueing job {job}" in log, log
    assert [e["reason"] for e in events(run, "preempted")] == ["SIGUSR1"]
    assert [e["step"] for e in events(run, "resume")] == [4]
    assert read_exit_record(run) == ExitRecord(EXIT_OK, 8, "done")
    assert_losses_equal(run, ref, range(1, 9))
    assert_wandb_continues(run, attempts=2, resumed_at=4)


def test_usr1_with_an_async_save_in_flight_completes_it_and_the_preemption_save(
        slurm: Cluster, tmp_path: Path) -> None:
    ref = tf.train_losses(tf.reference_run())
    run = tmp_path / "run"
    job = submit(slurm, run, overrides=["train.async_checkpoint=true", "train.ckpt_every=3"],
                 extra_env={"LIQUID_TEST_HOLD_AT_STEP": "3"})
    wait_held(slurm, job, run)
    # step 3's save is captured and written in the background, not yet completed: that
    # happens at a step boundary
    assert not (run / CHECKPOINTS / LATEST).exists()
    slurm.cmd("scancel", "--signal=USR1", str(job))
    info = wait_final(slurm, job, run, timeout=240)
    log = output(run).read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "preempted at step 4 (SIGUSR1): requeueing" in log, log
    saves = events(run, "checkpoint")
    assert [e["step"] for e in saves] == [3, 4, 6, 8], saves
    assert all(e["mode"] == "async" for e in saves)
    assert [e["step"] for e in events(run, "resume")] == [4]
    assert latest_step(run) == 8
    assert_losses_equal(run, ref, range(1, 9))


def test_time_limit_signal_preempts_and_the_requeued_job_finishes(slurm: Cluster,
                                                                  tmp_path: Path) -> None:
    ref = tf.train_losses(tf.reference_run())
    run = tmp_path / "run"
    # slurmctld sends the warning once its ~30 s timer finds the job within
    # warn time + 30 s of the limit: with a 2-minute limit, USR1@30 comes 60-90 s
    # into the job, while the ranks wait at step 1 (a warning during start-up is
    # kept too, but the ranks would then stop at step 1 without holding)
    job = submit(slurm, run, sbatch_args=["--time=2", "--signal=USR1@30"],
                 extra_env={"LIQUID_TEST_HOLD_AT_STEP": "1"})
    wait_held(slurm, job, run, timeout=60)

    def requeued() -> bool:
        info = job_info(slurm, job)
        # SIGNALING: slurmctld is delivering the time-limit warning
        assert info["JobState"] in ("RUNNING", "SIGNALING", "COMPLETING", "PENDING",
                                    "REQUEUED"), info
        return info["JobState"] == "PENDING" and info["Restarts"] == "1"
    wait_for("requeued", requeued, 150, output(run))
    # the restarted attempt would get the same 2-minute limit and signal again
    slurm.cmd("scontrol", "update", f"JobId={job}", "TimeLimit=5")
    info = wait_final(slurm, job, run, timeout=180)
    log = output(run).read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert [e["reason"] for e in events(run, "preempted")] == ["SIGUSR1"]
    assert [e["step"] for e in events(run, "resume")] == [2]
    assert_losses_equal(run, ref, range(1, 9))


def test_scancel_sigterm_leaves_a_complete_latest_and_no_requeue(slurm: Cluster,
                                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = submit(slurm, run, overrides=["train.ckpt_every=2"],
                 extra_env={"LIQUID_TEST_HOLD_AT_STEP": "3"})
    wait_held(slurm, job, run)
    slurm.cmd("scancel", str(job))
    info = wait_final(slurm, job, run, timeout=90)
    log = output(run).read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log
    # the ranks checkpoint step 4 on SIGTERM, unless Slurm's KillWait cut them short
    # first: then latest stays on step 2; never a latest naming a partial checkpoint
    step = latest_step(run)
    assert step in (2, 4), step
    if step == 4:
        assert [e["reason"] for e in events(run, "preempted")] == ["SIGTERM"]


def test_scontrol_requeue_from_outside_checkpoints_and_resumes(slurm: Cluster,
                                                               tmp_path: Path) -> None:
    ref = tf.train_losses(tf.reference_run())
    run = tmp_path / "run"
    job = submit(slurm, run, overrides=["train.ckpt_every=2", *WANDB],
                 extra_env={"LIQUID_TEST_HOLD_AT_STEP": "3"})
    wait_held(slurm, job, run)
    slurm.cmd("scontrol", "requeue", str(job))  # SIGTERM to the job, then pending again
    info = wait_final(slurm, job, run, timeout=240)
    log = output(run).read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    resumed = [e["step"] for e in events(run, "resume")]
    assert resumed in ([4], [2]), resumed
    assert_losses_equal(run, ref, range(1, 9))
    # wandb's service got the SIGTERM too and died (rank 0 carried on without it)
    assert [e["step"] for e in events(run, "wandb_lost")] == [resumed[0]]
    assert_wandb_continues(run, attempts=2, resumed_at=resumed[0], first_lost=True)


def test_a_rank_killed_once_requeues_the_job_which_resumes_and_finishes(
        slurm: Cluster, tmp_path: Path) -> None:
    ref = tf.train_losses(tf.reference_run())
    run = tmp_path / "run"
    job = submit(slurm, run, overrides=["train.ckpt_every=3", *WANDB],
                 extra_env={"LIQUID_TEST_HOLD_AT_STEP": "4"})
    wait_held(slurm, job, run)
    os.kill(int((run / "held.rank1").read_text()), signal.SIGKILL)
    info = wait_final(slurm, job, run, timeout=240)
    log = output(run).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    assert ("without an exit record: requeueing, restart 1 of 3 without passing step 3"
            in log), log
    assert [e["step"] for e in events(run, "resume")] == [3]
    assert_losses_equal(run, ref, range(1, 9))
    # the dead attempt had sent step 4 to wandb (after its checkpoint at 3): the
    # requeued one does not send it again. What the SIGKILLed attempt's wandb
    # service had written of steps 1-4 varies (from nothing to all of them):
    # offline, a killed attempt's unwritten steps are lost (docs/training.md)
    (first_id, first), (second_id, second) = wandb_history(run)
    assert set(first) <= {1, 2, 3, 4}, sorted(first)
    assert first_id in (None, second_id)
    assert sorted(second) == [5, 6, 7, 8]
    metrics = tf.train_losses(run)
    assert all(second[step] == metrics[step] for step in second)


def test_a_rank_that_crashes_on_every_attempt_stops_the_job_after_k_restarts(
        slurm: Cluster, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # rank 1 raises after step 3 on every attempt; the first attempt checkpoints step 2
    # (progress), the restart from it gets no further: with K = 1 that is the end
    job = submit(slurm, run, overrides=["train.ckpt_every=2",
                                        "train.max_restarts_without_progress=1"],
                 extra_env={"LIQUID_TEST_CRASH_AT_STEP": "3:1"})
    info = wait_final(slurm, job, run, timeout=240)
    log = output(run).read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{EXIT_CRASH_LOOP}:0", log
    assert info["Restarts"] == "1", log
    assert "InjectedCrash: LIQUID_TEST_CRASH_AT_STEP: rank 1 after step 3" in log, log
    assert "restart 1 of 1 without passing step 2" in log, log
    assert ("2 time(s) in a row without passing step 2 (train.max_restarts_without_progress=1)"
            ": not requeueing") in log, log
    assert [e["step"] for e in events(run, "resume")] == [2]


def test_a_frozen_rank_stops_the_job_within_the_hang_timeout_naming_it_then_it_resumes(
        slurm: Cluster, tmp_path: Path) -> None:
    run = tmp_path / "run"
    timeout = 10.0
    job = submit(slurm, run, overrides=["train.max_steps=40", "train.ckpt_every=5",
                                        "train.eval_every=40", f"train.hang_timeout_s={timeout}"],
                 extra_env={"LIQUID_TEST_PARK_AT_STEP": "13:1"})
    # rank 1 parks between steps 13 and 14 (section 'train'), on whichever node it is
    parked = run / "parked.rank1"
    wait_for("rank 1 parked after step 13", parked.exists, 180, output(run))
    pid = int(parked.read_text())
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()

    def requeued() -> bool:
        return job_info(slurm, job)["Restarts"] == "1"
    wait_for("requeued", requeued, 120, output(run))
    took = time.monotonic() - stopped
    info = wait_final(slurm, job, run, timeout=240)
    log = output(run).read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    named = re.search(rf"hang: rank 1 \(host (\w+), pid {pid}, local rank 0\) silent for "
                      r"\d+ s .*, after step 13, in section 'train'", log)
    assert named and named.group(1) in slurm.nodes, log
    # the other node's watchdog saw the report and had rank 0 dump its stacks
    assert "Python stacks of the live ranks 0 follow" in log, log
    assert "File " in log and "_loop" in log, log  # faulthandler's frames of rank 0
    assert took < timeout + 30, took  # detection, stacks, kill, requeue
    resumed = [e["step"] for e in events(run, "resume")]
    assert len(resumed) == 1 and resumed[0] >= 10, resumed
    assert sorted(tf.train_losses(run)) == list(range(1, 41))


def test_a_bad_config_ends_the_job_with_2_before_any_rank_starts(slurm: Cluster,
                                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = submit(slurm, run, overrides=["model.d_model=-3"])
    info = wait_final(slurm, job, run, timeout=60)
    log = output(run).read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{EXIT_CONFIG}:0", log
    assert info["Restarts"] == "0", log
    assert "model.d_model" in log and "not started: the run config is refused" in log, log
    assert "requeueing" not in log and not (run / "metrics.jsonl").exists()


def test_a_node_that_never_joins_is_a_crash_naming_the_rendezvous(slurm: Cluster,
                                                                  tmp_path: Path) -> None:
    run = tmp_path / "run"
    real = tf.BIN / "torchrun"
    stuck = tmp_path / "torchrun"
    # the second node's launcher hangs before the rendezvous (a node that never comes up)
    stuck.write_text(f'#!/usr/bin/env bash\nif [ "$SLURM_NODEID" = 1 ]; then exec sleep 600; fi\n'
                     f'exec "{real}" "$@"\n')
    stuck.chmod(0o755)
    start = time.monotonic()
    # a crash like any other (requeued up to the limit): with no restarts allowed, one
    job = submit(slurm, run, overrides=["train.max_restarts_without_progress=0"],
                 extra_env={"TORCHRUN": str(stuck), "RDZV_TIMEOUT": "15"})
    info = wait_final(slurm, job, run, timeout=120)
    log = output(run).read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{EXIT_CRASH_LOOP}:0", log
    assert info["Restarts"] == "0", log
    assert time.monotonic() - start < 100
    assert "RendezvousTimeoutError" in log, log
    assert "1 time(s) in a row without passing the start (no checkpoint yet)" in log, log
    assert not tf.train_losses(run)

