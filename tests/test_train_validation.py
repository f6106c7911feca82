"""Validation during training: the eval record, per validation source (data.val_sources)."""

from __future__ import annotations

import math

import pytest
import train_fixtures as tf

from liquid_dist.train.metrics import read_metrics, wandb_fields


@pytest.mark.slow
def test_each_validation_source_is_scored_on_its_own_in_the_eval_record() -> None:
    shards = tf.train_data().shards
    run = tf.TMP / "val_sources"
    # 'all' reads the same validation shards as data.val_shards; 'train' another split
    proc = tf.launch(1, tf.base_overrides(run, steps=2) + [
        "train.eval_every=1", f"data.val_sources={{all: {shards}, train: {shards}/task-00000/"
                              "train-000000.tar}"], launcher="python")
    assert proc.returncode == 0, tf.tail(proc)
    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [1, 2]
    for e in evals:
        assert sorted(e["sources"]) == ["all", "train"]
        same = e["sources"]["all"]
        assert (same["val_ce"], same["bits_per_byte"]) == (e["val_ce"], e["bits_per_byte"])
        assert e["sources"]["train"]["val_ce"] != e["val_ce"]
        # nats per target token over bits per byte: ln 2 x bytes per target, a few bytes
        assert 1 < e["val_ce"] / e["bits_per_byte"] / math.log(2) < 8
        assert wandb_fields(e)["eval/sources/train/val_ce"] == e["sources"]["train"]["val_ce"]
    assert "eval step 2: val ce" in proc.stdout and "; all " in proc.stdout


@pytest.mark.slow
def test_the_run_draws_the_tokens_its_token_plan_counts() -> None:
    """One objective: the plan is exact in total, and each source's tokens are its share of
    the examples within two examples."""
    shards = tf.train_data().shards
    run = tf.TMP / "token_plan"
    proc = tf.launch(1, tf.base_overrides(run, steps=6) + [
        "data.objective=prefix_lm", "data.val_shards=null",
        f"data.sources=[{{name: web, shards: {shards}, weight: 3}}, "
        f"{{name: code, shards: {shards}}}]"], launcher="python")
    assert proc.returncode == 0, tf.tail(proc)
    (start,) = [e for e in read_metrics(run, "event") if e["event"] == "start"]
    planned = {s["name"]: s["planned_tokens"] for s in start["token_plan"]["sources"]}
    last = read_metrics(run, "train")[-1]
    drawn = {name: last.get(f"data_tokens/{name}", 0) for name in planned}
    assert sum(drawn.values()) == sum(planned.values())
    raw = sum(planned.values()) // (6 * 2)  # steps x global batch (1 rank x micro-batch 2)
    for name in planned:
        assert abs(drawn[name] - planned[name]) < 2 * raw, (name, drawn, planned)
    assert "token plan for 6 steps" in proc.stdout and "web: 0.750" in proc.stdout


@pytest.mark.slow
def test_a_stage_appended_on_resume_continues_as_if_it_had_been_there_from_the_start() -> None:
    """Stop at step 4 of a one-stage run; resume with an annealing stage from step 6: the
    same optimizer, schedule and data positions go on, the resume event says what
    changed, and every step equals a run that had the second stage from the start."""
    shards = tf.train_data().shards
    sources = (f"data.sources=[{{name: web, shards: {shards}}}, "
               f"{{name: book, shards: {shards}}}]")
    one = "data.stages=[{start_step: 0, weights: {web: 3, book: 1}}]"
    two = ("data.stages=[{start_step: 0, weights: {web: 3, book: 1}}, "
           "{start_step: 6, weights: {book: 1}}]")

    def run(name: str, stages: str, **env: str):
        proc = tf.launch(1, tf.base_overrides(tf.TMP / name) + [sources, stages],
                         launcher="python", extra_env=env)
        return tf.TMP / name, proc

    reference, proc = run("staged", two)
    assert proc.returncode == 0, tf.tail(proc)
    changed, proc = run("restaged", one, LIQUID_TEST_STOP_AT_STEP="4")
    assert sorted(tf.train_losses(changed)) == [1, 2, 3, 4], tf.tail(proc)
    changed, proc = run("restaged", two)
    assert proc.returncode == 0, tf.tail(proc)
    assert "mixture changed from step 6: {'web': 0.75, 'book': 0.25} -> {'book': 1.0}" \
        in proc.stdout
    (resume,) = [e for e in read_metrics(changed, "event") if e["event"] == "resume"]
    assert resume["mixture_changes"] == [
        "from step 6: {'web': 0.75, 'book': 0.25} -> {'book': 1.0}"]
    assert tf.train_losses(changed) == tf.train_losses(reference)  # bitwise, steps 1-8
    last = {r["step"]: r for r in read_metrics(changed, "train")}
    assert last[8]["data_tokens/web"] == last[6]["data_tokens/web"] > 0  # annealed: book only
