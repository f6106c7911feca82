"""Batches are full: real tokens fill the positions of every shipped config and objective."""

from __future__ import annotations

import pytest
from data_fixtures import data_config

from liquid_dist.config import load_config
from liquid_dist.data import build_train_loader

pytestmark = pytest.mark.timeout(120)

# the floors an objective must clear on both sides (encoder, decoder)
FLOORS = {"span_corruption": 0.95, "prefix_lm": 0.90, "mixture": 0.90}


@pytest.mark.parametrize("objective", sorted(FLOORS))
@pytest.mark.parametrize("config", ["tiny", "small", "base-moe"])
def test_real_tokens_fill_the_batches_of_every_shipped_config(config, objective):
    shipped = load_config(f"configs/{config}.yaml").data
    cfg = data_config(objective=objective, encoder_length=shipped.encoder_length,
                      decoder_length=shipped.decoder_length,
                      noise_density=shipped.noise_density,
                      mean_noise_span_length=shipped.mean_noise_span_length,
                      objective_weights=shipped.objective_weights, batches_per_epoch=8)
    loader = build_train_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    real = {"encoder": 0, "decoder": 0}
    slots = {"encoder": 0, "decoder": 0}
    for batch in loader:
        real["encoder"] += int(batch["encoder_attention_mask"].sum())
        slots["encoder"] += batch["encoder_attention_mask"].numel()
        real["decoder"] += int((batch["labels"] != -100).sum())
        slots["decoder"] += batch["labels"].numel()
    fill = {side: real[side] / slots[side] for side in real}
    assert min(fill.values()) >= FLOORS[objective], fill
    stats = loader.stats()
    assert (stats["encoder_fill"], stats["decoder_fill"]) == (fill["encoder"], fill["decoder"])
