"""FrequencyHyenaAttention (encoder spectral form, causal Hyena form) and
EnhancedLiquidEmbedding: shapes, precision, cost structure, padding
invariance, causality, incremental decoding, reconstruction loss, compression."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_model import awaken
from torch import nn

from liquid_dist.config import ModelConfig, next_power_of_two
from liquid_dist.model.embedding import EnhancedLiquidEmbedding
from liquid_dist.model.frequency import (
    FrequencyHyenaAttention,
    HyenaLongConvolution,
    band_block_groups,
    octave_bands,
)

D = 16


def make_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, d_model=D, n_heads=2, n_kv_heads=1, freq_heads=2,
                max_encoder_length=64, max_decoder_length=32, band_block=8,
                hyena_filter_dim=8, embed_kernel_size=3)
    base.update(overrides)
    return ModelConfig(**base)


def encoder_module(seed: int = 0) -> FrequencyHyenaAttention:
    torch.manual_seed(seed)
    return FrequencyHyenaAttention(make_cfg()).eval()


def embedding(causal: bool, seed: int = 0, **overrides) -> EnhancedLiquidEmbedding:
    """An :func:`~test_model.awaken`-ed embedding: every stage contributes."""
    torch.manual_seed(seed)
    cfg = make_cfg(**overrides)
    module = EnhancedLiquidEmbedding(cfg, nn.Embedding(cfg.vocab_size, D), causal=causal)
    return awaken(module, seed).eval()


def prefix_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


# ------------------------------------------------------------ encoder form


def test_encoder_output_shape_and_dtype():
    mod = encoder_module()
    x = torch.randn(3, 40, D)
    y = mod(x, prefix_mask([40, 25, 1], 40))
    assert y.shape == (3, 40, D) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def record_fft_input_dtypes(monkeypatch) -> list[torch.dtype]:
    """The input dtype of every torch.fft.rfft / irfft call from now on (a list that grows)."""
    seen: list[torch.dtype] = []
    for name in ("rfft", "irfft"):
        original = getattr(torch.fft, name)

        def recording(inp, *args, _original=original, **kwargs):
            seen.append(inp.dtype)
            return _original(inp, *args, **kwargs)

        monkeypatch.setattr(torch.fft, name, recording)
    return seen


def test_encoder_bf16_autocast_runs_ffts_in_fp32(monkeypatch):
    mod = encoder_module()
    x = torch.randn(2, 40, D)
    reference = mod(x)
    seen = record_fft_input_dtypes(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert seen and set(seen) <= {torch.float32, torch.complex64}
    assert torch.isfinite(y.float()).all()
    # bf16 projections and attention: close to the fp32 result, not bitwise.
    assert (y.float() - reference).abs().mean() < 0.1


def test_encoder_rejects_length_beyond_config():
    mod = encoder_module()
    with pytest.raises(ValueError, match="max_encoder_length"):
        mod(torch.randn(1, 65, D))


@pytest.mark.parametrize("n_fft", [1, 2, 4, 16, 64, 1024, 8192])
def test_octave_bands_cover_every_bin_exactly_once(n_fft):
    bands = octave_bands(n_fft)
    n_bins = n_fft // 2 + 1
    covered = torch.cat([torch.arange(lo, hi) for lo, hi in bands])
    assert torch.equal(covered, torch.arange(n_bins))
    assert bands[0] == (0, 1) or n_bins <= 2
    for b, (lo, hi) in enumerate(bands[1:-1], start=1):
        assert (lo, hi) == (2 ** (b - 1), 2 ** b)


@pytest.mark.parametrize("n_fft,band_block", [(64, 8), (1024, 64), (8192, 64), (8192, 7)])
def test_attention_blocks_partition_bins_within_bands(n_fft, band_block):
    bands = octave_bands(n_fft)
    groups = band_block_groups(bands, band_block)
    flat = torch.cat([g.reshape(-1) for g in groups])
    assert torch.equal(flat.sort().values, torch.arange(n_fft // 2 + 1))
    band_of = torch.empty(n_fft // 2 + 1, dtype=torch.long)
    for b, (lo, hi) in enumerate(bands):
        band_of[lo:hi] = b
    for g in groups:
        assert g.shape[1] <= band_block
        # a block never crosses a band edge and holds consecutive bins
        assert (band_of[g] == band_of[g[:, :1]]).all()
        assert (g.diff(dim=1) == 1).all()
    # one attention call per group: O(log n_fft) calls
    assert len(groups) <= math.log2(n_fft) + 3


def test_forward_makes_one_attention_call_per_block_group(monkeypatch):
    mod = encoder_module()
    calls = []
    original = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    mod(torch.randn(2, 50, D))
    groups = mod.block_groups()
    assert len(calls) == len(groups) == 4
    # each call batches all blocks of its size: (B * blocks, heads, size, d_head)
    assert [c[0] for c in calls] == [2 * g.shape[0] for g in groups]
    assert [c[2] for c in calls] == [g.shape[1] for g in groups]


def test_encoder_mixes_the_whole_sequence():
    mod = encoder_module()
    x = torch.randn(1, 40, D)
    x2 = x.clone()
    x2[:, 35] += 1.0
    assert (mod(x)[:, 0] - mod(x2)[:, 0]).abs().max() > 1e-4


def test_encoder_padding_content_never_reaches_real_positions():
    mod = encoder_module()
    mask = prefix_mask([30, 12], 40)
    x = torch.randn(2, 40, D)
    x2 = torch.where(mask[..., None], x, 100 * torch.randn_like(x))
    y, y2 = mod(x, mask), mod(x2, mask)
    assert torch.allclose(y[mask], y2[mask], atol=1e-5)


def test_encoder_real_outputs_independent_of_trailing_padding():
    mod = encoder_module()
    a, b = torch.randn(1, 20, D), torch.randn(1, 37, D)
    alone = mod(a)
    batch = torch.cat([F.pad(a, (0, 0, 0, 17)), b])
    y = mod(batch, prefix_mask([20, 37], 37))
    assert torch.allclose(y[0, :20], alone[0], atol=1e-5)


def test_encoder_gradients_reach_every_parameter():
    mod = encoder_module().train()
    x = torch.randn(2, 40, D, requires_grad=True)
    mod(x, prefix_mask([40, 30], 40)).square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name
    assert torch.isfinite(x.grad).all()


def test_encoder_zero_input_has_finite_gradients():
    mod = encoder_module().train()
    x = torch.zeros(1, 16, D, requires_grad=True)
    mod(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters() if p.grad is not None)
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------- causal form


def causal_module(seed: int = 0) -> FrequencyHyenaAttention:
    """An :func:`~test_model.awaken`-ed Hyena operator (its skip term D starts at 0)."""
    torch.manual_seed(seed)
    return awaken(FrequencyHyenaAttention(make_cfg(), causal=True), seed).eval()


def test_causal_constructor_delegates_to_hyena_operator():
    mod = causal_module()
    assert isinstance(mod.hyena, HyenaLongConvolution)
    y = mod(torch.randn(2, 32, D))
    assert y.shape == (2, 32, D)
    with pytest.raises(ValueError, match="max_decoder_length"):
        mod(torch.randn(1, 33, D))


def test_causal_form_is_causal():
    mod = causal_module()
    x = torch.randn(2, 32, D)
    y = mod(x)
    for t in (0, 7, 30):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        y2 = mod(x2)
        # exact up to the FFT's float32 round-off, which spreads over all outputs
        assert torch.allclose(y[:, :t + 1], y2[:, :t + 1], atol=1e-5)
        assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:], atol=1e-3)


def test_causal_form_reaches_far_back():
    mod = causal_module()
    x = torch.randn(1, 32, D)
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert (mod(x)[:, 31] - mod(x2)[:, 31]).abs().max() > 1e-4


def test_causal_step_matches_forward():
    mod = causal_module()
    x = torch.randn(3, 32, D)
    with torch.no_grad():
        full = mod(x)
        state = mod.init_state(3, x.device, x.dtype)
        outs = []
        for pos in range(32):
            y_t, state = mod.step(x[:, pos:pos + 1], state, pos)
            outs.append(y_t)
    stepped = torch.cat(outs, dim=1)
    assert stepped.shape == full.shape
    assert torch.allclose(stepped, full, atol=1e-5)


def test_causal_step_leaves_passed_state_unchanged_and_reorders():
    mod = causal_module()
    x = torch.randn(2, 4, D)
    with torch.no_grad():
        state = mod.init_state(2, x.device, x.dtype)
        for pos in range(3):
            _, state = mod.step(x[:, pos:pos + 1], state, pos)
        before = {k: v.clone() for k, v in state.items()}
        y_a, _ = mod.step(x[:, 3:4], state, 3)
        assert all(torch.equal(before[k], state[k]) for k in state)
        swapped = {k: v.index_select(0, torch.tensor([1, 0])) for k, v in state.items()}
        y_b, _ = mod.step(x[[1, 0], 3:4], swapped, 3)
    assert torch.allclose(y_a[[1, 0]], y_b, atol=1e-6)


def test_causal_gradients_reach_every_parameter():
    mod = causal_module().train()
    mod(torch.randn(2, 32, D)).square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------- embedding


def test_encoder_embedding_shapes_and_loss():
    emb = embedding(causal=False)
    ids = torch.randint(2, 64, (2, 40))
    x, recon = emb(ids, prefix_mask([40, 22], 40))
    assert x.shape == (2, 40, D) and x.dtype == torch.float32
    assert recon.dim() == 0 and recon.item() >= 0 and torch.isfinite(recon)


def test_encoder_embedding_padding_content_changes_neither_output_nor_loss():
    emb = embedding(causal=False)
    mask = prefix_mask([40, 22], 40)
    ids = torch.randint(2, 64, (2, 40))
    ids2 = torch.where(mask, ids, torch.randint(2, 64, (2, 40)))
    x, recon = emb(ids, mask)
    x2, recon2 = emb(ids2, mask)
    assert torch.allclose(x[mask], x2[mask], atol=1e-5)
    assert torch.allclose(recon, recon2, atol=1e-6)


def test_encoder_embedding_real_outputs_independent_of_trailing_padding():
    emb = embedding(causal=False)
    a, b = torch.randint(2, 64, (1, 20)), torch.randint(2, 64, (1, 45))
    alone, recon_alone = emb(a)
    batch = torch.cat([F.pad(a, (0, 25)), b])
    x, _ = emb(batch, prefix_mask([20, 45], 45))
    assert torch.allclose(x[0, :20], alone[0], atol=1e-5)
    _, recon_padded = emb(F.pad(a, (0, 25)), prefix_mask([20], 45))
    assert torch.allclose(recon_padded, recon_alone, atol=1e-6)


def test_embedding_gradients_reach_every_parameter():
    for causal in (False, True):
        emb = embedding(causal=causal).train()
        ids = torch.randint(2, 64, (2, 32))
        mask = None if causal else prefix_mask([32, 20], 32)
        x, recon = emb(ids, mask)
        (x.square().sum() + recon).backward()
        for name, p in emb.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (causal, name)
            assert torch.isfinite(p.grad).all(), (causal, name)


def test_recon_loss_is_masked_mean_abs_error():
    emb = embedding(causal=False)
    mask = prefix_mask([40, 9], 40)
    ids = torch.randint(2, 64, (2, 40))
    x_proj, recon = emb(ids, mask)
    # X_3, Y and R recomputed by hand from the module's own layers
    x = emb.token_embedding(ids) + emb.position_embedding(torch.arange(40))
    h = F.gelu(emb._conv(emb.conv1, x, mask))
    x3 = x * mask[..., None] + emb.conv_gain * emb.norm(F.gelu(emb._conv(emb.conv2, h, mask)))
    y = x3 + emb.frequency_gain * emb.frequency(x3, mask)
    r = emb.proj_norm(emb.proj(emb._compress(y, mask)))
    torch.testing.assert_close(x_proj, y + emb.proj_gain * r)
    expected = (r - x3).abs()[mask].mean()
    assert torch.allclose(recon, expected, atol=1e-6)


def test_decoder_embedding_is_causal():
    emb = embedding(causal=True)
    ids = torch.randint(2, 64, (2, 32))
    x, _ = emb(ids)
    t = 10
    ids2 = ids.clone()
    ids2[:, t + 1:] = torch.randint(2, 64, (2, 32 - t - 1))
    x2, _ = emb(ids2)
    assert torch.allclose(x[:, :t + 1], x2[:, :t + 1], atol=1e-5)


def test_decoder_embedding_step_matches_forward():
    emb = embedding(causal=True, embed_kernel_size=5)
    ids = torch.randint(2, 64, (2, 32))
    with torch.no_grad():
        full, _ = emb(ids)
        state = emb.init_state(2, ids.device, torch.float32)
        outs = []
        for pos in range(32):
            x_t, state = emb.step(ids[:, pos:pos + 1], state, pos)
            outs.append(x_t)
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-5)


def test_encoder_embedding_has_no_incremental_state():
    with pytest.raises(RuntimeError):
        embedding(causal=False).init_state(1, torch.device("cpu"), torch.float32)


# ------------------------------------------------------------- compression


def test_compression_kept_bins_follow_per_sequence_complexity():
    emb = embedding(causal=False, min_compression_ratio=0.25, base_compression_ratio=1.0)
    n_bins = next_power_of_two(64) // 2 + 1
    t = torch.arange(40, dtype=torch.float32)[:, None]
    smooth = torch.sin(2 * math.pi * t / 40 + torch.arange(D)) + 0.01 * torch.randn(40, D)
    sign = torch.where(torch.arange(40) % 2 == 0, 1.0, -1.0)[:, None]
    rough = sign * torch.randn(D) + 0.01 * torch.randn(40, D)
    batch = torch.stack([smooth, rough])
    keep = emb.kept_bins(batch)
    assert keep.shape == (2,) and keep.dtype == torch.long
    assert keep[0] < keep[1]
    assert math.ceil(0.25 * n_bins) <= keep[0] < 0.5 * n_bins
    assert keep[1] > 0.75 * n_bins
    assert keep[0] == emb.kept_bins(smooth[None])[0]
    assert keep[1] == emb.kept_bins(rough[None])[0]
    # with padding after the smooth sequence, its count is unchanged
    padded = torch.stack([F.pad(smooth, (0, 0, 0, 10)), F.pad(rough, (0, 0, 0, 10))])
    padded[0, 40:] = 7.0
    assert torch.equal(emb.kept_bins(padded, prefix_mask([40, 50], 50))[:1], keep[:1])


def test_compression_actually_truncates_spectrum():
    full = embedding(causal=False, min_compression_ratio=1.0, base_compression_ratio=1.0)
    cut = embedding(causal=False, min_compression_ratio=0.1, base_compression_ratio=0.1)
    ids = torch.randint(2, 64, (1, 40))
    assert not torch.allclose(full(ids)[0], cut(ids)[0], atol=1e-3)
