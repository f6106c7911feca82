"""bench/memory.py runs end to end in its smoke mode: the real trainer at W = 2 (and the
micro-model run that measures an idle rank), every rank's peaks read, the bound checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import train_fixtures as tf


def _smoke(script: str, name: str):
    """Run ``bench/script --smoke`` on the test data; the path of its results."""
    out = tf.TMP / name
    proc = subprocess.run([sys.executable, f"bench/{script}", "--smoke",
                           "--data", str(tf.train_data().shards.parent), "--output", str(out)],
                          cwd=tf.REPO, env=tf.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return out


@pytest.mark.slow
def test_memory_benchmark_smoke_measures_every_rank() -> None:
    out = _smoke("memory.py", "memory_smoke.json")
    (row,) = json.loads(out.read_text())["rows"]
    assert row["world_size"] == 2 and row["trainer"] == "new" and row["returncode"] == 0
    for key in ("idle_mib", "construction_peak_mib", "steps_peak_mib", "peak_mib", "bound_mib"):
        assert len(row[key]) == 2 and all(v and v > 100 for v in row[key]), (key, row[key])
    # each mark's high-water mark includes the one before
    assert all(c <= s <= p for c, s, p in zip(row["construction_peak_mib"],
                                              row["steps_peak_mib"], row["peak_mib"],
                                              strict=True))
    assert row["ideal_mib"] == pytest.approx(16 * row["parameters"] / 2 / 2**20)
    assert row["within_bound"] is True


@pytest.mark.slow
def test_memory_phases_smoke_keeps_each_phase_peak_of_every_rank() -> None:
    out = _smoke("memory_phases.py", "memory_phases_smoke.json")
    result = json.loads(out.read_text())
    assert result["ranks"] == 2
    names = [p["phase"] for p in result["phases"]]
    assert names[:3] == ["start", "initialize", "after initialize"]
    # two optimizer steps, each a forward, a backward and a step
    assert names[3:] == ["forward", "after forward", "backward", "after backward", "step",
                         "after step"] * 2
    for phase in result["phases"]:
        (low, high), (peak_low, peak_high) = phase["start_mib"], phase["peak_mib"]
        assert 0 < low <= high and low <= peak_low <= peak_high, phase
    # the process's whole peak is the largest phase peak (sampled: within a few MiB)
    assert max(p["peak_mib"][1] for p in result["phases"]) <= max(result["peak_mib"]) + 1
