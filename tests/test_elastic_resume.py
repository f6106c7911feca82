"""Elastic resume: a run continues on another world size or ep_size as if uninterrupted.

Three layouts of the same global batch (4 examples) train the micro model with
4 experts for 12 steps, checkpointing every 4: 2 ranks (micro-batch 2), 1 rank
(micro-batch 2, grad_accum 2) and 2 ranks with ep_size 2. Each resumed run
starts from another layout's step-4 checkpoint and trains steps 5..12; its
losses must equal those of the uninterrupted run it continues, and its AdamW
state at steps 8 and 12 that run's (docs/parallelism.md, "Elastic resume").
Dropout is 0 (the micro model), so nothing random differs between layouts.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch
import train_fixtures as tf

from liquid_dist.checkpoint_format import (
    CHECKPOINTS,
    LATEST,
    STATES,
    find_checkpoint,
    open_checkpoint,
    tag_for,
)
from liquid_dist.config import ConfigError
from liquid_dist.train.checkpoint import check_resumable
from liquid_dist.train.entry import EXIT_CONFIG
from liquid_dist.train.metrics import read_metrics

STEPS, RESUME_AT = 12, 4
LOSS_RTOL = 1e-5
STATE_RTOL = 1e-4  # observed <= 6e-5 (norm of the difference / norm of the tensor)
# layout -> (ranks, ep_size, micro_batch_size, grad_accum): global batch 4 each
LAYOUTS = {"w2": (2, 1, 2, 1), "w1": (1, 1, 2, 2), "w2ep2": (2, 2, 2, 1)}
RUN_SETTINGS = ["model.activation_checkpointing=true", "model.check_finite=true"]


def overrides(run_dir: Path, layout: str) -> list[str]:
    _, ep, micro, accum = LAYOUTS[layout]
    return tf.base_overrides(run_dir, steps=STEPS) + [
        "model.moe.num_experts=4", "model.moe.k_max=2", f"train.ckpt_every={RESUME_AT}",
        "train.keep_last=5", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}",
        f"parallel.ep_size={ep}"]


@functools.cache
def uninterrupted(layout: str) -> Path:
    run_dir = tf.TMP / f"elastic_{layout}"
    proc = tf.launch(LAYOUTS[layout][0], overrides(run_dir, layout), launcher="torchrun")
    assert proc.returncode == 0, tf.tail(proc)
    return run_dir


def checkpoint_copy(src: Path, dst: Path, step: int = RESUME_AT) -> None:
    """``dst`` becomes a run directory holding only ``src``'s checkpoint of ``step``."""
    (dst / CHECKPOINTS).mkdir(parents=True)
    shutil.copytree(src / CHECKPOINTS / tag_for(step), dst / CHECKPOINTS / tag_for(step))
    (dst / CHECKPOINTS / LATEST).write_text(tag_for(step) + "\n")


@functools.cache
def resumed(src: str, dst: str) -> Path:
    """``src``'s step-4 checkpoint continued on layout ``dst`` to step 12, through the
    live-logits harness (the same training, plus the live model's logits at the end);
    the 1 -> 2 rank resume also changes run settings."""
    run_dir = tf.TMP / f"elastic_{src}_to_{dst}"
    checkpoint_copy(uninterrupted(src), run_dir)
    extra = RUN_SETTINGS if (src, dst) == ("w1", "w2") else []
    proc = tf.launch(LAYOUTS[dst][0], overrides(run_dir, dst) + extra, launcher="torchrun",
                     script="tests/live_logits_harness.py",
                     script_args=["--logits", str(run_dir / "live_logits.pt")])
    assert proc.returncode == 0, tf.tail(proc)
    return run_dir


CASES = [("w2", "w1"), ("w1", "w2"), ("w2ep2", "w2"), ("w2", "w2ep2")]
IDS = ["2-to-1-ranks", "1-to-2-ranks-new-run-settings", "ep2-to-ep1", "ep1-to-ep2"]


@pytest.mark.slow
@pytest.mark.parametrize(("src", "dst"), CASES, ids=IDS)
def test_losses_after_an_elastic_resume_equal_the_uninterrupted_run(src: str, dst: str) -> None:
    run = resumed(src, dst)
    want, got = tf.train_losses(uninterrupted(src)), tf.train_losses(run)
    assert sorted(got) == list(range(RESUME_AT + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), step
    ranks, ep = LAYOUTS[src][:2]
    start = [r for r in read_metrics(run, "event") if r["event"] == "resume"]
    assert start and start[0]["step"] == RESUME_AT
    assert start[0]["resharded_from"] == [ranks, ep]
    assert start[0]["world_size"] == LAYOUTS[dst][0]
    # validation covers the same examples on every layout
    val = {r["step"]: r["val_ce"] for r in read_metrics(run, "eval")}
    ref = {r["step"]: r["val_ce"] for r in read_metrics(uninterrupted(src), "eval")}
    assert val[STEPS] == pytest.approx(ref[STEPS], rel=LOSS_RTOL)


def live_entries(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a weight or its AdamW moment) without the entries whose gradient is zero in
    exact arithmetic: a bias added to every key shifts all of a query's scores
    equally, which softmax ignores. Their float gradients are rounding noise
    (moments of ~1e-10), which AdamW scales up to steps of about the learning
    rate, in a direction that depends on the summation order (so on the
    layout); no output depends on them."""
    if name.endswith("k_proj.bias"):
        return t[:0]
    if name.endswith("frequency.qkv.bias"):  # q, k, v thirds: drop k
        third = t.shape[0] // 3
        return torch.cat([t[:third], t[2 * third:]])
    return t


@pytest.mark.slow
@pytest.mark.parametrize(("src", "dst"), CASES, ids=IDS)
def test_adamw_state_after_an_elastic_resume_equals_the_uninterrupted_run(src: str,
                                                                          dst: str) -> None:
    for step in (8, STEPS):
        mine = open_checkpoint(resumed(src, dst) / CHECKPOINTS / tag_for(step))
        ref = open_checkpoint(uninterrupted(src) / CHECKPOINTS / tag_for(step))
        assert (mine.world_size, mine.ep_size) == LAYOUTS[dst][:2]
        assert mine.optimizer_step() == ref.optimizer_step() == step
        assert sorted(mine.parameter_names()) == sorted(ref.parameter_names())
        for name in ref.parameter_names():
            for state in STATES:
                a = live_entries(name, mine.tensor(name, state))
                b = live_entries(name, ref.tensor(name, state))
                assert a.shape == b.shape, (name, state)
                # relative to the tensor's norm: an entry near zero may differ by more
                # than 1e-4 of itself after float rounding
                err = float((a - b).norm() / b.norm().clamp(min=1e-30)) if b.numel() else 0.0
                assert err <= STATE_RTOL, (name, state, step, err)


@pytest.mark.slow
def test_a_checkpoint_written_after_an_elastic_resume_converts_to_the_live_model() -> None:
    from liquid_dist.convert import convert
    from liquid_dist.model import LiquidFoundationModelOptimized

    run = resumed("w2", "w2ep2")
    live = torch.load(run / "live_logits.pt", weights_only=True)
    model = LiquidFoundationModelOptimized.from_pretrained(
        convert(run, tf.TMP / "elastic_converted", progress=False)).eval()
    from live_logits_harness import probe_inputs

    m = model.cfg
    enc, dec, mask = probe_inputs(m.vocab_size, m.max_encoder_length, m.max_decoder_length)
    with torch.no_grad():
        logits = model(enc, dec, encoder_attention_mask=mask).logits
    torch.testing.assert_close(logits, live, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_resume_that_cannot_keep_the_global_batch_is_refused_before_anything_is_built(
        tmp_path: Path) -> None:
    checkpoint_copy(uninterrupted("w2"), tmp_path / "run")
    proc = tf.launch(1, overrides(tmp_path / "run", "w2"), launcher="python")
    assert proc.returncode == EXIT_CONFIG, tf.tail(proc)
    assert ("config key 'train.micro_batch_size' = 2: expected a global batch of 4 "
            "(micro_batch_size 2 x grad_accum 1 x 2 ranks") in proc.stdout
    assert ("on 1 ranks, micro_batch_size x grad_accum = 4: train.micro_batch_size=4 "
            "train.grad_accum=1, train.micro_batch_size=2 train.grad_accum=2, "
            "train.micro_batch_size=1 train.grad_accum=4") in proc.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _config(run_dir: Path, layout: str, *extra: str):
    from liquid_dist.config import load_config
    from liquid_dist.train.prepare import resolve_vocabulary

    return resolve_vocabulary(load_config(str(tf.REPO / "configs/tiny.yaml"),
                                          overrides(run_dir, layout) + list(extra)))


@pytest.mark.slow
def test_resumable_keeps_the_architecture_and_says_how_to_keep_the_global_batch() -> None:
    ref = find_checkpoint(str(uninterrupted("w2")), step=RESUME_AT)
    run = uninterrupted("w2")
    check_resumable(_config(run, "w1"), ref, world_size=1)
    check_resumable(_config(run, "w2", *RUN_SETTINGS, "model.dropout=0.1"), ref, 2)
    with pytest.raises(ConfigError, match=r"'model.ffn_dim' = 48: expected 64, the "
                                          r"architecture of the checkpoint being resumed"):
        check_resumable(_config(run, "w2", "model.ffn_dim=48"), ref, world_size=2)
    with pytest.raises(ConfigError, match=r"4 is not a multiple of 3\); resume on a world "
                                          r"size that divides 4"):
        check_resumable(_config(run, "w2"), ref, world_size=3)
    with pytest.raises(ConfigError, match=r"'parallel.zero_stage' = 2: expected 3"):
        check_resumable(_config(run, "w2", "parallel.zero_stage=2"), ref, world_size=2)
