"""The parameter-count utility agrees with the model it describes."""

import dataclasses
from pathlib import Path

import torch

from liquid_dist.config import load_config
from liquid_dist.model import LiquidFoundationModelOptimized, MoELayer
from liquid_dist.model.counts import count_parameters
from liquid_dist.params import main

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


def _hand_count(vocab: int = 32000) -> dict[str, int]:
    """configs/xl-moe.yaml's parameters, written out from the component definitions
    (docs/model.md) rather than counted from a model: d 3072, 24 heads of 128 (8 KV
    heads), 12 + 12 layers, FFN 4096, 16 experts of 4096, kernels 3, Hyena filter 128,
    max lengths 2048 / 1024, tied embeddings."""
    d, kv, F, E, Fe, w, k, layers = 3072, 8 * 128, 4096, 16, 4096, 128, 3, 12
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    norm = 2 * d
    attention = 2 * linear(d, d) + 2 * linear(d, kv)  # q, out; k, v (GQA)
    gated_conv = linear(d * k, 2 * d) + linear(d * k, k) + norm  # deformable conv + offsets
    router = linear(d, E)
    expert = linear(d, Fe) + linear(Fe, d)
    ffn = linear(d, F) + 2 * F + linear(F, d)  # fc1, LayerNorm(F), fc2
    enc_block = 4 * norm + attention + gated_conv + router + E * expert + ffn
    dec_block = enc_block + norm + attention  # + cross-attention
    stem = 2 * linear(d * 3, d) + norm + d  # two convs, LayerNorm, gain
    compression = linear(d, d) + norm + d  # projection, LayerNorm, gain
    bands = 11  # octave bands of the 1025 rfft bins of n_fft 2048
    frequency = bands * (linear(d, d) + norm) + linear(d, 3 * d) + linear(d, d) + norm + d
    hyena = (linear(d, 3 * d) + linear(3, 3 * d)  # in_proj, depthwise short conv (3 taps)
             + linear(17, w) + w + linear(w, w) + w + linear(w, d, bias=False)  # filter MLP
             + d + linear(d, d) + norm + d)  # skip D, out_proj, LayerNorm, gain
    encoder = 2048 * d + stem + frequency + compression + layers * enc_block + norm
    lstm = norm + 4 * d * d + 4 * d * d + 4 * d + 4 * d + 2 * linear(d, d)
    decoder = 1024 * d + stem + hyena + compression + layers * dec_block + lstm + norm
    total = vocab * d + encoder + decoder + vocab  # tied embedding, lm_head bias
    experts = 2 * layers * E * expert
    return {"total": total, "experts": experts, "dense": total - experts,
            "active_per_token_min": total - experts + experts // E,  # top_k 1
            "active_per_token_max": total - experts + 2 * experts // E}  # k_max 2


def test_xl_moe_is_13b_parameters_by_a_count_written_out_by_hand():
    cfg = dataclasses.replace(load_config(CONFIGS / "xl-moe.yaml").model, vocab_size=32000)
    with torch.device("meta"):  # 13 B parameters: shapes only
        model = LiquidFoundationModelOptimized(cfg)
    counts = count_parameters(model)
    assert counts == _hand_count()
    assert counts["total"] == 13_053_071_688 and counts["experts"] == 9_666_428_928
