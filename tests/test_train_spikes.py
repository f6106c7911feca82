"""Loss spikes (train.spike, liquid_dist.train.spikes): the rule, then real 2-rank runs
with outlier batches injected on rank 0 (``LIQUID_TEST_SPIKE_STEPS``): skipped, rewound
with the data not rewound, the same across a requeue, and a spike that comes back stops
the run."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import train_fixtures as tf

from liquid_dist.checkpoint_format import CHECKPOINTS, open_checkpoint, tag_for
from liquid_dist.train.exit_status import EXIT_DIVERGED, read_exit_record
from liquid_dist.train.metrics import read_metrics
from liquid_dist.train.spikes import SpikeState, outlier, record
from liquid_dist.train.state import TrainerState

# ---------------------------------------------------------------- the rule


def test_an_outlier_lies_above_mean_plus_sigma_std_of_the_applied_steps() -> None:
    s = SpikeState()
    assert outlier(s, 4, 3.0, loss=1e9) is None  # the window judges from window // 2 steps
    for step, (loss, norm) in enumerate([(2.0, 1.0), (2.2, 1.2)], 1):
        record(s, step, 4, loss=loss, grad_norm=norm, is_outlier=False)
    # mean 2.1, std 0.1: the limit is 2.4
    assert outlier(s, 4, 3.0, loss=2.39) is None
    assert outlier(s, 4, 3.0, loss=2.41) == "loss 2.41 > 2.4 (mean + 3 sigma of 2 steps)"
    assert outlier(s, 4, 3.0, grad_norm=1.5) is not None
    assert outlier(s, 4, 3.0, loss=1.0, grad_norm=0.5) is None  # below is no spike
    assert outlier(s, 4, 3.0, loss=math.nan) is None  # the non-finite check's
    record(s, 3, 4, loss=9.0, grad_norm=9.0, is_outlier=True)
    record(s, 4, 4, loss=9.0, grad_norm=9.0, is_outlier=True)
    assert (s.in_row, s.first, s.losses) == (2, 3, [2.0, 2.2])  # outliers stay out
    for step in range(5, 9):
        record(s, step, 4, loss=float(step), grad_norm=1.0, is_outlier=False)
    assert (s.in_row, s.first, s.losses) == (0, None, [5.0, 6.0, 7.0, 8.0])


def test_the_window_and_rewinds_round_trip_through_the_trainer_state() -> None:
    st = TrainerState(step=9, run_id="r")
    st.spike = SpikeState([1.0, 2.0], [3.0, 4.0], 1, 9, [(4, 6)])
    back = TrainerState()
    back.load_state_dict(st.state_dict())
    assert back == st
    old = {k: v for k, v in st.state_dict().items() if k != "spike"}  # an older checkpoint
    back.load_state_dict(old)
    assert back.spike == SpikeState()


# ---------------------------------------------------------------- real runs

SPIKE = ["train.spike.policy=rewind", "train.spike.window=4", "train.spike.rewind_after=2",
         "train.spike.sigma=20",
         "train.keep_last=10"]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return open_checkpoint(run / CHECKPOINTS / tag_for(step)).state_dict()


def _events(run: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run, "event") if r["event"] == name]


@functools.cache
def rewound_run() -> Path:
    """Outliers at steps 5 and 6: 5 is skipped, 6 rewinds to the checkpoint of step 4."""
    run = tf.TMP / "spike_rewind"
    proc = tf.launch(2, tf.base_overrides(run) + SPIKE + ["train.ckpt_every=2"],
                     extra_env={"LIQUID_TEST_SPIKE_STEPS": "5,6"})
    assert proc.returncode == 0, tf.tail(proc)
    return run


@pytest.mark.slow
def test_outliers_are_skipped_then_rewound_past_the_spike_batches() -> None:
    run = rewound_run()
    skips = _events(run, "spike_skip")
    assert [(r["step"], r["in_row"]) for r in skips] == [(5, 1), (6, 2)]
    assert all(r["reason"].startswith("loss ") for r in skips)
    rewinds = _events(run, "spike_rewind")
    assert [(r["step"], r["checkpoint"], r["skipped_steps"]) for r in rewinds] == [
        (6, 4, [5, 6])]
    # the checkpoint written at the rewind holds the weights of step 4, the data of step 6
    w4, w6, w8 = _weights(run, 4), _weights(run, 6), _weights(run, 8)
    assert all(torch.equal(w4[k], w6[k]) for k in w4)
    assert any(not torch.equal(w6[k], w8[k]) for k in w6)
    state4, state6 = (torch.load(run / CHECKPOINTS / tag_for(s) / "trainer_state.pt",
                                 weights_only=True) for s in (4, 6))
    assert [r["loader"] for r in state6["ranks"]] != [r["loader"] for r in state4["ranks"]]
    assert state6["spike"]["rewinds"] == [[4, 6]]
    losses = tf.train_losses(run)
    assert sorted(losses) == list(range(1, 9))
    assert all(math.isfinite(losses[s]) for s in (7, 8))


@pytest.mark.slow
def test_a_requeue_after_a_rewind_continues_as_the_uninterrupted_run() -> None:
    ref = tf.train_losses(rewound_run())
    run = tf.TMP / "spike_requeue"
    overrides = tf.base_overrides(run) + SPIKE + ["train.ckpt_every=2"]
    first = tf.launch(2, overrides, extra_env={"LIQUID_TEST_SPIKE_STEPS": "5,6",
                                               "LIQUID_TEST_STOP_AT_STEP": "7"})
    assert first.returncode == 75, tf.tail(first)
    second = tf.launch(2, overrides, extra_env={"LIQUID_TEST_SPIKE_STEPS": "5,6"})
    assert second.returncode == 0, tf.tail(second)
    assert "resume at step 7" in second.stdout
    assert tf.train_losses(run)[8] == ref[8]
    assert _events(run, "spike_rewind")[0]["checkpoint"] == 4


@pytest.mark.slow
def test_a_spike_that_comes_back_after_a_rewind_stops_the_run() -> None:
    run = tf.TMP / "spike_again"
    proc = tf.launch(2, tf.base_overrides(run) + SPIKE + ["train.ckpt_every=1"],
                     extra_env={"LIQUID_TEST_SPIKE_STEPS": "5,6,7,8"})
    assert proc.returncode == EXIT_DIVERGED, tf.tail(proc)
    # 5 skipped: its update not applied
    w4, w5 = _weights(run, 4), _weights(run, 5)
    assert all(torch.equal(w4[k], w5[k]) for k in w4)
    assert [r["checkpoint"] for r in _events(run, "spike_rewind")] == [4]
    record_ = read_exit_record(run)
    assert (record_.status, record_.step) == (EXIT_DIVERGED, 8)
    assert ("loss spike at steps 7-8, again before training got past the rewind at step 6 "
            "(to the checkpoint of step 4): stopping") in record_.reason
