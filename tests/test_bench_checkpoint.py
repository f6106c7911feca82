"""bench/checkpoint.py runs end to end in its smoke mode: the real trainer at W = 2, a
synchronous and an asynchronous save after every step, each save's blocked and total time
read from the metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import train_fixtures as tf


@pytest.mark.slow
def test_checkpoint_benchmark_smoke_times_every_save_in_both_modes() -> None:
    data = tf.train_data()
    out = tf.TMP / "checkpoint_smoke.json"
    proc = subprocess.run([sys.executable, "bench/checkpoint.py", "--smoke", "--steps", "3",
                           "--data", str(data.shards.parent), "--output", str(out)],
                          cwd=tf.REPO, env=tf.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["rows"]] == ["sync", "async"]
    for row in result["rows"]:
        assert [s["step"] for s in row["saves"]] == [1, 2, 3], row
        assert all(0 < s["blocked_s"] <= s["total_s"] for s in row["saves"]), row
        assert len(row["peak_mib"]) == 2 and all(v > 100 for v in row["peak_mib"])
    sync, asyn = result["rows"]
    assert all(s["blocked_s"] == s["total_s"] for s in sync["saves"])
    assert sync["checkpoint_bytes"] == asyn["checkpoint_bytes"] > 0
    assert result["blocked_ratio_async_to_sync"] > 0
