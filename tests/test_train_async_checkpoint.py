"""Asynchronous checkpoints (train.async_checkpoint): the files of a synchronous save, the
loop blocked only for the capture, a SIGKILL mid-write or a write failure handled as for
a synchronous save."""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import train_fixtures as tf

from liquid_dist.checkpoint_format import (
    CHECKPOINTS,
    CHECKSUMS,
    CONFIG_FILE,
    LATEST,
    TRAINER_STATE,
)
from liquid_dist.train.exit_status import EXIT_PREEMPTED
from liquid_dist.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ASYNC = ["train.async_checkpoint=true", "train.ckpt_every=2"]


def _latest(run: Path) -> str:
    return (run / CHECKPOINTS / LATEST).read_text().strip()


def _checksums(run: Path, step: int) -> dict:
    return json.loads((run / CHECKPOINTS / f"step_{step:08d}" / CHECKSUMS).read_text())


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def _assert_same_checkpoint(run: Path, other: Path, step: int) -> None:
    """The same files (bytes), but the config (the runs' settings differ) and the trainer
    state (its run id differs; the rest is compared decoded)."""
    mine, theirs = (_checksums(r, step)["files"] for r in (run, other))
    assert mine.keys() == theirs.keys()
    differ = sorted(k for k in mine if mine[k] != theirs[k])
    assert set(differ) <= {CONFIG_FILE, TRAINER_STATE}, differ
    states = [torch.load(r / CHECKPOINTS / f"step_{step:08d}" / TRAINER_STATE,
                         weights_only=True) for r in (run, other)]
    for state in states:
        state.pop("run_id")
    assert _same(*states)


@functools.cache
def _sync_run() -> Path:
    """2 ranks, 8 steps, a synchronous checkpoint every 2 steps."""
    run = tf.TMP / "sync_every_2"
    proc = tf.launch(2, tf.base_overrides(run) + ["train.ckpt_every=2"])
    assert proc.returncode == 0, tf.tail(proc)
    return run


def test_async_saves_write_the_files_of_sync_ones_and_resume_exactly() -> None:
    sync = _sync_run()
    run = tf.TMP / "async_every_2"
    first = tf.launch(2, tf.base_overrides(run) + ASYNC,
                      extra_env={"LIQUID_TEST_STOP_AT_STEP": "5"})
    assert first.returncode == EXIT_PREEMPTED, tf.tail(first)
    assert _latest(run) == "step_00000005"  # the save at the stop completed before the exit
    _assert_same_checkpoint(run, sync, 4)  # sync keeps 4, 6, 8 (keep_last 3)
    saves = [e for e in read_metrics(run, "event") if e["event"] == "checkpoint"]
    assert [e["step"] for e in saves] == [2, 4, 5]
    for e in saves:
        assert e["mode"] == "async" and 0 < e["blocked_s"] <= e["total_s"], e
    assert "(async: the loop waited" in first.stdout

    second = tf.launch(2, tf.base_overrides(run) + ASYNC)
    assert second.returncode == 0, tf.tail(second)
    assert "resume at step 5" in second.stdout
    assert _latest(run) == "step_00000008"
    losses, expected = tf.train_losses(run), tf.train_losses(sync)
    assert sorted(losses) == list(range(1, 9))
    for step in range(6, 9):
        assert losses[step] == expected[step], step


def test_kill_9_during_the_background_write_keeps_the_previous_latest_and_resumes() -> None:
    run = tf.TMP / "async_kill9"
    log = tf.TMP / "async_kill9.log"
    proc = tf.start(2, tf.base_overrides(run) + ASYNC,
                    extra_env={"LIQUID_TEST_CKPT_PAUSE": "4:1"}, log=log)
    pid_file = run / "ckpt_pause.pid"
    deadline = time.time() + 180
    while not pid_file.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "rank 1 never reached the checkpoint write"
        time.sleep(0.2)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # rank 1, its files written
    assert proc.wait(timeout=120) != 0
    ckpts = run / CHECKPOINTS
    assert _latest(run) == "step_00000002"
    assert (ckpts / "step_00000004.tmp").is_dir() and not (ckpts / "step_00000004").exists()

    pid_file.unlink()
    resumed = tf.launch(2, tf.base_overrides(run) + ASYNC)
    assert resumed.returncode == 0, tf.tail(resumed)
    assert "resume at step 2" in resumed.stdout
    assert not (ckpts / "step_00000004.tmp").exists()
    losses, expected = tf.train_losses(run), tf.train_losses(_sync_run())
    for step in range(3, 9):
        assert losses[step] == expected[step], step


def test_a_background_write_failing_on_one_rank_ends_every_rank_with_its_message() -> None:
    run = tf.TMP / "async_fail"
    proc = tf.launch(2, tf.base_overrides(run) + ASYNC,
                     extra_env={"LIQUID_TEST_CKPT_FAIL": "4:0"}, timeout=240)
    assert proc.returncode != 0, tf.tail(proc)
    tmp = run / CHECKPOINTS / "step_00000004.tmp"
    message = (f"CheckpointError: writing the checkpoint of step 4 ({tmp}) failed on 1 "
               f"rank(s): rank 0: {tmp / 'done.rank0'}: OSError: LIQUID_TEST_CKPT_FAIL: "
               "rank 0 cannot write the checkpoint of step 4")
    assert proc.stdout.count(message) == 2, tf.tail(proc, 6000)  # one per rank
    assert _latest(run) == "step_00000002"
    assert "hang:" not in proc.stdout
