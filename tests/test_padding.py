"""Padding is nothing (docs/model.md, "Padding"): neither its content nor its amount, on
either side, changes a logit, a loss term or an expert statistic, and the MoE
layers never compute or exchange a padding row."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_model import awaken

from liquid_dist.config import load_config
from liquid_dist.model import LiquidFoundationModelOptimized, MoELayer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB = 64
B, LE, LD = 3, 40, 24


@pytest.fixture(scope="module")
def model() -> LiquidFoundationModelOptimized:
    cfg = load_config(CONFIGS / "tiny.yaml", [f"model.vocab_size={VOCAB}"]).model
    torch.manual_seed(0)
    return awaken(LiquidFoundationModelOptimized(cfg)).eval()


def padded_batch(enc_lengths=(LE, 30, 10), dec_lengths=(LD, 15, 5), seed=1):
    """Right-padded batch as the data pipeline makes it: pad id 0, labels -100 at padding."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(4, VOCAB, (B, LE), generator=g)
    enc_mask = torch.arange(LE)[None, :] < torch.tensor(enc_lengths)[:, None]
    enc[~enc_mask] = 0
    labels = torch.randint(4, VOCAB, (B, LD), generator=g)
    labels[torch.arange(LD)[None, :] >= torch.tensor(dec_lengths)[:, None]] = -100
    dec = torch.cat([torch.zeros(B, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], dim=1)
    dec[labels == -100] = 0
    return enc, enc_mask, dec, labels


def noisy(ids: torch.Tensor, where: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """ids with random token ids at the positions ``where``."""
    g = torch.Generator().manual_seed(seed)
    out = ids.clone()
    out[where] = torch.randint(4, VOCAB, (int(where.sum()),), generator=g)
    return out


def assert_same(a, b):
    """Equal up to float summation order (sums over different amounts of zeros)."""
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def assert_same_outputs(out, ref, logits=True):
    """Every loss term and expert statistic (and the logits) of two ModelOutputs agree."""
    assert out.aux.keys() == ref.aux.keys()
    for name in ref.aux:
        assert_same(out.aux[name], ref.aux[name])
    assert_same(out.loss, ref.loss)
    assert_same(out.aux_loss, ref.aux_loss)
    assert_same(out.ce_sum, ref.ce_sum)
    assert out.num_targets == ref.num_targets
    assert len(out.expert_usage) == len(ref.expert_usage)
    for u, r in zip(out.expert_usage, ref.expert_usage, strict=True):
        assert_same(u, r)
    if logits:
        assert_same(out.logits, ref.logits)


@torch.no_grad()
def test_decoder_padding_content_changes_nothing(model):
    enc, enc_mask, dec, labels = padded_batch()
    pad = labels == -100
    ref = model(enc, dec, enc_mask, labels)
    changed = noisy(dec, pad)
    # logits at every position, padding included, are content-independent
    assert_same_outputs(model(enc, changed, enc_mask, labels), ref)
    # the change is one the model would see if padding were treated as real
    real = model(enc, changed, enc_mask, labels, decoder_attention_mask=torch.ones_like(pad))
    assert not torch.allclose(real.aux["recon_decoder"], ref.aux["recon_decoder"])


@torch.no_grad()
def test_encoder_padding_content_changes_nothing(model):
    enc, enc_mask, dec, labels = padded_batch()
    ref = model(enc, dec, enc_mask, labels)
    changed = noisy(enc, ~enc_mask)
    assert_same_outputs(model(changed, dec, enc_mask, labels), ref)
    unmasked = model(changed, dec, torch.ones_like(enc_mask), labels)
    assert not torch.allclose(unmasked.aux["recon_encoder"], ref.aux["recon_encoder"])


def record_dispatch(model) -> list[int]:
    """Route every MoE layer's rows through the expert-parallel seam; returns the row counts."""
    rows = []

    def exchange(x_sorted, tokens_per_expert, layer):
        rows.append(x_sorted.shape[0])
        assert int(tokens_per_expert.sum()) == x_sorted.shape[0]
        return layer.local_expert_forward(x_sorted, tokens_per_expert)

    for layer in model.modules():
        if isinstance(layer, MoELayer):
            layer.expert_parallel = exchange
    return rows


@torch.no_grad()
def test_mixed_batch_padding_amount_and_content_change_nothing(model):
    enc, enc_mask, dec, labels = padded_batch()
    rows = record_dispatch(model)
    try:
        ref = model(enc, dec, enc_mask, labels)
        ref_rows = list(rows)
        # more padding on both sides, with random content in all of it
        extra_e, extra_d = 24, 16
        enc_long = noisy(F.pad(enc, (0, extra_e)), F.pad(~enc_mask, (0, extra_e), value=True))
        mask_long = F.pad(enc_mask, (0, extra_e), value=False)
        labels_long = F.pad(labels, (0, extra_d), value=-100)
        dec_long = noisy(F.pad(dec, (0, extra_d)), labels_long == -100, seed=3)
        rows.clear()
        out = model(enc_long, dec_long, mask_long, labels_long)
        assert rows == ref_rows  # padding rows reach no expert, wherever it is
        assert_same_outputs(out, ref, logits=False)
        # a longer decoder runs the long convolution at a larger FFT size
        torch.testing.assert_close(out.logits[:, :LD], ref.logits, atol=1e-5, rtol=1e-5)
        rows.clear()
        model(enc_long, dec_long, torch.ones_like(mask_long), labels_long,
              decoder_attention_mask=torch.ones_like(labels_long))
        assert sum(rows) > sum(ref_rows)
    finally:
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                layer.expert_parallel = None
    # each row's real logits are those of the row alone, without padding (other
    # shapes run other kernel blockings, hence test_model.py's tolerance)
    for b in range(B):
        ne, nd = int(enc_mask[b].sum()), int((labels[b] != -100).sum())
        alone = model(enc[b:b + 1, :ne], dec[b:b + 1, :nd], labels=labels[b:b + 1, :nd])
        torch.testing.assert_close(alone.logits[0], ref.logits[b, :nd], atol=1e-5, rtol=1e-5)


def test_moe_padding_rows_are_neither_computed_nor_exchanged(model):
    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    d = layer.router.in_features
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 1 + [False] * 5])
    torch.manual_seed(4)
    x = torch.randn(2, 6, d)
    x[~mask] = 1e3  # a value no real row holds
    sent = []

    def exchange(x_sorted, tokens_per_expert, layer):
        sent.append((x_sorted, tokens_per_expert))
        return layer.local_expert_forward(x_sorted, tokens_per_expert)

    layer.expert_parallel = exchange
    try:
        y_real, aux_real = layer(x[mask])  # only the real rows, as (N, d)
        y, aux = layer(x, mask)
        layer(x)  # without the mask the padding rows are dispatched
    finally:
        layer.expert_parallel = None
    (x_real, per_expert_real), (x_sent, per_expert), (x_all, _) = sent
    assert x_sent.shape[0] == x_real.shape[0] < x_all.shape[0]
    assert torch.equal(per_expert, per_expert_real)
    assert_same(x_sent, x_real)
    assert (x_sent != 1e3).all(dim=-1).all()
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert_same(y[mask], y_real)
    for name in aux:
        assert_same(aux[name], aux_real[name])


@torch.no_grad()
def test_explicit_decoder_mask_equals_derived_and_bad_shapes_raise(model):
    enc, enc_mask, dec, labels = padded_batch()
    ref = model(enc, dec, enc_mask, labels)
    explicit = (labels != -100).long()  # int masks are accepted too
    assert_same_outputs(model(enc, dec, enc_mask, labels, decoder_attention_mask=explicit), ref)
    # without labels the explicit mask alone gives the same logits
    assert_same(model(enc, dec, enc_mask, decoder_attention_mask=explicit).logits, ref.logits)
    with pytest.raises(ValueError, match=r"decoder_attention_mask shape \(3, 23\) != "
                                         r"decoder_input_ids shape \(3, 24\)"):
        model(enc, dec, enc_mask, labels, decoder_attention_mask=explicit[:, :-1])
    with pytest.raises(ValueError, match=r"encoder_attention_mask shape \(3, 39\) != "
                                         r"encoder_input_ids shape \(3, 40\)"):
        model(enc, dec, enc_mask[:, :-1], labels)


def test_ce_sum_num_targets_and_aux_loss(model):
    enc, enc_mask, dec, labels = padded_batch()
    out = model(enc, dec, enc_mask, labels)
    real = labels != -100
    assert out.num_targets.dtype == torch.int64 and out.num_targets.dim() == 0
    assert out.num_targets.item() == int(real.sum())
    assert out.ce_sum.dtype == torch.float32 and out.ce_sum.requires_grad
    per_token = F.cross_entropy(out.logits[real], labels[real], reduction="none")
    assert_same(out.ce_sum, per_token.sum())
    torch.testing.assert_close(out.ce_sum / out.num_targets, out.aux["ce"])
    cfg = model.cfg
    expected = (cfg.recon_loss_weight * (out.aux["recon_encoder"] + out.aux["recon_decoder"])
                + cfg.moe.entropy_loss_weight * out.aux["moe_entropy"]
                + cfg.moe.overuse_loss_weight * out.aux["moe_overuse"])
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.requires_grad
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.loss, out.aux["ce"] + out.aux_loss)
    with torch.no_grad():
        bare = model(enc, dec, enc_mask)
    assert bare.loss is None and bare.ce_sum is None and bare.num_targets is None
    assert bare.aux_loss is not None and "ce" not in bare.aux
