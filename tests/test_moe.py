"""MoELayer (DESIGN.md §2.4): routing, dropless dispatch, backends, auxiliary losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from liquid_dist.config import MoEConfig
from liquid_dist.model.moe import MoELayer, combine, dispatch, expert_forward, route

D = 8
E = 4


def make_cfg(**overrides) -> MoEConfig:
    values = dict(num_experts=E, top_k=2, dynamic_k=True, k_max=4, expert_ffn_dim=16,
                  expert_type="mlp", renormalize=False, backend="grouped_mm",
                  overuse_threshold=0.5)
    values.update(overrides)
    return MoEConfig(**values)


def make_layer(seed: int = 0, d_model: int = D, **overrides) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(make_cfg(**overrides), d_model)


def randomize_biases(layer: MoELayer) -> MoELayer:
    """Biases start at zero; make them non-zero so that their handling is checked."""
    with torch.no_grad():
        for b in (layer.b1, layer.b2, layer.router.bias):
            if b is not None:
                b.normal_(0.0, 0.3)
    return layer


def naive_moe(layer: MoELayer, tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Per-token Python reference of seed 3.4, independent of route/dispatch/combine."""
    cfg = layer.cfg
    width = cfg.k_max if cfg.dynamic_k else cfg.top_k
    outs, ks = [], []
    for x in tokens:
        p = torch.softmax(x @ layer.router.weight.T + layer.router.bias, -1).tolist()
        if cfg.dynamic_k:
            entropy = -sum(pi * math.log(pi) for pi in p if pi > 0)
            k = min(max(1, min(cfg.num_experts, math.floor(cfg.top_k * (1 + entropy)))), width)
        else:
            k = cfg.top_k
        chosen = sorted(range(cfg.num_experts), key=lambda j: -p[j])[:k]
        gates = [p[j] for j in chosen]
        if cfg.renormalize:
            gates = [g / sum(gates) for g in gates]
        y = torch.zeros(x.shape[-1])
        for j, g in zip(chosen, gates, strict=True):
            h = x @ layer.w1[j] + layer.b1[j]
            if layer.w2 is not None:
                h = F.gelu(h) @ layer.w2[j] + layer.b2[j]
            y = y + g * h
        outs.append(y)
        ks.append(k)
    return torch.stack(outs), ks


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("dynamic_k", [True, False])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("expert_type", ["mlp", "linear"])
def test_moe_output_equals_naive_per_token_loop(backend, dynamic_k, renormalize, expert_type):
    layer = randomize_biases(make_layer(backend=backend, dynamic_k=dynamic_k,
                                        renormalize=renormalize, expert_type=expert_type))
    torch.manual_seed(1)
    x = torch.randn(2, 6, D)
    y, aux = layer(x)
    with torch.no_grad():
        ref, ks = naive_moe(layer, x.reshape(-1, D))
    torch.testing.assert_close(y.reshape(-1, D), ref, atol=1e-5, rtol=1e-5)
    assert aux["mean_k"].item() == pytest.approx(sum(ks) / len(ks))
    if dynamic_k:
        assert len(set(ks)) >= 2, "the case must exercise several values of k"


def _loss_and_grads(layer: MoELayer, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y, aux = layer(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    loss = (y * g).sum() + aux["moe_entropy"] + aux["moe_overuse"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    grads["x"] = x.grad.clone()
    return y.detach(), grads


@pytest.mark.parametrize("expert_type", ["mlp", "linear"])
def test_grouped_mm_matches_loop_forward_and_gradients(expert_type):
    layers = [randomize_biases(make_layer(backend=b, expert_type=expert_type,
                                          overuse_threshold=0.3))
              for b in ("grouped_mm", "loop")]
    layers[1].load_state_dict(layers[0].state_dict())
    torch.manual_seed(2)
    x = torch.randn(3, 7, D)
    (y_g, grads_g), (y_l, grads_l) = (_loss_and_grads(m, x) for m in layers)
    torch.testing.assert_close(y_g, y_l, atol=1e-5, rtol=1e-5)
    assert grads_g.keys() == grads_l.keys()
    for name in grads_g:
        torch.testing.assert_close(grads_g[name], grads_l[name], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
        assert grads_g[name].abs().sum() > 0, name


def test_dynamic_k_within_bounds_and_grows_with_entropy():
    cfg = make_cfg(top_k=1, k_max=4)
    torch.manual_seed(3)
    base = torch.randn(1, E)
    ks, entropies = [], []
    for temperature in (0.01, 0.3, 1.0, 3.0, 100.0):
        weights, experts, k, probs = route(base / temperature, cfg)
        ks.append(int(k))
        entropies.append(float(torch.special.entr(probs).sum()))
        assert int((weights != 0).sum()) == int(k)
        assert torch.all(weights[0, int(k):] == 0)
    assert entropies == sorted(entropies)
    assert ks == sorted(ks)
    assert ks[0] == 1
    assert ks[-1] == math.floor(1 + math.log(E))  # near-uniform gate: floor(k_base (1 + log E))
    logits = torch.randn(200, E) * torch.logspace(-2, 2, 200).unsqueeze(-1)
    for cfg in (make_cfg(top_k=2, k_max=3), make_cfg(top_k=3, k_max=4), make_cfg(top_k=1)):
        _, _, k, _ = route(logits, cfg)
        assert k.min() >= 1 and k.max() <= min(cfg.k_max, cfg.num_experts)


def test_fixed_k_selects_top_k_most_probable():
    cfg = make_cfg(dynamic_k=False, top_k=2)
    torch.manual_seed(4)
    logits = torch.randn(10, E)
    weights, experts, k, probs = route(logits, cfg)
    assert weights.shape == experts.shape == (10, 2)
    assert torch.all(k == 2)
    torch.testing.assert_close(weights, probs.gather(1, experts))
    assert torch.all(weights.min(1).values >= probs.sort(1, descending=True).values[:, 1])


def test_dispatch_leaves_out_zero_weight_slots_and_combine_inverts_it():
    cfg = make_cfg(top_k=1, k_max=3)
    torch.manual_seed(5)
    x = torch.randn(12, D)
    weights, experts, k, _ = route(torch.randn(12, E) * 2, cfg)
    assert (weights == 0).any(), "the case must contain zero-weight slots"
    x_sorted, tokens_per_expert, info = dispatch(x, experts, weights, E)
    assert x_sorted.shape[0] == int(k.sum()) == int(tokens_per_expert.sum())
    assert torch.all(info.weight != 0)
    assert torch.equal(info.expert_index, info.expert_index.sort().values)
    torch.testing.assert_close(x_sorted, x[info.slot_index // cfg.k_max])
    # combine of the identity expert is sum_j w_j * x: the gate mass on each token
    out = combine(x_sorted, info)
    torch.testing.assert_close(out, x * weights.sum(-1, keepdim=True))


def test_aux_losses_zero_for_balanced_routing():
    layer = make_layer(overuse_threshold=1.0 / E)
    with torch.no_grad():
        layer.router.weight.zero_()
    torch.manual_seed(6)
    _, aux = layer(torch.randn(2, 5, D))
    assert aux["moe_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert aux["moe_overuse"].item() == pytest.approx(0.0, abs=1e-6)


def test_aux_losses_nonnegative_and_differentiable_wrt_router():
    layer = make_layer(overuse_threshold=0.3)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([2.0, 0.0, 0.0, -1.0]))
    torch.manual_seed(7)
    _, aux = layer(torch.randn(2, 5, D))
    for name in ("moe_entropy", "moe_overuse"):
        assert aux[name].item() > 0, name
        (grad,) = torch.autograd.grad(aux[name], layer.router.weight, retain_graph=True)
        assert grad.abs().sum() > 0, name
    assert not aux["expert_usage"].requires_grad and not aux["mean_k"].requires_grad
    assert aux["expert_usage"].shape == (E,)
    assert aux["expert_usage"].sum().item() == pytest.approx(1.0)


def test_padding_does_not_affect_aux_losses():
    layer = make_layer(overuse_threshold=0.3)
    torch.manual_seed(8)
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 3 + [False] * 3])
    _, aux = layer(x, mask)
    x_other = torch.where(mask.unsqueeze(-1), x, 50 * torch.randn(2, 6, D))
    _, aux_other = layer(x_other, mask)
    _, aux_real = layer(x[mask])  # (N, d) input, only the real tokens
    _, aux_unmasked = layer(x_other)
    for name in aux:
        torch.testing.assert_close(aux_other[name], aux[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(aux_real[name], aux[name], atol=1e-6, rtol=0)
    assert not torch.allclose(aux_unmasked["moe_entropy"], aux["moe_entropy"])


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_experts_without_tokens_get_zero_gradient(backend):
    layer = make_layer(backend=backend, dynamic_k=False, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))  # everyone to expert 1
    torch.manual_seed(9)
    y, aux = layer(torch.randn(2, 5, D))
    assert aux["expert_usage"].tolist() == [0.0, 1.0, 0.0, 0.0]
    (y.sum() + aux["moe_entropy"]).backward()
    unused = [0, 2, 3]
    for name in ("w1", "b1", "w2", "b2"):
        grad = getattr(layer, name).grad
        assert torch.all(grad[unused] == 0), name
        assert grad[1].abs().sum() > 0, name


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_empty_batch_gives_empty_output_and_zero_losses(backend):
    layer = make_layer(backend=backend)
    y, aux = layer(torch.randn(0, D))
    assert y.shape == (0, D)
    assert aux["moe_entropy"].item() == 0 and aux["moe_overuse"].item() == 0
    _, aux_padded = layer(torch.randn(1, 3, D), torch.zeros(1, 3, dtype=torch.bool))
    assert aux_padded["moe_entropy"].item() == 0 and aux_padded["moe_overuse"].item() == 0


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_token_output_does_not_depend_on_other_tokens(backend):
    layer = make_layer(backend=backend).eval()
    torch.manual_seed(10)
    x = torch.randn(3, 5, D)
    y, _ = layer(x)
    y_alone, _ = layer(x[1:2, 2:3])
    torch.testing.assert_close(y_alone[0, 0], y[1, 2], atol=1e-6, rtol=1e-6)
    x_other = 3 * torch.randn(3, 5, D)
    x_other[1, 2] = x[1, 2]
    y_other, _ = layer(x_other)
    torch.testing.assert_close(y_other[1, 2], y[1, 2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_bf16_autocast_runs_on_cpu(backend):
    layer = make_layer(backend=backend, d_model=16, expert_ffn_dim=32)  # bf16 needs 8-multiples
    torch.manual_seed(11)
    x = torch.randn(2, 5, 16)
    y32, aux32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, aux16 = layer(x)
    assert y16.dtype == x.dtype and torch.isfinite(y16).all()
    torch.testing.assert_close(y16, y32, atol=5e-2, rtol=5e-2)
    for name in aux32:  # the router runs in fp32 whatever the autocast
        torch.testing.assert_close(aux16[name], aux32[name])
    (y16.sum() + aux16["moe_entropy"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_linear_experts_layout_and_init():
    layer = make_layer(d_model=64, expert_type="linear")
    assert layer.w1.shape == (E, 64, 64) and layer.b1.shape == (E, 64)
    assert layer.w2 is None and layer.b2 is None
    mlp = make_layer(d_model=64, expert_ffn_dim=192)
    assert mlp.w1.shape == (E, 64, 192) and mlp.w2.shape == (E, 192, 64)
    for e in range(E):  # Xavier-normal per expert: std sqrt(2 / (d + F))
        assert mlp.w1[e].std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.1)
        assert mlp.w2[e].std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.1)
    assert not torch.allclose(mlp.w1[0], mlp.w1[1])
    assert torch.all(mlp.b1 == 0) and torch.all(mlp.b2 == 0)


def test_megablocks_backend_raises_clear_error():
    layer = make_layer(backend="megablocks")
    with pytest.raises(RuntimeError, match="megablocks backend requires MegaBlocks on CUDA"):
        layer(torch.randn(2, 3, D))


def test_grouped_mm_rejects_misaligned_width_with_clear_error():
    layer = make_layer(d_model=6)
    with pytest.raises(ValueError, match="multiples of 4.*moe.backend='loop'"):
        layer(torch.randn(2, 3, 6))
    layer.cfg.backend = "loop"
    y, _ = layer(torch.randn(2, 3, 6))
    assert y.shape == (2, 3, 6)


def test_expert_forward_rejects_unknown_backend():
    x_sorted = torch.randn(3, D)
    w1, b1 = torch.randn(E, D, D), torch.zeros(E, D)
    with pytest.raises(ValueError, match="unknown MoE backend"):
        expert_forward(x_sorted, torch.tensor([3, 0, 0, 0]), w1, b1, None, None, "dense")
