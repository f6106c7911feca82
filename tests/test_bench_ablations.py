"""bench/ablations.py runs end to end in its smoke mode (2 steps, 2 seeds, every variant).

On the 600-piece tokenizer and shards of tests/train_fixtures.py. T5 needs the
optional ``transformers``: without it the row must be recorded as skipped. The
paired t-test of the multi-seed protocol is checked on synthetic arms whose
verdict is known, its t quantiles against the table.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys

import pytest
import train_fixtures as tf

VARIANTS = ["full", "no_frequency", "no_compression", "no_embedding_conv",
            "no_deformable_conv", "no_moe", "no_lstm", "transformer", "transformer_params",
            "transformer_time", "t5"]
HEADLINE = ["full", "transformer_params", "transformer_time", "t5"]


def _ablations():
    spec = importlib.util.spec_from_file_location("bench_ablations",
                                                  tf.REPO / "bench" / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_t_critical_matches_the_student_t_table():
    """Two-sided critical values of Student's t (any statistics table) to 4 digits."""
    t_critical = _ablations().t_critical
    table = {(0.95, 1): 12.706, (0.95, 2): 4.303, (0.95, 4): 2.776, (0.95, 30): 2.042,
             (0.99, 10): 3.169, (0.90, 5): 2.015, (0.95, 101): 1.984}
    for (level, df), value in table.items():
        assert t_critical(level, df) == pytest.approx(value, abs=5e-4), (level, df)
    with pytest.raises(ValueError, match="df=0"):
        t_critical(0.95, 0)


def test_verdict_is_a_paired_t_test_over_the_seeds():
    """Synthetic arms against full (whose seeds spread by 0.1): 'small_gain' is full − 0.02
    on every seed within ±0.001, 'worse' full + 0.30 within ±0.004, 'erratic' a large mean
    gain (−0.42) whose third seed goes the other way, 'better' two seeds only."""
    ab = _ablations()
    full = {0: 5.0, 1: 5.1, 2: 4.9}
    small_gain = {0: -0.019, 1: -0.021, 2: -0.020}
    worse = {0: 0.304, 1: 0.297, 2: 0.301}
    erratic = {0: -0.70, 1: -0.60, 2: 0.05}

    def row(variant, seed, ce, t=1.0):
        return {"variant": variant, "seed": seed, "status": "ok", "val_ce": ce,
                "bits_per_byte": ce / 2, "time_per_step_s": t}

    rows = [row("full", s, ce) for s, ce in full.items()]
    for name, diffs in (("small_gain", small_gain), ("worse", worse), ("erratic", erratic)):
        rows += [row(name, s, full[s] + d, t=2.0 if name == "worse" else 1.0)
                 for s, d in diffs.items()]
    rows += [row("better", s, full[s] + d) for s, d in ((0, -0.50), (1, -0.48))]
    rows += [{"variant": "t5", "seed": 0, "status": "skipped", "note": "no transformers"}]
    summary = ab.summarize(rows)
    assert set(summary) == {"full", "small_gain", "worse", "erratic", "better"}
    assert summary["full"]["val_ce"]["mean"] == pytest.approx(5.0)
    assert summary["full"]["val_ce"]["std"] == pytest.approx(0.1)
    assert "vs_full" not in summary["full"]

    def expected_interval(diffs, t):
        half = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
        return [statistics.fmean(diffs) - half, statistics.fmean(diffs) + half]

    # consistent, far smaller than full's own seed-to-seed spread: still a real gain
    gain = summary["small_gain"]["vs_full"]
    assert gain["val_ce"]["diffs"] == pytest.approx(list(small_gain.values()))
    assert gain["val_ce"]["mean"] == pytest.approx(-0.020)
    assert gain["val_ce"]["interval"] == pytest.approx(
        expected_interval(list(small_gain.values()), 4.3027), abs=1e-5)
    assert gain["val_ce"]["interval"][1] < 0 and gain["verdict"] == "better"
    w = summary["worse"]["vs_full"]
    assert w["val_ce"]["mean"] == pytest.approx(statistics.fmean(worse.values()))
    assert w["val_ce"]["std"] == pytest.approx(statistics.stdev(worse.values()))
    assert w["bits_per_byte"]["interval"] == pytest.approx(
        [x / 2 for x in w["val_ce"]["interval"]])
    assert w["verdict"] == "worse" and w["time_ratio"] == pytest.approx(2.0)
    # a large mean that one seed contradicts: mean −0.42, std 0.41, the interval holds 0
    e = summary["erratic"]["vs_full"]
    assert abs(e["val_ce"]["mean"]) > e["val_ce"]["std"]
    assert e["val_ce"]["interval"][0] < 0 < e["val_ce"]["interval"][1]
    assert e["verdict"] == "no difference"
    b = summary["better"]["vs_full"]  # paired over the seeds both have: t with 1 df
    assert b["seeds"] == [0, 1] and b["val_ce"]["n"] == 2
    assert b["val_ce"]["interval"] == pytest.approx(
        expected_interval([-0.50, -0.48], 12.706), abs=1e-4)
    assert b["verdict"] == "better"
    one = ab.summarize([row("full", 0, 5.0), row("worse", 0, 5.3)])
    assert one["worse"]["vs_full"]["verdict"] == "one seed"
    assert one["worse"]["vs_full"]["val_ce"]["std"] is None
    assert one["worse"]["vs_full"]["val_ce"]["interval"] is None


def test_ablations_smoke_trains_every_variant_on_identical_batches(tmp_path):
    data = tf.train_data()
    assert data.tokenizer.parent.parent == data.shards.parent  # --data finds both
    out = tmp_path / "ablations.json"
    # batch 2: the fixture's validation split holds only 4 documents (one per loader stream)
    proc = subprocess.run([sys.executable, "bench/ablations.py", "--smoke", "--batch-size", "2",
                           "--removal-seeds", "1", "--data", str(data.shards.parent),
                           "--output", str(out)],
                          cwd=tf.REPO, env=tf.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(out.read_text())
    assert result["date"] and result["machine"]["cpus"] and result["machine"]["torch"]
    settings = result["settings"]
    assert settings["steps"] == 2 and settings["smoke"] and settings["seeds"] == [0, 1]
    assert settings["removal_seeds"] == [0] and settings["eval_steps"] == [1, 2]
    has_transformers = importlib.util.find_spec("transformers") is not None
    runs = {(r["variant"], r["seed"]): r for r in result["variants"]}
    expected = {(v, 0) for v in VARIANTS} | {(v, 1) for v in HEADLINE}
    assert set(runs) == expected
    for key, r in runs.items():
        if key[0] == "t5" and not has_transformers:
            assert r["status"] == "skipped" and "transformers" in r["note"]
            continue
        assert r["status"] == "ok", r
        assert r["params"]["total"] > 0 and r["params"]["active_per_token_min"] > 0
        assert r["params"]["active_per_token_min"] <= r["params"]["total"]
        assert "error" not in r["heldout"], r["heldout"]
        assert [p["step"] for p in r["curve"]] == [1, 2]
        figures = [r["time_per_step_s"], r["final_train_ce"], r["val_ce"], r["bits_per_byte"],
                   *r["train_ce_curve"], *(p["val_ce"] for p in r["curve"])]
        assert all(isinstance(x, float) and math.isfinite(x) for x in figures), r
        assert r["val_ce"] == r["curve"][-1]["val_ce"] > 0
        same_seed = runs[("full", key[1])]
        # identical batches within a seed, as each model consumed them; another seed's differ
        assert r["train_batches_sha256"] == same_seed["train_batches_sha256"]
        assert r["val_batches_sha256"] == runs[("full", 0)]["val_batches_sha256"]
        assert (r["heldout"]["tokens"], r["heldout"]["bytes"]) == (
            runs[("full", 0)]["heldout"]["tokens"], runs[("full", 0)]["heldout"]["bytes"])
        moe = key[0] not in ("no_moe", "t5") and not key[0].startswith("transformer")
        assert (1.0 <= r["mean_k"] <= 2.0) if moe else not r["mean_k"], key  # tiny: k_max 2
    assert runs[("full", 0)]["train_batches_sha256"] != runs[("full", 1)]["train_batches_sha256"]
    full_total = runs[("full", 0)]["params"]["total"]
    assert runs[("transformer", 0)]["params"]["total"] < full_total
    assert abs(runs[("transformer_params", 0)]["params"]["total"] / full_total - 1) < 0.01
    assert runs[("transformer_time", 0)]["params"]["total"] > runs[("transformer", 0)][
        "params"]["total"]
    for v in ("transformer", "transformer_params", "transformer_time"):
        assert runs[(v, 0)]["config"]["ablate"] == [
            "frequency", "compression", "embedding_conv", "deformable_conv", "moe", "lstm"]
    for name in VARIANTS[1:7]:
        assert runs[(name, 0)]["config"]["ablate"] == [name.removeprefix("no_")]
        assert runs[(name, 0)]["params"]["total"] < full_total
    if has_transformers:  # sized to tiny's total parameter count
        assert abs(runs[("t5", 0)]["params"]["total"] / full_total - 1) < 0.05
    summary = result["summary"]
    assert summary["full"]["seeds"] == [0, 1] and summary["no_lstm"]["seeds"] == [0]
    assert summary["transformer_params"]["vs_full"]["val_ce"]["n"] == 2
    assert summary["transformer_params"]["vs_full"]["verdict"] in (
        "better", "worse", "no difference")
    assert summary["no_lstm"]["vs_full"]["verdict"] == "one seed"
    assert "| variant |" in proc.stdout and all(f"| {n} |" in proc.stdout for n in VARIANTS)

    # --merge: the same protocol split over two processes (here: by seed) gives one summary
    parts = []
    for seed in (0, 1):
        part = dict(result, variants=[r for r in result["variants"] if r["seed"] == seed],
                    settings=dict(settings, seeds=[seed]))
        parts.append(tmp_path / f"seed{seed}.json")
        parts[-1].write_text(json.dumps(part))
    merged_path = tmp_path / "merged.json"
    assert _ablations().main(["--merge", *map(str, parts), "--output", str(merged_path),
                              "--no-plot"]) == 0
    merged = json.loads(merged_path.read_text())
    assert merged["summary"] == summary and merged["settings"]["seeds"] == [0, 1]
    assert len(merged["variants"]) == len(result["variants"])
    with pytest.raises(SystemExit, match="twice"):
        _ablations().main(["--merge", str(parts[0]), str(parts[0]), "--output",
                           str(merged_path), "--no-plot"])
    # --resummarize: the summary re-derived from the stored runs alone, nothing else changed
    again = tmp_path / "again.json"
    assert _ablations().main(["--resummarize", str(out), "--output", str(again)]) == 0
    again_result = json.loads(again.read_text())
    assert again_result.pop("summarized")
    assert again_result == result
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "ablations.png").stat().st_size > 0
