"""bench/removal_cost.py runs end to end in its smoke mode: full and the six removals."""

from __future__ import annotations

import json
import subprocess
import sys

import train_fixtures as tf

from liquid_dist.config import ABLATIONS


def test_removal_cost_smoke_times_full_and_every_removal() -> None:
    out = tf.TMP / "removal_cost.json"
    proc = subprocess.run([sys.executable, "bench/removal_cost.py", "--smoke", "--output",
                           str(out)], cwd=tf.REPO, env=tf.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"full", *(f"no_{name}" for name in ABLATIONS)}
    assert rows["full"]["share_of_full_step"] == 0.0
    assert all(r["step_s"] > 0 for r in rows.values())
