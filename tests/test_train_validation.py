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
