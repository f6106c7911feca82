"""ZeRO-3 over 2 gloo processes trains exactly like 1 process on the same global batch."""

from __future__ import annotations

import pytest
import train_fixtures as tf
from train_union_harness import mask_targets

from liquid_dist.config import load_config
from liquid_dist.data import build_train_loader
from liquid_dist.train.metrics import read_metrics

# Observed: bitwise equal losses on CPU (fp32, same reduction order). The bound
# leaves room for a different summation order in another torch/DeepSpeed version.
RTOL = 1e-5


@pytest.mark.slow
def test_zero3_two_ranks_match_one_rank_on_the_same_global_batch() -> None:
    ref = tf.reference_run()  # 2 ranks x micro-batch 2, grad_accum 1, torchrun
    one = tf.union_run()  # 1 process x micro-batch 2, grad_accum 2, the same samples
    two, single = tf.train_losses(ref), tf.train_losses(one)
    assert sorted(two) == sorted(single) == list(range(1, 9))
    assert two[8] < two[1], "the loss should fall over 8 steps"
    for step in two:
        assert single[step] == pytest.approx(two[step], rel=RTOL), step


@pytest.mark.slow
def test_metrics_stream_has_losses_throughput_experts_and_block_monitors() -> None:
    ref = tf.reference_run()
    train = read_metrics(ref, "train")
    r = train[-1]
    for key in ("step", "loss", "ce", "recon_encoder", "recon_decoder", "moe_entropy",
                "moe_overuse", "lr", "grad_norm", "real_tokens_per_s", "target_tokens_per_s",
                "positions_per_s", "padding_fraction", "tflops_per_s_positions",
                "tflops_per_s_real_tokens", "mfu_positions", "mfu_real_tokens", "memory_gb"):
        assert key in r, key
    assert r["real_tokens_per_s"] > r["target_tokens_per_s"] > 0
    assert r["memory_gb"] > 0 and r["grad_norm"] > 0
    # full batches: real tokens are every position, so both throughputs agree
    assert r["padding_fraction"] == 0.0
    assert r["real_tokens_per_s"] == pytest.approx(r["positions_per_s"])
    for block in ("encoder.blocks.0", "decoder.blocks.0"):
        usage = [r[f"expert_usage/{block}/e{e}"] for e in range(2)]
        assert all(0 <= u <= 1 for u in usage) and sum(usage) > 0
    monitors = read_metrics(ref, "monitor")
    assert [m["step"] for m in monitors] == [4, 8]
    one = {m["step"]: m for m in read_metrics(tf.union_run(), "monitor")}
    for m in monitors:
        for block in ("encoder.blocks.0", "decoder.blocks.0"):
            assert m[f"act_rms/{block}"] > 0 and m[f"grad_norm/{block}"] > 0
            assert not any(k.startswith("nonfinite") for k in m)
            # ZeRO-3 slices summed over 2 ranks == the whole gradient of 1 process
            assert m[f"grad_norm/{block}"] == pytest.approx(
                one[m["step"]][f"grad_norm/{block}"], rel=1e-4)
            assert m[f"act_rms/{block}"] == pytest.approx(
                one[m["step"]][f"act_rms/{block}"], rel=1e-4)
    assert [e["step"] for e in read_metrics(ref, "eval")] == [8]


NO_AUX = ["model.recon_loss_weight=0", "model.moe.entropy_loss_weight=0",
          "model.moe.overuse_loss_weight=0"]


@pytest.mark.slow
def test_token_weighted_loss_of_ranks_with_unequal_targets_equals_one_batch_of_their_union():
    """The CE is the sum over every real target of the step / their number: 2 ranks whose
    batches hold different numbers of targets train like 1 process on one batch that
    stacks both. A step's micro-batches share one objective and are full, so the
    harness's ``--mask-targets`` makes the numbers differ: each row's last few labels
    (a number hashed from the row's tokens) become padding, on both sides alike.

    Why this can fail: were the loss a mean of per-batch means, the 2-rank side would
    average rank 0's mean CE (over n0 targets) and rank 1's (over n1), while the stacked
    batch is one mean over n0 + n1 targets; with n0 != n1 (asserted below) and the
    ranks' mean CEs differing, (m0 + m1) / 2 != (n0 m0 + n1 m1) / (n0 + n1), and the
    losses and gradients, hence every later step, differ far beyond RTOL. The auxiliary
    terms are means per batch, not per token, so they are switched off here."""
    overrides = tf.base_overrides(tf.TMP / "unused") + NO_AUX
    data = load_config("configs/tiny.yaml", overrides).data
    loaders = [build_train_loader(data, rank=r, world_size=2, batch_size=2, seed=7)
               for r in range(2)]
    targets = [[int((mask_targets(b)["labels"] != -100).sum())
                for b, _ in zip(ld, range(8), strict=False)] for ld in loaders]
    assert sum(a != b for a, b in zip(*targets, strict=True)) >= 2, targets
    harness = "tests/train_union_harness.py"
    two_dir, one_dir = tf.TMP / "token_weighted_two", tf.TMP / "token_weighted_union"
    two = tf.launch(2, tf.base_overrides(two_dir) + NO_AUX, launcher="torchrun",
                    script=harness, script_args=["--ranks", "2", "--mask-targets"])
    assert two.returncode == 0, tf.tail(two)
    one = tf.launch(1, tf.base_overrides(one_dir) + NO_AUX + ["train.micro_batch_size=4"],
                    launcher="python", script=harness,
                    script_args=["--ranks", "2", "--concat", "--mask-targets"])
    assert one.returncode == 0, tf.tail(one)
    a = {r["step"]: r for r in read_metrics(two_dir, "train")}
    b = {r["step"]: r for r in read_metrics(one_dir, "train")}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        for key in ("loss", "ce"):
            assert b[step][key] == pytest.approx(a[step][key], rel=RTOL), (step, key)
        # gradient norms are more sensitive to round-off than losses: the stacked batch
        # groups the experts' rows differently
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-3), step
        assert b[step]["target_tokens_per_s"] > 0
        # the same rows, masked alike: the same padding on both sides, and some of it
        assert b[step]["padding_fraction"] == pytest.approx(a[step]["padding_fraction"])
    assert max(r["padding_fraction"] for r in a.values()) > 0.02
