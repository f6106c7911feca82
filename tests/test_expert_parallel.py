"""Expert parallelism (ep 2) under ZeRO-3 over 2 gloo ranks trains exactly like 1 process.

The reference is one process fed both ranks' batches (tests/train_union_harness.py,
grad_accum 2), i.e. the same global batch, with all 4 experts. Dynamic k, both
auxiliary losses (weights 0.1) and gradient clipping (0.05, below every step's
norm, so every step clips) are on.
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
)
from liquid_dist.train.metrics import read_metrics

STEPS = 20
GRAD_CLIP = 0.05
# Observed: |difference| <= 5e-7 (fp32; the experts' gradient sums run in another order)
LOSS_ATOL = 1e-5
MOE = ["model.moe.num_experts=4", "model.moe.k_max=2", "model.moe.top_k=1",
       "model.moe.dynamic_k=true", "model.moe.entropy_loss_weight=0.1",
       "model.moe.overuse_loss_weight=0.1", f"train.grad_clip={GRAD_CLIP}"]


EXPERT_TENSORS = (".moe.w1", ".moe.b1", ".moe.w2", ".moe.b2")


def consolidated(ref) -> dict[str, torch.Tensor]:
    return open_checkpoint(ref.path).state_dict()


def _overrides(run_dir: Path) -> list[str]:
    return tf.base_overrides(run_dir, steps=STEPS) + MOE + ["train.ckpt_every=10"]


@functools.cache
def ep_run() -> Path:
    run_dir = tf.TMP / "ep2"
    proc = tf.launch(2, _overrides(run_dir) + ["parallel.ep_size=2"], launcher="torchrun")
    assert proc.returncode == 0, tf.tail(proc)
    return run_dir


@functools.cache
def reference_run() -> Path:
    run_dir = tf.TMP / "ep_reference"
    proc = tf.launch(1, _overrides(run_dir) + ["train.grad_accum=2"], launcher="python",
                     script="tests/train_union_harness.py", script_args=["--ranks", "2"])
    assert proc.returncode == 0, tf.tail(proc)
    return run_dir


@pytest.mark.slow
def test_ep2_zero3_matches_one_process_losses_grad_norms_and_aux_losses() -> None:
    ep = {r["step"]: r for r in read_metrics(ep_run(), "train")}
    ref = {r["step"]: r for r in read_metrics(reference_run(), "train")}
    assert sorted(ep) == sorted(ref) == list(range(1, STEPS + 1))
    assert ep[STEPS]["loss"] < ep[1]["loss"]
    for step in ep:
        assert ep[step]["loss"] == pytest.approx(ref[step]["loss"], abs=LOSS_ATOL), step
        for key in ("moe_entropy", "moe_overuse"):
            assert ep[step][key] == pytest.approx(ref[step][key], abs=LOSS_ATOL), (step, key)
        # the joint norm (dense + experts) that clipping uses and the log reports
        assert ep[step]["grad_norm"] > GRAD_CLIP
        assert ep[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step
    usage = [ep[STEPS][f"expert_usage/encoder.blocks.0/e{e}"] for e in range(4)]
    assert sum(usage) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_trained_experts_and_consolidated_weights_equal_the_reference() -> None:
    ckpt = open_checkpoint(ep_run() / CHECKPOINTS / "step_00000020")
    assert (ckpt.world_size, ckpt.ep_size) == (2, 2)
    # every expert by its global index: rank 0's experts 0-1, rank 1's 2-3, stacked
    merged = ckpt.state_dict()
    experts = {n: t for n, t in merged.items() if n.endswith(EXPERT_TENSORS)}
    ref = consolidated(find_checkpoint(str(reference_run())))
    assert len(experts) == 8  # w1 b1 w2 b2 of the encoder's and the decoder's MoE layer
    for name, full in experts.items():
        assert full.shape == ref[name].shape and full.shape[0] == 4, name
        torch.testing.assert_close(full, ref[name], rtol=0, atol=1e-5)
    # the whole model, consolidated from the expert-parallel ZeRO-3 files (Adam turns
    # float-rounding differences of tiny gradients into lr-sized ones: looser bound)
    assert merged.keys() == ref.keys()
    for name, t in merged.items():
        torch.testing.assert_close(t, ref[name], rtol=0, atol=2e-4, msg=name)
    start = consolidated(find_checkpoint(str(reference_run()), step=10))
    moved = max((experts[n] - start[n]).abs().max().item() for n in experts)
    assert moved > 1e-4, "the experts should have trained between steps 10 and 20"


@pytest.mark.slow
def test_save_resume_with_the_same_ep_size_is_bitwise() -> None:
    run = tf.TMP / "ep2_resume"
    shutil.copytree(ep_run() / CHECKPOINTS / "step_00000010", run / CHECKPOINTS / "step_00000010")
    (run / CHECKPOINTS / LATEST).write_text("step_00000010\n")
    proc = tf.launch(2, _overrides(run) + ["parallel.ep_size=2"], launcher="torchrun")
    assert proc.returncode == 0, tf.tail(proc)
    assert "resume at step 10" in proc.stdout
    resumed, full = tf.train_losses(run), tf.train_losses(ep_run())
    assert sorted(resumed) == list(range(11, STEPS + 1))
    for step in resumed:
        assert resumed[step] == full[step], step
    mine = open_checkpoint(run / CHECKPOINTS / "step_00000020")
    full_run = open_checkpoint(ep_run() / CHECKPOINTS / "step_00000020")
    for name in full_run.parameter_names():
        for state in STATES:
            assert torch.equal(mine.tensor(name, state), full_run.tensor(name, state)), name
