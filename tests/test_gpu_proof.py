"""bench/gpu_proof.py, the one-shot GPU proof, runs end to end in its CPU smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import train_fixtures as tf


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
    for check in ("attention", "moe", "model_step_sync_free", "train", "deterministic"):
        assert result[check]["status"] == "ok", (check, result[check])
    backends = result["attention"]["backends"]
    assert {k for k, r in backends.items() if r["status"] == "ok"} >= {
        "encoder/sdpa", "encoder/blocked", "decoder/sdpa", "decoder/blocked", "cross/sdpa"}
    assert result["moe"]["expert_usage"][result["moe"]["empty_expert"]] == 0.0
    train = result["train"]
    assert train["first_step_rel_diff"] < 1e-4  # the same loss as a plain forward
    assert train["real_tokens_per_s"] > 0 and train["moe_backend"]
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "gpu_proof.log").is_file()
    # on the CPU the switch changes nothing (docs/training.md): the same losses
    assert result["deterministic"]["losses_equal_train"], result["deterministic"]
