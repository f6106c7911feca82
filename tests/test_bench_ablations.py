"""bench/ablations.py runs end to end in its smoke mode (2 steps, every variant).

On the 600-piece tokenizer and shards of tests/train_fixtures.py. T5 needs the
optional ``transformers``: without it the row must be recorded as skipped.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import train_fixtures as tf

VARIANTS = ["full", "no_frequency", "no_compression", "no_embedding_conv",
            "no_deformable_conv", "no_moe", "no_lstm", "transformer", "t5"]


def test_ablations_smoke_trains_every_variant_on_identical_batches(tmp_path):
    data = tf.train_data()
    assert data.tokenizer.parent.parent == data.shards.parent  # --data finds both
    out = tmp_path / "ablations.json"
    # batch 2: the fixture's validation split holds only 4 documents (one per loader stream)
    proc = subprocess.run([sys.executable, "bench/ablations.py", "--smoke", "--batch-size", "2",
                           "--data", str(data.shards.parent), "--output", str(out)],
                          cwd=tf.REPO, env=tf.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(out.read_text())
    assert result["date"] and result["machine"]["cpus"] and result["machine"]["torch"]
    assert result["settings"]["steps"] == 2 and result["settings"]["smoke"]
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == VARIANTS

    has_transformers = importlib.util.find_spec("transformers") is not None
    if has_transformers:
        assert rows["t5"]["status"] == "ok", rows["t5"]
    else:
        assert rows["t5"]["status"] == "skipped" and "transformers" in rows["t5"]["note"]
        assert result["machine"]["transformers"] is None
    ok = [r for name, r in rows.items() if name != "t5" or has_transformers]
    for r in ok:
        assert r["status"] == "ok", r
        assert r["params"]["total"] > 0 and r["params"]["active_per_token_min"] > 0
        assert r["params"]["active_per_token_min"] <= r["params"]["total"]
        held = r["heldout"]
        assert "error" not in held, held
        figures = [r["time_per_step_s"], r["final_train_ce"], r["val_ce"], held["ce"],
                   held["bits_per_byte"], *r["vs_full"].values(), *r["train_ce_curve"]]
        assert all(isinstance(x, float) and math.isfinite(x) for x in figures), r
        assert r["time_per_step_s"] > 0 and r["val_ce"] > 0 and held["bits_per_byte"] > 0
        assert len(r["train_ce_curve"]) == 2
        # identical batches: as each model consumed them
        assert r["train_batches_sha256"] == rows["full"]["train_batches_sha256"]
        assert r["val_batches_sha256"] == rows["full"]["val_batches_sha256"]
        assert r["val_targets"] == rows["full"]["val_targets"] > 0
        assert (held["tokens"], held["bytes"]) == (rows["full"]["heldout"]["tokens"],
                                                   rows["full"]["heldout"]["bytes"])
    assert rows["full"]["vs_full"]["time_per_step_ratio"] == 1.0
    assert rows["full"]["vs_full"]["val_ce_diff"] == 0.0
    assert rows["transformer"]["params"]["total"] < rows["full"]["params"]["total"]
    assert rows["transformer"]["config"]["ablate"] == [
        "frequency", "compression", "embedding_conv", "deformable_conv", "moe", "lstm"]
    for name in VARIANTS[1:7]:
        assert rows[name]["config"]["ablate"] == [name.removeprefix("no_")]
        assert rows[name]["params"]["total"] < rows["full"]["params"]["total"]
    if has_transformers:  # sized to tiny's total parameter count
        assert abs(rows["t5"]["params"]["total"] / rows["full"]["params"]["total"] - 1) < 0.05
    assert "| variant |" in proc.stdout and all(f"| {n} |" in proc.stdout for n in VARIANTS)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "ablations.png").stat().st_size > 0
