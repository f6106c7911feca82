"""Hang detection and prompt failure under the launchers users run: a rank frozen (SIGSTOP)
between steps under the deepspeed launcher and under torchrun, a rank frozen inside a
checkpoint save, and a save that fails on rank 0 alone. Real launchers, 2 gloo ranks,
the micro model; the rank is stopped at a fault point (liquid_dist.train.faults), not
raced. tests/test_slurm_real.py does the same under a real Slurm."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import train_fixtures as tf

from liquid_dist.train import watchdog

pytestmark = pytest.mark.slow


def _start(launcher: str, overrides: list[str], extra_env: dict[str, str],
           log: Path) -> subprocess.Popen:
    fh = open(log, "w")  # noqa: SIM115 - the run writes it until it ends
    return subprocess.Popen(tf.launch_cmd(2, overrides, launcher=launcher), cwd=tf.REPO,
                            env=tf.env(**extra_env), stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_pid(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {path.name}: " + log.read_text()[-3000:]
        time.sleep(0.05)
    return int(path.read_text())


def _stop_all(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _frozen_and_named(launcher: str, tmp_path: Path, *, fault: dict[str, str],
                      pid_file: str, overrides: list[str], bound: float,
                      section: str) -> tuple[float, float, str, int]:
    """Start a 2-rank run, SIGSTOP rank 1 when it reaches the fault point, wait for the job
    to end; (seconds the silence was reported as, seconds to the job's end, log, pid)."""
    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = _start(launcher, tf.base_overrides(run, steps=40) + overrides, fault, log)
    try:
        pid = _wait_for_pid(run / pid_file, proc, log)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            proc.wait(timeout=bound + 60)
        except subprocess.TimeoutExpired:
            pytest.fail("the job still runs a minute past its bound: " + log.read_text()[-3000:])
        took = time.monotonic() - stopped
    finally:
        _stop_all(proc)
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]
    named = re.search(rf"hang: rank 1 \(host [^,]+, pid {pid}, local rank 1\) silent for "
                      rf"(\d+) s .*, in section '{section}'", text)
    assert named, text[-3000:]
    assert "hang: rank 0 " not in text, text[-3000:]  # the rank waiting for it is not blamed
    assert "Python stacks of the live ranks 0 follow" in text, text[-3000:]
    assert "File " in text, text[-3000:]  # faulthandler's frames of rank 0
    assert (run / watchdog.HANG_MARKER).read_text().startswith("hang: rank 1 ")
    return float(named.group(1)), took, text, pid


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_a_frozen_rank_is_named_and_the_job_exits_within_the_hang_timeout(
        launcher: str, tmp_path: Path) -> None:
    timeout = 8.0
    silent, took, text, _ = _frozen_and_named(
        launcher, tmp_path, fault={"LIQUID_TEST_PARK_AT_STEP": "3:1"},
        pid_file="parked.rank1", overrides=[f"train.hang_timeout_s={timeout}"],
        bound=timeout, section="train")
    assert "after step 3" in text
    # named once the silence passed the step allowance, not before; the job ended within
    # it plus the poll, the stacks' wait and the launcher's teardown
    assert silent >= timeout, silent
    assert timeout <= took < timeout + watchdog.POLL_S + watchdog.STACKS_WAIT_S + 10, took


def test_a_rank_frozen_in_a_checkpoint_save_is_named_within_the_liveness_limit(
        tmp_path: Path) -> None:
    liveness = 6.0
    # the save's progress allowance (hang_timeout_long_s) stays at 1800 s: only the
    # liveness limit can name the rank this soon
    silent, took, _, _ = _frozen_and_named(
        "deepspeed", tmp_path, fault={"LIQUID_TEST_CKPT_PAUSE": "4:1"},
        pid_file="ckpt_pause.pid", overrides=["train.ckpt_every=4",
                                              f"train.hang_liveness_s={liveness}"],
        bound=liveness, section="save")
    assert silent >= liveness, silent
    assert liveness <= took < liveness + watchdog.POLL_S + watchdog.STACKS_WAIT_S + 10, took


def test_a_save_failing_on_rank_0_alone_ends_every_rank_promptly_with_its_message(
        tmp_path: Path) -> None:
    run = tmp_path / "run"
    # without a shared verdict rank 1 would wait at the save's barrier for the collective
    # timeout (30 minutes), past this test's bound
    proc = tf.launch(2, tf.base_overrides(run, steps=8) + ["train.ckpt_every=4"],
                     extra_env={"LIQUID_TEST_CKPT_FAIL": "4:0"}, timeout=240)
    assert proc.returncode != 0, tf.tail(proc)
    message = ("CheckpointError: writing the checkpoint of step 4 "
               f"({run / 'checkpoints' / 'step_00000004.tmp'}) failed on 1 rank(s): rank 0: "
               "OSError: LIQUID_TEST_CKPT_FAIL: rank 0 cannot write the checkpoint of step 4")
    assert proc.stdout.count(message) == 2, tf.tail(proc, 6000)  # one per rank
    assert not (run / "checkpoints" / "step_00000004").exists()
    assert "hang:" not in proc.stdout
