"""convert -> from_pretrained -> train.init_from -> convert is lossless; a mismatched init_from
is refused before any process starts."""

from __future__ import annotations

import pytest
import torch
import train_fixtures as tf
from test_convert import converted, weights

from liquid_dist.convert import convert
from liquid_dist.model import LiquidFoundationModelOptimized


@pytest.mark.slow
def test_convert_init_from_convert_round_trip_is_lossless() -> None:
    first = converted()
    model = LiquidFoundationModelOptimized.from_pretrained(first)
    run_dir = tf.TMP / "init_from_converted"
    # the one step's loss is made non-finite, so its update is skipped: the checkpoint
    # holds the weights exactly as loaded (8 trained steps away from the seed's init)
    proc = tf.launch(2, tf.base_overrides(run_dir, steps=1) + [f"train.init_from={first}"],
                     launcher="torchrun", extra_env={"LIQUID_TEST_NAN_STEPS": "1"})
    assert proc.returncode == 0, tf.tail(proc)
    assert "update skipped" in proc.stdout
    second = weights(convert(run_dir, tf.TMP / "reconverted", progress=False))
    original = weights(first)
    assert second.keys() == original.keys()
    for name, t in original.items():
        assert torch.equal(second[name], t), name
        assert torch.equal(model.state_dict()[name], t), name


@pytest.mark.slow
def test_init_from_a_converted_model_with_another_architecture_is_a_config_error() -> None:
    proc = tf.launch(1, tf.base_overrides(tf.TMP / "init_from_bad", steps=1)
                     + [f"train.init_from={converted()}", "model.ffn_dim=48"],
                     launcher="python")
    assert proc.returncode == 2, tf.tail(proc)
    assert "model.ffn_dim" in proc.stdout and "converted model" in proc.stdout
