"""The data section's checks in liquid_dist.config.validate."""

from __future__ import annotations

import pytest

from liquid_dist.config import ConfigError, config_from_dict


def _cfg(**data: object):
    return config_from_dict({"data": data})


def test_defaults_and_new_keys_are_accepted():
    cfg = _cfg(batches_per_epoch=10, worker_timeout_s=30.0,
               sources=[{"name": "web", "shards": "pipe:cat a.tar", "weight": 2,
                         "manifest": "m/manifest.json"}])
    assert cfg.data.batches_per_epoch == 10 and cfg.data.sources[0]["manifest"]


@pytest.mark.parametrize("data, key", [
    ({"batches_per_epoch": -1}, "data.batches_per_epoch"),
    ({"worker_timeout_s": 0}, "data.worker_timeout_s"),
    ({"objective": "mixture", "encoder_length": 2}, "data.encoder_length"),
    ({"sources": [{"shards": "x", "url": "y"}]}, "data.sources[0]"),
    ({"bad_sample_policy": "ignore"}, "data.bad_sample_policy"),
])
def test_impossible_data_settings_name_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        _cfg(**data)
    assert info.value.key == key


def test_prefix_lm_needs_no_room_for_sentinels():
    assert _cfg(objective="prefix_lm", decoder_length=2).data.decoder_length == 2
