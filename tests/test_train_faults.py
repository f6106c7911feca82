"""Preemption, non-finite losses and bad configs, through the real launcher."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import train_fixtures as tf

from liquid_dist.checkpoint_format import CHECKPOINTS, LATEST, open_checkpoint, tag_for
from liquid_dist.parallel import free_port
from liquid_dist.train.exit_status import (
    EXIT_CONFIG,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    ExitRecord,
    read_exit_record,
)
from liquid_dist.train.metrics import read_metrics


def _worker_pid(launcher: subprocess.Popen, local_rank: int) -> int:
    deadline = time.time() + 60
    while time.time() < deadline:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "launch/pretrain.py" in cmd and f"--local_rank={local_rank}" in cmd:
                return p.pid
        time.sleep(0.2)
    raise AssertionError("worker not found")


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_on_every_rank_and_exits_75() -> None:
    run = tf.TMP / "sigterm"
    proc = tf.start(2, tf.base_overrides(run, steps=500), log=tf.TMP / "sigterm.log")
    rank1 = _worker_pid(proc, 1)
    deadline = time.time() + 180
    while not any(r["step"] >= 3 for r in read_metrics(run, "train")):
        assert proc.poll() is None, (tf.TMP / "sigterm.log").read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    os.kill(rank1, signal.SIGTERM)  # only rank 1: the flag must reach rank 0 too
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tf.TMP / "sigterm.log").read_text()[-3000:]
    events = [r for r in read_metrics(run, "event") if r["event"] == "preempted"]
    assert len(events) == 1 and events[0]["reason"] == "stop requested on another rank"
    step = events[0]["step"]
    assert 3 <= step < 500
    assert (run / CHECKPOINTS / LATEST).read_text().strip() == f"step_{step:08d}"
    assert read_exit_record(run) == ExitRecord(EXIT_PREEMPTED, step,
                                               "stop requested on another rank")
    assert max(r["step"] for r in read_metrics(run, "train")) == step


def _shards_with_a_corrupt_sample_each(out: Path) -> Path:
    """A copy of the training shards in which every shard's first sample fails its
    checksum (the loader skips and counts it: ``corrupt``)."""
    from test_data_bad_shards import _flip_ids_byte, _members, _write

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tf.train_data().shards, out)
    tars = sorted(out.rglob("*.tar"))
    assert tars, f"no shards under {out}"
    for tar in tars:
        _write(tar, _flip_ids_byte(_members(tar)))
    return out


@pytest.mark.slow
def test_nan_loss_is_skipped_and_counted_and_repeated_nans_stop_the_run() -> None:
    """(The run reads shards with bad samples too: the skipped samples, counted by the
    loaders of both ranks, reach the metrics.)"""
    run = tf.TMP / "nan"
    shards = _shards_with_a_corrupt_sample_each(tf.TMP / "nan_shards")
    overrides = tf.base_overrides(run) + ["train.ckpt_every=1", "train.keep_last=10",
                                          "train.max_nan_skips=2",
                                          f"data.train_shards={shards}"]
    # rank 0 only: the skip decision must still be the same on both ranks
    proc = tf.launch(2, overrides, extra_env={"LIQUID_TEST_NAN_STEPS": "2,4,5,6"})
    assert proc.returncode == EXIT_DIVERGED, tf.tail(proc)
    record = read_exit_record(run)
    assert (record.status, record.step) == (EXIT_DIVERGED, 6)
    assert record.reason.startswith("non-finite loss or gradients on 3 consecutive steps")
    assert "non-finite loss or gradients on 3 consecutive steps" in proc.stdout
    assert "train.max_nan_skips=2" in proc.stdout
    skips = [r for r in read_metrics(run, "event") if r["event"] == "nan_skip"]
    assert [(r["step"], r["nan_skips_in_row"], r["nan_skips_total"]) for r in skips] == [
        (2, 1, 1), (4, 1, 2), (5, 2, 3), (6, 3, 4)]
    train = {r["step"]: r for r in read_metrics(run, "train")}
    assert train[2]["loss"] == "nan" and train[3]["nan_skips"] == 1
    assert all(isinstance(train[s]["loss"], float) for s in (1, 3))
    # the loaders' counters, summed over the ranks, since the start of training
    last = train[max(train)]
    assert last["bad_samples"] >= 1 and last["bad_samples/corrupt"] == last["bad_samples"]
    assert [train[s]["bad_samples"] for s in sorted(train)] == sorted(
        train[s]["bad_samples"] for s in train)
    assert last["data_tokens/train"] > 0 and f"bad samples skipped {last['bad_samples']}" in (
        proc.stdout)

    def weights(step: int) -> dict[str, torch.Tensor]:
        return open_checkpoint(run / CHECKPOINTS / tag_for(step)).state_dict()

    w1, w2, w3 = weights(1), weights(2), weights(3)
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "the NaN step must not update weights"
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)
    assert all(torch.isfinite(v).all() for v in w3.values())


def _pretrain_direct(overrides: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    # RANK/WORLD_SIZE say "rank 0 of 2" and nobody else will ever join: creating
    # a process group would block until the timeout, so a prompt exit proves
    # the error came first.
    env = tf.env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "launch/pretrain.py", "--config", "configs/tiny.yaml"]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, cwd=tf.REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr"),
    ("model.vocab_size=100", "model.vocab_size' = 100: expected 'auto' or an integer >= the "
                             "tokenizer's vocabulary (600"),
    ("parallel.ep_size=2 parallel.zero_stage=2", "1 unless parallel.zero_stage is 3"),
    ("model.moe.num_experts=4 parallel.ep_size=4", "a divisor of the world size (2)"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.precision=fp16", "fp16 loss scaling is for GPUs"),
    # what only the data streams can tell (the tokenizer's sentinels, the shards)
    ("data.objective=span_corruption data.decoder_length=2",
     "'data.decoder_length' = 2: expected room for span corruption targets"),
    ("data.train_shards=/nonexistent/shards", "/nonexistent/shards"),
])
def test_invalid_config_fails_before_any_process_group(override: str, message: str) -> None:
    proc = _pretrain_direct(tf.base_overrides(tf.TMP / "bad") + override.split())
    assert proc.returncode == EXIT_CONFIG, proc.stdout[-2000:]
    assert message in proc.stdout
    assert "Initializing TorchBackend" not in proc.stdout
    assert not (tf.TMP / "bad").exists()


def test_bad_input_leaves_exit_record_2_in_an_existing_run_directory() -> None:
    run = tf.TMP / "bad_input_existing"
    run.mkdir(parents=True, exist_ok=True)
    proc = _pretrain_direct(tf.base_overrides(run) + ["data.train_shards=/nonexistent/shards"])
    assert proc.returncode == EXIT_CONFIG, proc.stdout[-2000:]
    record = read_exit_record(run)
    assert (record.status, record.step) == (EXIT_CONFIG, None)
    assert "/nonexistent/shards" in record.reason


def test_a_plan_beyond_a_sources_max_repetition_fails_before_any_process_group() -> None:
    proc = _pretrain_direct(tf.base_overrides(tf.TMP / "repeats") + ["train.max_steps=4000"])
    assert proc.returncode == EXIT_CONFIG, proc.stdout[-2000:]
    assert "data.max_repetition" in proc.stdout and "source 'train'" in proc.stdout


def test_missing_tokenizer_fails_before_any_process_group() -> None:
    proc = _pretrain_direct(tf.base_overrides(tf.TMP / "bad")
                            + ["data.tokenizer=/nonexistent/tokenizer.model"])
    assert proc.returncode == EXIT_CONFIG
    assert "data.tokenizer" in proc.stdout and "/nonexistent/tokenizer.model" in proc.stdout
