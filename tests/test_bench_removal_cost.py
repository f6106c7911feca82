"""bench/removal_cost.py runs end to end in its smoke mode: full and the six removals,
timed in one process over repeats, each repeat's ratios against that repeat's full."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import train_fixtures as tf

from liquid_dist.config import ABLATIONS


def test_removal_cost_smoke_reports_each_removal_with_its_spread_over_repeats() -> None:
    out = tf.TMP / "removal_cost.json"
    proc = subprocess.run([sys.executable, "bench/removal_cost.py", "--smoke", "--output",
                           str(out)], cwd=tf.REPO, env=tf.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(out.read_text())
    assert result["date"] and result["machine"]["cpus"] and result["settings"]["repeats"] == 2
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"full", *(f"no_{name}" for name in ABLATIONS)}
    assert rows["full"]["ratio_to_full"]["by_repeat"] == [1.0, 1.0]
    assert rows["full"]["share_of_full_step"]["std"] == 0.0
    full_steps = rows["full"]["step_s"]["by_repeat"]
    for r in rows.values():
        steps, ratio, share = r["step_s"], r["ratio_to_full"], r["share_of_full_step"]
        assert len(steps["by_repeat"]) == 2 and all(s > 0 for s in steps["by_repeat"])
        # each repeat's ratio is against the full model of the same repeat
        assert ratio["by_repeat"] == pytest.approx(
            [s / f for s, f in zip(steps["by_repeat"], full_steps, strict=True)])
        assert share["by_repeat"] == pytest.approx([1 - x for x in ratio["by_repeat"]])
        for d in (steps, ratio, share):
            xs = d["by_repeat"]
            assert d["min"] == min(xs) <= d["median"] <= d["max"] == max(xs)
            assert d["median"] == pytest.approx(statistics.median(xs))
            assert d["std"] == pytest.approx(statistics.stdev(xs))
