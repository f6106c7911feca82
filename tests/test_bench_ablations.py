"""bench/ablations.py runs end to end in its smoke mode (2 steps, 2 seeds, every variant).

On the 600-piece tokenizer and shards of tests/train_fixtures.py. T5 needs the
optional ``transformers``: without it the row must be recorded as skipped. The
statistics of the multi-seed protocol are checked on synthetic arms whose paired
difference is known.
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


def test_summary_finds_a_known_paired_difference_and_calls_noise_noise():
    """Synthetic arms: 'worse' is full + 0.30 nats on every seed (small noise), 'same' is
    full ± 0.01; the seeds' own spread is 0.1."""
    summarize = _ablations().summarize
    full = {0: 5.0, 1: 5.1, 2: 4.9}
    noise = {0: 0.004, 1: -0.003, 2: 0.001}

    def row(variant, seed, ce, t=1.0):
        return {"variant": variant, "seed": seed, "status": "ok", "val_ce": ce,
                "bits_per_byte": ce / 2, "time_per_step_s": t}

    rows = [row("full", s, ce) for s, ce in full.items()]
    rows += [row("worse", s, ce + 0.30 + noise[s], t=2.0) for s, ce in full.items()]
    rows += [row("same", s, ce + (0.01 if s % 2 else -0.01)) for s, ce in full.items()]
    rows += [row("better", s, ce - 0.5) for s, ce in full.items() if s < 2]
    rows += [{"variant": "t5", "seed": 0, "status": "skipped", "note": "no transformers"}]
    summary = summarize(rows)
    assert set(summary) == {"full", "worse", "same", "better"}
    assert summary["full"]["val_ce"]["mean"] == pytest.approx(5.0)
    assert summary["full"]["val_ce"]["std"] == pytest.approx(0.1)
    assert "vs_full" not in summary["full"]
    worse = summary["worse"]["vs_full"]
    assert worse["val_ce"]["mean"] == pytest.approx(0.30 + statistics.fmean(noise.values()))
    assert worse["val_ce"]["std"] == pytest.approx(statistics.stdev(noise.values()))
    assert worse["bits_per_byte"]["mean"] == pytest.approx(worse["val_ce"]["mean"] / 2)
    assert worse["spread"] == pytest.approx(0.1) and worse["verdict"] == "worse"
    assert worse["time_ratio"] == pytest.approx(2.0)
    assert summary["same"]["vs_full"]["verdict"] == "within spread"
    better = summary["better"]["vs_full"]  # paired over the seeds both have
    assert better["val_ce"]["n"] == 2 and better["val_ce"]["mean"] == pytest.approx(-0.5)
    assert better["verdict"] == "better"
    one = summarize([row("full", 0, 5.0), row("worse", 0, 5.3)])
    assert one["worse"]["vs_full"]["verdict"] == "one seed"
    assert one["worse"]["vs_full"]["val_ce"]["std"] is None


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
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "ablations.png").stat().st_size > 0
