"""Exact resume: stop at step n (or lose a rank mid-checkpoint), resume, same losses after n."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import train_fixtures as tf

from liquid_dist.checkpoint_format import CHECKPOINTS, LATEST, TRAINER_STATE
from liquid_dist.train.exit_status import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_PREEMPTED,
    ExitRecord,
    read_exit_record,
)
from liquid_dist.train.metrics import read_metrics


def _latest(run_dir) -> str:
    return (run_dir / CHECKPOINTS / LATEST).read_text().strip()


@pytest.mark.slow
def test_stop_after_step_4_and_resume_matches_uninterrupted_run() -> None:
    ref = tf.train_losses(tf.reference_run())
    run = tf.TMP / "stop_resume"
    first = tf.launch(2, tf.base_overrides(run), extra_env={"LIQUID_TEST_STOP_AT_STEP": "4"})
    assert first.returncode == EXIT_PREEMPTED, tf.tail(first)
    assert _latest(run) == "step_00000004"
    assert read_exit_record(run) == ExitRecord(EXIT_PREEMPTED, 4, "LIQUID_TEST_STOP_AT_STEP")
    assert sorted(tf.train_losses(run)) == [1, 2, 3, 4]

    second = tf.launch(2, tf.base_overrides(run))
    assert second.returncode == 0, tf.tail(second)
    assert "resume at step 4" in second.stdout
    assert read_exit_record(run) == ExitRecord(EXIT_OK, 8, "done")
    resumed = tf.train_losses(run)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-6, abs=0), step


@pytest.mark.slow
def test_kill_9_during_checkpoint_write_keeps_previous_latest_and_resumes() -> None:
    ref = tf.train_losses(tf.reference_run())
    run = tf.TMP / "kill9"
    overrides = tf.base_overrides(run) + ["train.ckpt_every=2"]
    proc = tf.start(2, overrides, extra_env={"LIQUID_TEST_CKPT_PAUSE": "4:1"},
                    log=tf.TMP / "kill9.log")
    pid_file = run / "ckpt_pause.pid"
    deadline = time.time() + 180
    while not pid_file.exists():
        assert proc.poll() is None, (tf.TMP / "kill9.log").read_text()[-3000:]
        assert time.time() < deadline, "rank 1 never reached the checkpoint write"
        time.sleep(0.2)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # rank 1, its shard files written
    assert proc.wait(timeout=120) != 0
    ckpts = run / CHECKPOINTS
    assert _latest(run) == "step_00000002"
    assert (ckpts / "step_00000004.tmp").is_dir()
    assert not (ckpts / "step_00000004").exists()
    assert not (ckpts / "step_00000004.tmp" / TRAINER_STATE).exists()

    pid_file.unlink()
    resumed = tf.launch(2, overrides)
    assert resumed.returncode == 0, tf.tail(resumed)
    assert "resume at step 2" in resumed.stdout
    assert not (ckpts / "step_00000004.tmp").exists()
    assert _latest(run) == "step_00000008"
    losses = tf.train_losses(run)
    assert sorted(losses) == list(range(1, 9))
    for step in range(3, 9):
        assert losses[step] == pytest.approx(ref[step], rel=1e-6, abs=0), step


@functools.cache
def _tiny_on_two_threads(name: str, *extra: str) -> dict[int, float]:
    """configs/tiny.yaml (its MoE on the default CPU path, grouped_mm), 12 steps on 2 ranks
    of 2 threads each; the losses by step."""
    data = tf.train_data()
    run = tf.TMP / name
    proc = tf.launch(2, [f"data.tokenizer={data.tokenizer}", f"data.train_shards={data.shards}",
                         "data.val_shards=null", "data.num_workers=0", f"train.run_dir={run}",
                         "train.max_steps=12", "train.log_every=1", "train.ckpt_every=12",
                         *extra], extra_env={"OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, tf.tail(proc)
    losses = tf.train_losses(run)
    assert sorted(losses) == list(range(1, 13))
    return losses


@pytest.mark.slow
def test_two_runs_with_two_threads_per_rank_give_bitwise_equal_losses() -> None:
    """Exact with more than one thread: the same seed and data give the same bits at every
    step. (Before the MoE gathers' backward was made order-fixed, two such runs parted at
    step 2.)"""
    assert _tiny_on_two_threads("threads_a") == _tiny_on_two_threads("threads_b")


@pytest.mark.slow
def test_deterministic_switch_changes_nothing_on_the_cpu() -> None:
    """``train.deterministic`` (deterministic algorithms only) runs the whole step on the CPU
    (no operation without a deterministic implementation) and gives the same bits."""
    assert _tiny_on_two_threads("threads_deterministic", "train.deterministic=true") == (
        _tiny_on_two_threads("threads_a"))
    starts = [read_metrics(tf.TMP / name, "event")[0] for name in ("threads_deterministic",
                                                                    "threads_a")]
    assert [(e["event"], e["deterministic"]) for e in starts] == [("start", True),
                                                                  ("start", False)]
    (source,) = starts[0]["token_plan"]["sources"]  # the plan the run drew from, recorded
    assert source["name"] == "train" and source["planned_tokens"] > 0


def _flip_a_byte(ckpt: Path) -> str:
    f = ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    return "zero_pp_rank_1_mp_rank_00_optim_states.pt: contents changed"


def _truncate(ckpt: Path) -> str:
    f = ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    return "zero_pp_rank_0_mp_rank_00_model_states.pt: 100 bytes"


def _delete(ckpt: Path) -> str:
    (ckpt / TRAINER_STATE).unlink()
    return "trainer_state.pt: missing"


@pytest.mark.slow
def test_resume_auto_falls_back_past_a_damaged_checkpoint_and_refuses_when_none_verifies(
        ) -> None:
    """A flipped byte, a truncated file or a deleted file in the newest checkpoint: the run
    resumes from the one before, saying which file, and its losses are those of an
    uninterrupted run; with every checkpoint damaged it stops before anything is built."""
    ref = tf.train_losses(tf.reference_run())
    base = tf.TMP / "damaged_base"
    overrides = ["train.ckpt_every=2"]
    first = tf.launch(2, tf.base_overrides(base) + overrides,
                      extra_env={"LIQUID_TEST_STOP_AT_STEP": "4"})
    assert first.returncode == EXIT_PREEMPTED, tf.tail(first)
    newest, previous = (Path(CHECKPOINTS) / tag for tag in ("step_00000004", "step_00000002"))
    for damage in (_flip_a_byte, _truncate, _delete):
        run = tf.TMP / f"damaged{damage.__name__}"
        shutil.copytree(base, run)
        what = damage(run / newest)
        proc = tf.launch(2, tf.base_overrides(run) + overrides)
        assert proc.returncode == 0, tf.tail(proc)
        assert "resume at step 2" in proc.stdout and what in proc.stdout
        (skipped,) = [e for e in read_metrics(run, "event") if e["event"] == "checkpoint_skipped"]
        assert what in skipped["reason"] and "step_00000004" in skipped["reason"]
        resumed = tf.train_losses(run)
        assert sorted(resumed) == list(range(1, 9))
        for step in range(3, 9):
            assert resumed[step] == pytest.approx(ref[step], rel=1e-6, abs=0), (damage, step)
    run = tf.TMP / "damaged_all"
    shutil.copytree(base, run)
    _truncate(run / newest)
    _delete(run / previous)
    metrics = (run / "metrics.jsonl").read_bytes()
    proc = tf.launch(2, tf.base_overrides(run) + overrides)
    assert proc.returncode == EXIT_CONFIG, tf.tail(proc)
    assert "no checkpoint to resume verifies" in proc.stdout
    assert (run / "metrics.jsonl").read_bytes() == metrics  # no training attempt began
