"""bench/verify.py runs end to end on a small checkpoint-shaped directory."""

from __future__ import annotations

import json
import subprocess
import sys

import train_fixtures as tf


def test_verify_benchmark_smoke_times_the_verification() -> None:
    out = tf.TMP / "verify.json"
    proc = subprocess.run([sys.executable, "bench/verify.py", "--gib", "0.02", "--files", "2",
                           "--repeats", "1", "--output", str(out)], cwd=tf.REPO, env=tf.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(out.read_text())
    warm = result["verify"]["warm"]
    assert result["settings"]["bytes"] == 2 * (int(0.02 * (1 << 30)) // 2)
    assert warm["median_s"] > 0 and warm["s_per_gb"] == warm["median_s"] / (
        result["settings"]["bytes"] / 1e9)
    one, two = result["verify"]["together_1"], result["verify"]["together_2"]
    assert (one["ranks"], two["ranks"], len(two["seconds"])) == (1, 2, 1)
    assert result["verify"]["speedup"] == one["median_s"] / two["median_s"] > 0
