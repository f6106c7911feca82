"""Properties of the whole LiquidFoundationModelOptimized (docs/model.md, "The whole model")."""

import dataclasses

import pytest
import torch

from liquid_dist.config import ConfigError, ModelConfig, MoEConfig
from liquid_dist.model import LiquidFoundationModelOptimized, NonFiniteError
from liquid_dist.model.generation import IncrementalDecoder, choose_next

VOCAB = 50


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, n_encoder_layers=2,
        n_decoder_layers=2, ffn_dim=64, max_encoder_length=32, max_decoder_length=24,
        window=4, freq_heads=2, band_block=4, hyena_filter_dim=8, dropout=0.0,
        moe=MoEConfig(num_experts=4, top_k=1, k_max=2, expert_ffn_dim=32),
    )
    base.update(kw)
    return ModelConfig(**base)


def awaken(module: torch.nn.Module, seed: int = 0, std: float = 0.5) -> torch.nn.Module:
    """``module`` with every parameter that starts at exactly zero (residual gains, the
    gated convolution's LayerNorm gain, the LSTM's output Linear, biases, offset convs)
    drawn from N(0, std²), as after some training.

    A fresh model's zero-started branches add nothing, so a property of the whole model
    (causality, incremental decoding, padding, gradient flow, conversion) tested on one
    would not see them; tests of those properties use an awakened model.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def make_model(seed=0, **kw) -> LiquidFoundationModelOptimized:
    """A small model, :func:`awaken`-ed, in eval mode."""
    torch.manual_seed(seed)
    return awaken(LiquidFoundationModelOptimized(small_cfg(**kw)), seed).eval()


def batch(b=3, le=20, ld=12, seed=1, pad=0):
    """Random ids; the last row's final ``pad`` encoder positions are padding."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(4, VOCAB, (b, le), generator=g)
    dec = torch.randint(4, VOCAB, (b, ld), generator=g)
    dec[:, 0] = 0
    labels = torch.randint(4, VOCAB, (b, ld), generator=g)
    mask = torch.ones(b, le, dtype=torch.bool)
    if pad:
        mask[-1, le - pad:] = False
    return enc, dec, mask, labels


def test_forward_shapes_dtypes_and_aux_terms():
    model = make_model()
    enc, dec, mask, labels = batch()
    out = model(enc, dec, encoder_attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, 12, VOCAB) and out.logits.dtype == torch.float32
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    keys = set(out.aux)
    assert "ce" in keys
    for part in ("recon", "entropy", "overuse"):
        assert any(part in k for k in keys), part
    assert all(v.dim() == 0 for v in out.aux.values())
    expected = out.aux["ce"] + 0.1 * (out.aux["recon_encoder"] + out.aux["recon_decoder"]) \
        + 0.01 * out.aux["moe_entropy"] + 0.01 * out.aux["moe_overuse"]
    torch.testing.assert_close(out.loss, expected)
    assert len(out.expert_usage) == 4


def test_ignored_labels_do_not_count():
    model = make_model()
    enc, dec, mask, labels = batch()
    ref = model(enc, dec, mask, labels).aux["ce"]
    masked = labels.clone()
    masked[:, 6:] = -100
    partial = model(enc, dec, mask, masked).aux["ce"]
    logits = model(enc, dec, mask).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :6].reshape(-1, VOCAB),
                                               labels[:, :6].reshape(-1))
    torch.testing.assert_close(partial, manual)
    assert not torch.allclose(ref, partial)


def _dead_slices(grad: torch.Tensor) -> list[tuple[int, list[int]]]:
    """(dim, indices) of the slices along each dim of ``grad`` that are all zero."""
    dead = []
    for dim in range(grad.dim()):
        others = [d for d in range(grad.dim()) if d != dim]
        live = (grad.abs().sum(dim=others) if others else grad.abs()) > 0
        if not live.all():
            dead.append((dim, (~live).nonzero().flatten().tolist()))
    return dead


def test_gradients_reach_every_row_and_column_of_every_parameter():
    """Every slice of every parameter is live: a dead input feature or unit fails.

    The causal deformable convolution clamps a tap's sampling position at the
    output position, where the offset then gets no gradient; with max_offset 1 only
    the last tap can clamp, and only where its offset is positive."""
    model = make_model(max_offset=1.0).train()
    # full lengths, so that every learned position gets a gradient
    enc, dec, mask, labels = batch(b=4, le=32, ld=24)
    out = model(enc, dec, mask, labels)
    out.loss.backward()
    moe_layers = [m for m in model.modules() if m.__class__.__name__ == "MoELayer"]
    unused = {}  # expert tensors: an expert that received no token gets no gradient
    for moe, usage in zip(moe_layers, out.expert_usage, strict=True):
        assert (usage > 0).sum() >= 2, usage
        for p in moe.expert_parameters():
            unused[p] = usage == 0
    dead = {}
    for name, p in model.named_parameters():
        if p.grad is None or not torch.isfinite(p.grad).all():
            dead[name] = "no finite gradient"
            continue
        # softmax ignores a score shift shared by all keys of a query: the gradient
        # of a key bias is 0 up to round-off, whatever the batch
        if name.endswith("k_proj.bias"):
            continue
        grad = p.grad[~unused[p]] if p in unused else p.grad
        if name.endswith("frequency.qkv.bias"):  # fused [q | k | v]: leave out the k third
            d = grad.shape[0] // 3
            grad = torch.cat([grad[:d], grad[2 * d:]])
        if _dead_slices(grad):
            dead[name] = _dead_slices(grad)
    assert not dead, dead


def test_decoder_is_causal():
    model = make_model()
    enc, dec, mask, _ = batch()
    ref = model(enc, dec, mask).logits
    for t in (0, 3, 7):
        changed = dec.clone()
        changed[:, t + 1:] = torch.randint(4, VOCAB, changed[:, t + 1:].shape)
        out = model(enc, changed, mask).logits
        torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:])


def test_padding_content_and_amount_do_not_change_logits():
    model = make_model()
    enc, dec, _, _ = batch(b=2, le=16)
    mask = torch.ones_like(enc, dtype=torch.bool)
    mask[0, 10:] = False
    ref = model(enc, dec, mask).logits
    noisy = enc.clone()
    noisy[0, 10:] = torch.randint(4, VOCAB, (6,))
    torch.testing.assert_close(model(noisy, dec, mask).logits, ref, atol=1e-5, rtol=1e-5)
    # the same sequence with no padding at all, and with more padding
    alone = model(enc[:1, :10], dec[:1], mask[:1, :10]).logits
    torch.testing.assert_close(alone, ref[:1], atol=1e-5, rtol=1e-5)
    longer = torch.cat([enc[:1, :10], torch.full((1, 20), 7)], dim=1)
    lmask = torch.zeros_like(longer, dtype=torch.bool)
    lmask[:, :10] = True
    torch.testing.assert_close(model(longer, dec[:1], lmask).logits, ref[:1], atol=1e-5, rtol=1e-5)


def test_sequence_logits_do_not_depend_on_batch_neighbours():
    model = make_model()
    enc, dec, mask, _ = batch(b=3)
    full = model(enc, dec, mask).logits
    for i in range(3):
        single = model(enc[i:i + 1], dec[i:i + 1], mask[i:i + 1]).logits
        torch.testing.assert_close(single, full[i:i + 1], atol=1e-5, rtol=1e-5)


def test_encoder_output_reaches_decoder():
    model = make_model()
    enc, dec, mask, _ = batch()
    other = torch.randint(4, VOCAB, enc.shape)
    assert not torch.allclose(model(enc, dec, mask).logits, model(other, dec, mask).logits)


def test_incremental_logits_equal_teacher_forcing():
    model = make_model()
    enc, dec, mask, _ = batch(b=2, le=16, ld=20)
    mask[1, 12:] = False
    ref = model(enc, dec, mask).logits
    inc = IncrementalDecoder(model)
    inc.start(enc, mask)
    steps = torch.stack([inc.step(dec[:, p], p) for p in range(dec.shape[1])], dim=1)
    torch.testing.assert_close(steps, ref, atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_teacher_forced_argmax():
    model = make_model()
    enc, _, mask, _ = batch(b=2, le=16)
    out = model.generate(enc, mask, max_new_tokens=15)
    assert out.shape == (2, 16) and (out[:, 0] == 3).all()  # the prefix-LM start (bos)
    logits = model(enc, out[:, :-1], mask).logits
    assert torch.equal(logits.argmax(-1), out[:, 1:])


def test_sampled_generation_equals_sampling_teacher_forced_logits():
    model = make_model()
    enc, _, mask, _ = batch(b=2, le=16)
    out = model.generate(enc, mask, max_new_tokens=15, do_sample=True, temperature=0.8,
                         top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(5))
    logits = model(enc, out[:, :-1], mask).logits
    g = torch.Generator().manual_seed(5)
    replay = torch.stack([choose_next(logits[:, p], True, 0.8, 20, 0.9, g)
                          for p in range(15)], dim=1)
    assert torch.equal(replay, out[:, 1:])


def test_generation_stops_at_eos_and_pads_after():
    model = make_model()
    enc, _, mask, _ = batch(b=2, le=16)
    free = model.generate(enc, mask, max_new_tokens=10)
    eos = int(free[0, 3])
    out = model.generate(enc, mask, max_new_tokens=10, eos_token_id=eos)
    row = out[0].tolist()
    first = row.index(eos, 1)
    assert all(t == 0 for t in row[first + 1:])


def test_beam_search_finds_at_least_the_greedy_score():
    model = make_model()
    enc, _, mask, _ = batch(b=2, le=16)

    def logprob(ids):
        lp = torch.log_softmax(model(enc, ids[:, :-1], mask).logits, -1)
        return lp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)

    greedy = model.generate(enc, mask, max_new_tokens=8)
    beam = model.generate(enc, mask, max_new_tokens=8, num_beams=4)
    assert beam.shape == greedy.shape
    assert (logprob(beam) >= logprob(greedy) - 1e-4).all()
    one_beam = model.generate(enc, mask, max_new_tokens=8, num_beams=1)
    assert torch.equal(one_beam, greedy)


def test_generation_rejects_length_beyond_positions():
    model = make_model()
    enc, _, mask, _ = batch(b=1, le=8)
    with pytest.raises(ValueError, match="max_decoder_length"):
        model.generate(enc, mask, max_new_tokens=25)


def test_activation_checkpointing_gives_same_gradients():
    enc, dec, mask, labels = batch()
    grads = []
    for ckpt in (False, True):
        model = make_model(activation_checkpointing=ckpt).train()
        model(enc, dec, mask, labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5,
                                   msg=name)


def test_strict_mode_names_the_module_with_non_finite_values():
    model = make_model(check_finite=True)
    enc, dec, mask, _ = batch()
    model(enc, dec, mask)  # finite: no error
    with torch.no_grad():
        model.decoder.blocks[1].ffn.fc1.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="decoder.blocks.1"):
        model(enc, dec, mask)


def test_bf16_autocast_forward_is_finite():
    model = make_model()
    enc, dec, mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(enc, dec, mask, labels)
    assert torch.isfinite(out.loss)


def test_unresolved_vocab_is_a_config_error():
    with pytest.raises(ConfigError, match="vocab_size"):
        LiquidFoundationModelOptimized(dataclasses.replace(small_cfg(), vocab_size="auto"))


def test_tiny_model_memorises_a_fixed_batch():
    torch.manual_seed(0)
    model = LiquidFoundationModelOptimized(small_cfg()).train()
    enc, dec, mask, _ = batch(b=4, le=24, ld=16, seed=3)
    labels = torch.cat([dec[:, 1:], torch.full((4, 1), 1)], dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = None
    for _ in range(150):
        out = model(enc, dec, mask, labels)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        start = start if start is not None else out.aux["ce"].item()
    final = model.eval()(enc, dec, mask, labels).aux["ce"].item()
    assert final < 0.3 * start, (start, final)
