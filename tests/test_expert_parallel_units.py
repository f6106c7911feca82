"""Expert-parallel building blocks: the all-to-all exchange, layouts, metadata."""

from __future__ import annotations

import json

import pytest
import torch
import train_fixtures as tf
from torch import nn

from liquid_dist.config import ModelConfig, MoEConfig
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.model.megablocks import from_megablocks_layout, to_megablocks_layout
from liquid_dist.model.moe import expert_forward
from liquid_dist.parallel import free_port
from liquid_dist.parallel.expert_parallel import expert_range, split_expert_param_groups


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_exchange_matches_one_process_and_a_rank_without_tokens_does_not_hang(
        backend: str) -> None:
    import subprocess

    out = tf.TMP / f"exchange_{backend}"
    cmd = [str(tf.BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tests/expert_parallel_worker.py", backend, str(out)]
    proc = subprocess.run(cmd, cwd=tf.REPO, env=tf.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ranks = [json.loads(out.with_name(f"{out.name}.rank{r}").read_text()) for r in (0, 1)]
    assert [r["global_experts"] for r in ranks] == [[0, 1], [2, 3]]
    for r in ranks:
        # the router bias sends every token to experts 0 and 1 (rank 0's)
        assert r["skewed"]["usage"][2:] == [0.0, 0.0]
        for case in ("skewed", "empty_rank", "padded"):
            for key in ("y_err", "x_grad_err", "router_grad_err", "expert_grad_err"):
                assert r[case][key] <= 2e-6, (r["rank"], case, key, r[case][key])
        assert r["padded"]["padding_out"] == 0.0


def _model(num_experts: int = 4) -> LiquidFoundationModelOptimized:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, n_encoder_layers=1,
                      n_decoder_layers=1, ffn_dim=64, max_encoder_length=32,
                      max_decoder_length=16, window=8, freq_heads=2, band_block=16,
                      hyena_filter_dim=8,
                      moe=MoEConfig(num_experts=num_experts, k_max=2, expert_ffn_dim=32))
    return LiquidFoundationModelOptimized(cfg)


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    from liquid_dist.model.moe import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def test_expert_ranges_cover_every_expert_once() -> None:
    assert [expert_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_expert_parameters_get_optimizer_groups_of_their_own() -> None:
    layer = _moe_layers(_model())[0]
    dense, experts = [layer.router.weight], [layer.w1, layer.w2]
    for p in experts:  # the attributes mark_expert_parameter sets for DeepSpeed's split
        p.allreduce, p.group_name = False, "ep_size_2"
    groups = split_expert_param_groups([{"params": dense + experts, "weight_decay": 0.1}])
    by_moe = {bool(g.get("moe")): g for g in groups}
    assert [id(p) for p in by_moe[False]["params"]] == [id(p) for p in dense]
    assert [id(p) for p in by_moe[True]["params"]] == [id(p) for p in experts]
    assert by_moe[True]["weight_decay"] == 0.1 and by_moe[True]["name"] == "ep_size_2"


def test_megablocks_weight_layout_round_trip_is_lossless_and_computes_the_same() -> None:
    torch.manual_seed(0)
    num_experts, d, ffn = 3, 8, 12
    w1, w2 = torch.randn(num_experts, d, ffn), torch.randn(num_experts, ffn, d)
    w1_mb, w2_mb = to_megablocks_layout(w1, w2)
    assert w1_mb.shape == w2_mb.shape == (num_experts * ffn, d)
    back1, back2 = from_megablocks_layout(w1_mb, w2_mb, num_experts)
    assert torch.equal(back1, w1) and torch.equal(back2, w2)
    # MegaBlocks' semantics on its layout: act(x @ w1[e].T) @ w2[e], biases added here
    b1, b2 = torch.randn(num_experts, ffn), torch.randn(num_experts, d)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(int(counts.sum()), d)
    rows, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start:start + n]
        h = torch.nn.functional.gelu(xe @ w1_mb.view(num_experts, ffn, d)[e].T + b1[e])
        rows.append(h @ w2_mb.view(num_experts, ffn, d)[e] + b2[e])
        start += n
    torch.testing.assert_close(torch.cat(rows),
                               expert_forward(x, counts, w1, b1, w2, b2, "loop"))


