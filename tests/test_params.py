"""The parameter-count utility agrees with the model it describes."""

import dataclasses
from pathlib import Path

from liquid_dist.config import load_config
from liquid_dist.model import LiquidFoundationModelOptimized, MoELayer
from liquid_dist.params import count_parameters, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_counts_match_the_model_and_bound_active_parameters():
    cfg = dataclasses.replace(load_config(CONFIGS / "tiny.yaml").model, vocab_size=1000)
    model = LiquidFoundationModelOptimized(cfg)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for m in model.modules() if isinstance(m, MoELayer)
                  for p in m.expert_parameters())
    assert counts["experts"] == experts > 0
    assert counts["dense"] + counts["experts"] == counts["total"]
    # one token uses top_k (1) to k_max (2) of 4 experts
    assert counts["active_per_token_min"] == counts["dense"] + experts // 4
    assert counts["active_per_token_max"] == counts["dense"] + experts // 2


def test_cli_prints_the_total_of_base_moe(capsys):
    main([str(CONFIGS / "base-moe.yaml"), "--vocab-size", "32000"])
    out = capsys.readouterr().out
    total = int(next(line for line in out.splitlines() if "total" in line).split()[1]
                .replace(",", ""))
    assert 0.9e9 < total < 1.2e9
