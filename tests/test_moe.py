"""MoELayer (docs/model.md, "MoELayer"): routing, dropless dispatch, backends, auxiliary losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from liquid_dist.config import ConfigError, MoEConfig
from liquid_dist.model.moe import (
    MoELayer,
    combine,
    dispatch,
    expert_forward,
    grouped_mm,
    resolve_moe_backend,
    route,
)

D = 8
E = 4


def make_cfg(**overrides) -> MoEConfig:
    values = dict(num_experts=E, top_k=2, dynamic_k=True, k_max=4, expert_ffn_dim=16,
                  expert_type="mlp", renormalize=False, backend="grouped_mm",
                  overuse_threshold=0.5)
    values.update(overrides)
    return MoEConfig(**values)


def make_layer(seed: int = 0, d_model: int = D, **overrides) -> MoELayer:
    """A layer whose router is as sharp as a trained one: its init (Switch's, near-uniform
    routing, so dynamic k starts at k_max for every token) is replaced by N(0, 1/d)."""
    torch.manual_seed(seed)
    layer = MoELayer(make_cfg(**overrides), d_model)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, d_model ** -0.5)
    return layer


def randomize_biases(layer: MoELayer) -> MoELayer:
    """Biases start at zero; make them non-zero so that their handling is checked."""
    with torch.no_grad():
        for b in (layer.b1, layer.b2, layer.router.bias):
            if b is not None:
                b.normal_(0.0, 0.3)
    return layer


def naive_moe(layer: MoELayer, tokens: torch.Tensor,
              real: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
    """Per-token Python reference of seed 3.4, independent of route/dispatch/combine.

    Differentiable w.r.t. the tokens, the router and the experts; a token with
    ``real[n]`` False (padding) gives 0 and no gradient. Returns the outputs and
    the real tokens' k.
    """
    cfg = layer.cfg
    width = cfg.k_max if cfg.dynamic_k else cfg.top_k
    outs, ks = [], []
    for n, x in enumerate(tokens):
        if real is not None and not real[n]:
            outs.append(torch.zeros(x.shape[-1]))
            continue
        p = torch.softmax(x @ layer.router.weight.T + layer.router.bias, -1)
        p_list = p.tolist()
        if cfg.dynamic_k:
            entropy = -sum(pi * math.log(pi) for pi in p_list if pi > 0)
            k = min(max(1, min(cfg.num_experts, math.floor(cfg.top_k * (1 + entropy)))), width)
        else:
            k = cfg.top_k
        chosen = sorted(range(cfg.num_experts), key=lambda j: -p_list[j])[:k]
        gates = p[chosen]
        if cfg.renormalize:
            gates = gates / gates.sum()
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


def test_dispatch_sorts_assignments_by_expert_and_non_assignments_last():
    cfg = make_cfg(top_k=1, k_max=3)
    torch.manual_seed(5)
    x = torch.randn(12, D)
    weights, experts, k, _ = route(torch.randn(12, E) * 2, cfg)
    weights = weights.masked_fill((torch.arange(12) >= 10).unsqueeze(-1), 0.0)  # 2 padding
    assert (weights[:10] == 0).any(), "the case must contain slots beyond a token's k"
    x_sorted, tokens_per_expert, info = dispatch(x, experts, weights, E)
    n_assigned = int(k[:10].sum())
    assert x_sorted.shape == (12 * 3, D)
    assert tokens_per_expert.tolist() == torch.bincount(
        experts[weights != 0], minlength=E).tolist()
    assert int(tokens_per_expert.sum()) == n_assigned
    assert torch.all(info.weight[:n_assigned] != 0) and torch.all(info.weight[n_assigned:] == 0)
    assert torch.equal(info.expert_index, info.expert_index.sort().values)
    assert torch.all(info.expert_index[n_assigned:] == E)  # the sentinel, after every group
    assert torch.equal(info.expert_index[:n_assigned],
                       experts.reshape(-1)[info.slot_index[:n_assigned]])
    assert sorted(info.slot_index.tolist()) == list(range(12 * 3))
    start = 0
    for count in tokens_per_expert.tolist():  # stable: token order within an expert
        group = info.slot_index[start:start + count]
        assert torch.equal(group, group.sort().values)
        start += count
    torch.testing.assert_close(x_sorted, x[info.slot_index // cfg.k_max])
    # combine of the identity expert is sum_j w_j * x: the gate mass on each token
    y_sorted = torch.where((info.weight != 0).unsqueeze(-1), x_sorted, 0)
    out = combine(y_sorted, info)
    torch.testing.assert_close(out, x * weights.sum(-1, keepdim=True))
    assert torch.equal(out[10:], torch.zeros(2, D))


def test_dispatch_shapes_depend_only_on_tokens_and_k_max():
    cfg = make_cfg(top_k=1, k_max=3)
    torch.manual_seed(12)
    x = torch.randn(10, D)
    weights, experts, _, _ = route(torch.randn(10, E), cfg)
    one_expert = torch.full_like(experts, 2)  # every slot to expert 2 (weights left as they are)
    shapes = set()
    for w, ex in ((weights, experts), (torch.zeros_like(weights), experts),
                  (torch.ones_like(weights), one_expert), (weights[:, :1].expand(-1, 3), experts)):
        x_sorted, tokens_per_expert, info = dispatch(x, ex, w, E)
        shapes.add((x_sorted.shape, tokens_per_expert.shape, info.slot_index.shape,
                    info.weight.shape, info.expert_index.shape))
    assert shapes == {((30, D), (E,), (30,), (30,), (30,))}


def _case_batch(case: str):
    """(layer overrides, router bias, x (B, L, d), mask) of one dispatch case."""
    torch.manual_seed(13)
    x = torch.randn(3, 6, D)
    mask = None
    bias = None
    if case == "empty_expert":  # k <= 3 of 4, and expert 2 is always the least probable
        bias = torch.tensor([1.0, 0.0, -30.0, 0.0])
    if case == "padding":
        mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [False] * 6])
        x[~mask] = 1e3  # a value no real token holds
    return dict(top_k=1, k_max=3, renormalize=case == "padding"), bias, x, mask


def _output_and_grads(layer: MoELayer, x: torch.Tensor, mask, naive: bool = False):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    if naive:
        real = None if mask is None else mask.reshape(-1)
        y = naive_moe(layer, x.reshape(-1, D), real)[0].reshape(x.shape)
    else:
        y = layer(x, mask)[0]
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * g).sum().backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for n, p in layer.named_parameters()}
    grads["x"] = x.grad.clone()
    return y.detach(), grads


@pytest.mark.parametrize("case", ["plain", "empty_expert", "padding"])
def test_dispatch_matches_loop_and_per_token_reference_in_outputs_and_gradients(case):
    overrides, bias, x, mask = _case_batch(case)
    layers = {b: randomize_biases(make_layer(backend=b, **overrides))
              for b in ("grouped_mm", "loop")}
    layers["loop"].load_state_dict(layers["grouped_mm"].state_dict())
    if bias is not None:
        for layer in layers.values():
            with torch.no_grad():
                layer.router.bias.copy_(bias)
    ref_y, ref_grads = _output_and_grads(layers["loop"], x, mask, naive=True)
    usage = layers["grouped_mm"](x, mask)[1]["expert_usage"]
    if case == "empty_expert":
        assert usage[2] == 0 and (usage[[0, 1, 3]] > 0).all()
        assert torch.all(ref_grads["w1"][2] == 0)
    for backend, layer in layers.items():
        y, grads = _output_and_grads(layer, x, mask)
        torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
        for name, ref in ref_grads.items():
            assert ref.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=name, b=backend: f"{b} {n}: {m}")
        if case == "empty_expert":
            for name in ("w1", "b1", "w2", "b2"):
                assert torch.all(grads[name][2] == 0), (backend, name)
        if case == "padding":
            assert torch.equal(y[~mask], torch.zeros_like(y[~mask])), backend
            assert torch.equal(grads["x"][~mask], torch.zeros_like(grads["x"][~mask])), backend


def test_grouped_mm_op_equals_torch_grouped_mm_and_zeroes_rows_past_the_groups():
    torch.manual_seed(14)
    a = torch.randn(10, 8)
    a[7:] = float("nan")  # rows past the groups: never read
    b = torch.randn(3, 8, 4)
    offs = torch.tensor([3, 3, 7], dtype=torch.int32)  # group 1 empty
    g = torch.randn(10, 4)
    a_ref, b_ref = a.clone().requires_grad_(), b.clone().requires_grad_()
    y_ref = torch._grouped_mm(a_ref, b_ref, offs=offs)
    y_ref.backward(g)
    a_op, b_op = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = grouped_mm(a_op, b_op, offs)
    y.backward(g)
    assert torch.equal(y[:7], y_ref[:7]) and torch.equal(y[7:], torch.zeros(3, 4))
    assert torch.equal(a_op.grad[:7], a_ref.grad[:7])
    assert torch.equal(a_op.grad[7:], torch.zeros(3, 8))  # torch leaves these uninitialised
    assert torch.equal(b_op.grad, b_ref.grad) and torch.all(b_op.grad[1] == 0)
    # an upstream gradient with zero strides (from .sum()) is made contiguous
    b_op.grad = None
    grouped_mm(a_op, b_op, offs).sum().backward()
    b_ref.grad = None
    torch._grouped_mm(a_ref, b_ref, offs=offs).backward(torch.ones(10, 4))
    assert torch.equal(b_op.grad, b_ref.grad)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_expert_forward_rows_past_the_groups_are_zero_and_read_by_no_expert(backend):
    torch.manual_seed(15)
    layer = randomize_biases(make_layer())
    counts = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, D)
    x_padded = torch.cat([x, torch.full((4, D), float("nan"))]).requires_grad_()
    y = layer.local_expert_forward(x, counts)
    y_padded = expert_forward(x_padded, counts, layer.w1, layer.b1, layer.w2, layer.b2, backend)
    torch.testing.assert_close(y_padded[:6], y, atol=1e-6, rtol=1e-6)
    assert torch.equal(y_padded[6:], torch.zeros(4, D))
    y_padded.square().sum().backward()
    assert torch.equal(x_padded.grad[6:], torch.zeros(4, D))
    for p in layer.expert_parameters():
        assert torch.isfinite(p.grad).all() and torch.all(p.grad[1] == 0)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_compiled_layer_fullgraph_equals_eager_forward_and_backward(backend):
    eager = randomize_biases(make_layer(backend=backend, renormalize=True))
    compiled_layer = make_layer(backend=backend, renormalize=True)
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, fullgraph=True)
    torch.manual_seed(16)
    batches = []
    for _ in range(2):
        x = torch.randn(2, 6, D)
        batches.append((x, torch.rand(2, 6) > 0.3))
    for step, (x, mask) in enumerate(batches):
        outs = []
        for layer, fn in ((eager, eager), (compiled_layer, compiled)):
            layer.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_()
            # the second batch routes differently, at the same shapes: no recompile
            stance = "fail_on_recompile" if step and fn is compiled else "default"
            with torch.compiler.set_stance(stance):
                y, aux = fn(xg, mask)
            (y.square().sum() + aux["moe_entropy"] + aux["moe_overuse"]).backward()
            outs.append((y.detach(), aux, xg.grad,
                         {n: p.grad for n, p in layer.named_parameters()}))
        (y_e, aux_e, gx_e, grads_e), (y_c, aux_c, gx_c, grads_c) = outs
        torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx_c, gx_e, atol=1e-5, rtol=1e-5)
        for name in aux_e:
            torch.testing.assert_close(aux_c[name], aux_e[name], atol=1e-5, rtol=1e-5)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_resolve_moe_backend_decides_before_launch_without_a_gpu():
    auto = make_cfg(backend="auto")
    assert resolve_moe_backend(auto, "cpu", "fp32") == "grouped_mm"
    assert resolve_moe_backend(auto, "cpu", "bf16") == "grouped_mm"
    assert resolve_moe_backend(auto, "cuda", "bf16") == "grouped_mm"
    assert resolve_moe_backend(auto, "cuda", "fp32") == "loop"
    assert resolve_moe_backend(auto, "cuda", "fp16") == "loop"
    assert resolve_moe_backend(make_cfg(backend="grouped_mm"), "cpu", "fp32") == "grouped_mm"
    assert resolve_moe_backend(make_cfg(backend="grouped_mm"), "cuda", "bf16") == "grouped_mm"
    for precision in ("fp32", "fp16"):
        with pytest.raises(ConfigError, match=f"'model.moe.backend' = 'grouped_mm'.*cuda in "
                                              f"{precision}.*'auto' or 'loop'"):
            resolve_moe_backend(make_cfg(backend="grouped_mm"), "cuda", precision)
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        assert resolve_moe_backend(make_cfg(backend="loop"), device, precision) == "loop"
    assert resolve_moe_backend(make_cfg(backend="megablocks"), "cuda", "bf16") == "megablocks"
    with pytest.raises(ConfigError, match="'model.moe.backend' = 'megablocks'.*CUDA in bf16"):
        resolve_moe_backend(make_cfg(backend="megablocks"), "cpu", "fp32")
    with pytest.raises(ConfigError, match="'train.precision' = 'auto'.*resolved"):
        resolve_moe_backend(auto, "cuda", "auto")
    with pytest.raises(ConfigError, match="'model.moe.backend' = 'dense'"):
        resolve_moe_backend(make_cfg(backend="dense"), "cpu", "fp32")
    assert MoEConfig().backend == "auto"


def test_auto_backend_runs_grouped_mm_on_cpu():
    layers = [make_layer(backend=b) for b in ("auto", "grouped_mm")]
    torch.manual_seed(17)
    x = torch.randn(2, 5, D)
    assert torch.equal(layers[0](x)[0], layers[1](x)[0])


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


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_a_step_is_bitwise_repeatable_with_two_threads(backend: str) -> None:
    """Run to run with the same thread count, the forward and every gradient are the same
    bits (the expert biases' gradients once were not: indexing's backward on the CPU
    accumulates rows in the order the threads reach them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer = randomize_biases(make_layer(d_model=64, expert_ffn_dim=64, backend=backend))
        x = torch.randn(4, 512, 64, generator=torch.Generator().manual_seed(0))
        runs = []
        for _ in range(8):
            layer.zero_grad(set_to_none=True)
            y, aux = layer(x)
            (y.square().mean() + aux["moe_entropy"]).backward()
            runs.append([y.detach()] + [p.grad.clone() for p in layer.parameters()])
    finally:
        torch.set_num_threads(threads)
    names = ["y"] + [n for n, _ in layer.named_parameters()]
    differ = {n for run in runs[1:] for n, a, b in zip(names, runs[0], run, strict=True)
              if not torch.equal(a, b)}
    assert not differ, sorted(differ)
