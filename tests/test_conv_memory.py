"""DeformableConv1d, OptimizedGatedConvolution and EnhancedLSTM (docs/model.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_model import awaken

from liquid_dist.config import ModelConfig
from liquid_dist.model.conv import DeformableConv1d, OptimizedGatedConvolution
from liquid_dist.model.memory import EnhancedLSTM

C_IN, C_OUT = 4, 6


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=16, n_heads=2, n_kv_heads=1, ffn_dim=32,
                conv_kernel_size=3, max_offset=2.0, lstm_layers=2)
    base.update(kw)
    return ModelConfig(**base)


def _randomise_offsets(conv: DeformableConv1d, scale: float, seed: int = 0) -> None:
    """Give the offset conv random weights so offsets vary with input and position."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (conv.offset_conv.weight, conv.offset_conv.bias):
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))


@torch.no_grad()
def _reference(conv: DeformableConv1d, x: torch.Tensor) -> torch.Tensor:
    """Per position, per tap Python loop straight from the definition."""
    delta = conv.offsets(x)
    bsz, length, _ = x.shape
    k = conv.kernel_size
    out = torch.zeros(bsz, length, conv.out_channels, dtype=torch.float64)
    w = conv.weight.double()

    def read(b: int, i: int, limit: int) -> torch.Tensor:
        if 0 <= i <= limit:
            return x[b, i].double()
        return torch.zeros(x.shape[-1], dtype=torch.float64)

    for b in range(bsz):
        for p_out in range(length):
            acc = conv.bias.double().clone()
            for m in range(k):
                d = float(delta[b, p_out, m])
                if conv.causal:
                    p = min(p_out - (k - 1) + m + d, float(p_out))
                else:
                    p = p_out + m - (k - 1) // 2 + d
                lo = math.floor(p)
                a = p - lo
                limit = p_out if conv.causal else length - 1
                sample = (1 - a) * read(b, lo, limit) + a * read(b, lo + 1, limit)
                acc = acc + w[:, :, m] @ sample
            out[b, p_out] = acc
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_zero_offsets_equal_ordinary_conv1d(k: int, causal: bool) -> None:
    torch.manual_seed(0)
    conv = DeformableConv1d(C_IN, C_OUT, k, max_offset=2.0, causal=causal)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 9, C_IN)
    y = conv(x)
    xt = x.transpose(1, 2)
    if causal:
        ref = F.conv1d(F.pad(xt, (k - 1, 0)), conv.weight, conv.bias)
    else:
        ref = F.conv1d(xt, conv.weight, conv.bias, padding="same")
    torch.testing.assert_close(y, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("max_offset", [1.5, 3.0])
def test_interpolation_matches_naive_reference(causal: bool, max_offset: float) -> None:
    torch.manual_seed(1)
    conv = DeformableConv1d(C_IN, C_OUT, 3, max_offset=max_offset, causal=causal)
    _randomise_offsets(conv, scale=1.0)
    x = torch.randn(2, 8, C_IN)
    with torch.no_grad():
        delta = conv.offsets(x)
        y = conv(x)
    # The offsets must actually be fractional and reach out of range for the
    # comparison to exercise interpolation and zero padding.
    assert (delta - delta.round()).abs().max() > 0.1
    assert delta.abs().max() > 1.0
    torch.testing.assert_close(y.double(), _reference(conv, x), atol=1e-5, rtol=1e-5)


def test_offsets_are_bounded_by_max_offset() -> None:
    torch.manual_seed(2)
    conv = DeformableConv1d(C_IN, C_OUT, 3, max_offset=1.25, causal=False)
    _randomise_offsets(conv, scale=50.0)
    delta = conv.offsets(torch.randn(3, 11, C_IN) * 10)
    assert delta.abs().max() <= 1.25
    assert delta.abs().max() > 1.2  # saturated, so the bound is what holds it


def test_causal_form_never_reads_the_future() -> None:
    torch.manual_seed(3)
    conv = DeformableConv1d(C_IN, C_OUT, 3, max_offset=3.0, causal=True)
    _randomise_offsets(conv, scale=2.0)
    with torch.no_grad():
        conv.offset_conv.bias.fill_(10.0)  # every tap pushed forward by ~max_offset
    x = torch.randn(2, 10, C_IN)
    y = conv(x)
    for t in range(10):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 100
        torch.testing.assert_close(conv(x2)[:, : t + 1], y[:, : t + 1], atol=0, rtol=0)
    # Not even a NaN in the future may reach the past (nothing is gathered from it).
    x3 = x.clone()
    x3[:, 5:] = float("nan")
    assert torch.isfinite(conv(x3)[:, :5]).all()


def test_gradients_reach_offset_conv_and_weights_from_zero_init() -> None:
    torch.manual_seed(4)
    for causal in (False, True):
        conv = DeformableConv1d(C_IN, C_OUT, 3, max_offset=2.0, causal=causal)
        conv(torch.randn(2, 7, C_IN)).pow(2).sum().backward()
        for name, p in conv.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (causal, name)


def test_noncausal_outputs_ignore_trailing_padding() -> None:
    torch.manual_seed(5)
    conv = DeformableConv1d(C_IN, C_OUT, 5, max_offset=3.0, causal=False)
    _randomise_offsets(conv, scale=1.0)
    cfg = _cfg(max_offset=3.0, conv_kernel_size=5)
    gated = awaken(OptimizedGatedConvolution(cfg, causal=False)).eval()
    _randomise_offsets(gated.conv, scale=1.0)
    real = 6
    for module, c in ((conv, C_IN), (gated, cfg.d_model)):
        x = torch.randn(2, real, c)
        outs = []
        for pad in (0, 3, 9):
            garbage = torch.randn(2, pad, c) * 100
            xp = torch.cat([x, garbage], dim=1)
            mask = torch.arange(real + pad).unsqueeze(0).expand(2, -1) < real
            outs.append(module(xp, mask)[:, :real])
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


def _run_steps(module, x: torch.Tensor) -> torch.Tensor:
    state = module.init_state(x.shape[0], x.device, x.dtype)
    ys = []
    for pos in range(x.shape[1]):
        y, state = module.step(x[:, pos:pos + 1], state, pos)
        for v in state.values():
            assert v.shape[0] == x.shape[0]
        ys.append(y)
    return torch.cat(ys, dim=1)


@pytest.mark.parametrize("max_offset", [0.0, 1.5, 2.0])
@pytest.mark.parametrize("k", [1, 3])
def test_deformable_step_matches_forward(k: int, max_offset: float) -> None:
    torch.manual_seed(6)
    conv = DeformableConv1d(C_IN, C_OUT, k, max_offset=max_offset, causal=True)
    _randomise_offsets(conv, scale=1.0)
    x = torch.randn(2, 9, C_IN)
    with torch.no_grad():
        torch.testing.assert_close(_run_steps(conv, x), conv(x), atol=1e-5, rtol=1e-5)


def test_gated_conv_step_matches_forward() -> None:
    torch.manual_seed(7)
    gated = awaken(OptimizedGatedConvolution(_cfg(conv_kernel_size=3, max_offset=1.5),
                                             causal=True)).eval()
    _randomise_offsets(gated.conv, scale=0.5)
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        y = gated(x)
        torch.testing.assert_close(_run_steps(gated, x), y, atol=1e-5, rtol=1e-5)
    assert y.shape == (2, 8, 16)


def test_gated_conv_noncausal_has_no_incremental_state() -> None:
    gated = OptimizedGatedConvolution(_cfg(), causal=False)
    with pytest.raises(RuntimeError):
        gated.init_state(1, "cpu", torch.float32)


def test_deformable_conv_rejects_stride() -> None:
    with pytest.raises(ValueError, match="stride"):
        DeformableConv1d(C_IN, C_OUT, 3, max_offset=1.0, causal=False, stride=2)


def test_lstm_step_matches_forward() -> None:
    torch.manual_seed(8)
    lstm = awaken(EnhancedLSTM(_cfg(lstm_layers=2))).eval()
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        y = lstm(x)
        torch.testing.assert_close(_run_steps(lstm, x), y, atol=1e-5, rtol=1e-5)
    state = lstm.init_state(3, "cpu", torch.float32)
    assert state["h"].shape == state["c"].shape == (3, 2, 16)


def test_lstm_is_causal_and_all_parameters_get_gradients() -> None:
    torch.manual_seed(9)
    lstm = awaken(EnhancedLSTM(_cfg(lstm_layers=2)))
    x = torch.randn(2, 8, 16)
    y = lstm(x)
    for t in range(7):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 10
        torch.testing.assert_close(lstm(x2)[:, : t + 1], y[:, : t + 1], atol=0, rtol=0)
    assert not torch.allclose(lstm(x2)[:, 7], y[:, 7])
    y.pow(2).sum().backward()
    for name, p in lstm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lstm_init_forget_bias_and_orthogonal_recurrence() -> None:
    d = 16
    lstm = EnhancedLSTM(_cfg(lstm_layers=1)).lstms[0]
    assert torch.equal(lstm.bias_ih_l0[d:2 * d], torch.ones(d))
    w_hh = lstm.weight_hh_l0.detach()
    for w in w_hh.chunk(4, dim=0):
        torch.testing.assert_close(w @ w.T, torch.eye(d), atol=1e-5, rtol=0)


def test_lstm_and_gated_conv_run_under_bf16_autocast() -> None:
    torch.manual_seed(10)
    cfg = _cfg()
    lstm, gated = awaken(EnhancedLSTM(cfg)), awaken(OptimizedGatedConvolution(cfg, causal=True))
    x = torch.randn(2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lstm(x) + gated(x)
        y.float().sum().backward()
    assert y.shape == (2, 6, 16) and torch.isfinite(y).all()
    assert lstm.lstms[0].weight_hh_l0.grad.abs().sum() > 0
