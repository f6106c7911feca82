"""bench/gpu_proof.py, the one-shot GPU proof, runs end to end in its CPU smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import train_fixtures as tf

COMPONENTS = {"frequency", "embedding_stem_compression", "local_attention", "cross_attention",
              "moe", "gated_conv", "lstm", "rest"}


@pytest.mark.slow
def test_gpu_proof_runs_every_check_in_cpu_smoke_mode(tmp_path):
    data = tf.train_data()
    assert data.tokenizer.parent.parent == data.shards.parent  # --data finds both
    proc = subprocess.run([sys.executable, "bench/gpu_proof.py", "--cpu-smoke", "--out",
                           str(tmp_path), "--data", str(data.shards.parent)],
                          cwd=tf.REPO, env=tf.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads((tmp_path / "gpu_proof.json").read_text())
    for check in ("attention", "moe", "model_step_sync_free", "checkpoint_capture", "train",
                  "profile", "baseline", "deterministic"):
        assert result[check]["status"] == "ok", (check, result[check])
    backends = result["attention"]["backends"]
    assert {k for k, r in backends.items() if r["status"] == "ok"} >= {
        "encoder/sdpa", "encoder/blocked", "decoder/sdpa", "decoder/blocked", "cross/sdpa"}
    assert result["moe"]["expert_usage"][result["moe"]["empty_expert"]] == 0.0
    train = result["train"]
    assert train["first_step_rel_diff"] < 1e-4  # the same loss as a plain forward
    assert train["real_tokens_per_s"] > 0 and train["moe_backend"]
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "gpu_proof.log").is_file()
    # an asynchronous save's capture writes torch.save's file, from copies made before
    # the state changed
    capture = result["checkpoint_capture"]
    assert capture["same_file"] and 0 < capture["blocked_s"] <= capture["copied_s"], capture
    # on the CPU the switch changes nothing (docs/training.md): the same losses
    assert result["deterministic"]["losses_equal_train"], result["deterministic"]

    # the plain transformer of equal total parameters, trained on the same batches
    baseline = result["baseline"]
    assert baseline["figures"].startswith("CPU smoke")
    params = baseline["parameters"]
    assert abs(params["plain"] / params["full"] - 1) < 0.01, params
    assert baseline["same_data_tokens_per_step"] and baseline["steps"] == train["steps"]
    assert baseline["plain"]["first_step_rel_diff"] < 1e-4
    for run in ("full", "plain"):
        assert baseline[run]["real_tokens_per_s"] > 0 and baseline[run]["peak_memory_gb"] > 0
    assert baseline["full_over_plain"]["step_time"] > 0
    assert baseline["full_over_plain"]["real_tokens_per_s"] > 0

    # where the step's time goes: every component, forward and backward, adding up
    profile = result["profile"]
    assert profile["figures"].startswith("CPU smoke")
    rows = profile["components"]
    assert set(rows) == COMPONENTS
    for name, row in rows.items():
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0, (name, row)
        assert row["modules"] >= 1, (name, row)
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
    attributed = sum(r["total_ms"] for r in rows.values())
    assert attributed == pytest.approx(profile["attributed_step_ms"])
    assert abs(attributed / profile["measured_step_ms"] - 1) <= 0.10, profile
    # beside the CPU removal costs of bench/removal_cost.py
    assert profile["cpu_removal_cost"]["source"] == "bench/results/removal_cost.json"
    assert rows["moe"]["cpu_removal_share"] > 0
    assert rows["local_attention"]["cpu_removal_share"] is None
    log = (tmp_path / "gpu_proof.log").read_text()
    assert "== profile" in log and "== baseline" in log and "CPU removal cost" in log
