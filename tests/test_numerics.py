"""Numerics: non-finite activations and the float32 islands (docs/model.md, "Precision").

* A NaN/Inf in the residual stream is replaced by 0 at its own position (it
  neither erases nor reaches the neighbours) and counted in
  ``ModelOutput.aux["nonfinite_activations"]``.
* Under bf16 parameters (DeepSpeed's bf16 casts every parameter) the LSTM
  recurrence, the Hyena filter MLP and the FFTs still run in float32, in
  ``forward`` and in the incremental ``step`` paths.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_frequency import record_fft_input_dtypes
from test_model import VOCAB, awaken, small_cfg

from liquid_dist.config import ModelConfig
from liquid_dist.model import LiquidFoundationModelOptimized, NonFiniteError
from liquid_dist.model.frequency import HyenaLongConvolution
from liquid_dist.model.memory import EnhancedLSTM

POS, CHANNEL = 3, 5  # where the bad value is written: sequence 0, position 3, channel 5


def make_model(**kw) -> LiquidFoundationModelOptimized:
    torch.manual_seed(0)
    return awaken(LiquidFoundationModelOptimized(
        small_cfg(max_encoder_length=16, max_decoder_length=16, **kw))).eval()


def batch(b: int = 2, le: int = 8, ld: int = 8):
    g = torch.Generator().manual_seed(1)
    enc = torch.randint(4, VOCAB, (b, le), generator=g)
    dec = torch.randint(4, VOCAB, (b, ld), generator=g)
    dec[:, 0] = 0
    labels = torch.randint(4, VOCAB, (b, ld), generator=g)
    return enc, dec, torch.ones(b, le, dtype=torch.bool), labels


def run(model, stack: str, value: float | None):
    """The model's output and block 1's output, with ``value`` written after block 0."""
    blocks = getattr(model, stack).blocks
    seen = {}

    def write(module, args, out):
        x, aux = out
        x = x.clone()
        x[0, POS, CHANNEL] = value
        return x, aux

    def capture(module, args, out):
        seen["x"] = out[0]

    handles = [blocks[1].register_forward_hook(capture)]
    if value is not None:
        handles.append(blocks[0].register_forward_hook(write))
    try:
        out = model(*batch())
    finally:
        for h in handles:
            h.remove()
    return out, seen["x"]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_a_non_finite_activation_is_zeroed_in_place_and_counted(stack: str, value: float):
    model = make_model()
    clean, x_clean = run(model, stack, None)
    zeroed, x_zeroed = run(model, stack, 0.0)
    bad, x_bad = run(model, stack, value)
    # Exactly as if the bad value had been 0: nothing else was touched.
    assert torch.equal(x_bad, x_zeroed)
    torch.testing.assert_close(bad.logits, zeroed.logits, atol=0, rtol=0)
    assert torch.isfinite(x_bad).all() and torch.isfinite(bad.loss)
    # No position of the sequence was erased ...
    assert (x_bad[0] != 0).any(dim=-1).all()
    # ... and what the bad value cannot reach is unchanged: the other sequence,
    # and in the (causal) decoder every earlier position. Up to float32 round-off:
    # those rows share the experts' grouped GEMMs with the changed one, and a GEMM's
    # blocking depends on how many rows each expert receives.
    torch.testing.assert_close(x_bad[1], x_clean[1], rtol=1e-5, atol=1e-6)
    if stack == "decoder":
        torch.testing.assert_close(x_bad[0, :POS], x_clean[0, :POS], rtol=1e-5, atol=1e-6)
    counts = [out.aux["nonfinite_activations"] for out in (clean, zeroed, bad)]
    assert all(c.dtype == torch.int64 and c.dim() == 0 for c in counts)
    assert [int(c) for c in counts] == [0, 0, 1]
    # the count is no loss term
    torch.testing.assert_close(bad.aux_loss, zeroed.aux_loss, atol=0, rtol=0)


def test_strict_mode_raises_naming_the_block_input():
    model = make_model(check_finite=True)
    with pytest.raises(NonFiniteError, match="decoder.blocks.1.input"):
        run(model, "decoder", float("inf"))


# ----------------------------------------------------- float32 under bf16 params


def _bf16_and_reference(module: torch.nn.Module):
    """``module`` cast to bf16 (parameters and buffers) and an fp32 copy of its bf16 weights."""
    bf16 = module.to(torch.bfloat16)
    ref = copy.deepcopy(bf16).float()
    return bf16, ref


def _assert_bf16_grads(module: torch.nn.Module, prefix: str = "") -> None:
    for name, p in module.named_parameters():
        if name.startswith(prefix):
            assert p.dtype == torch.bfloat16, name
            assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
            assert p.grad.abs().sum() > 0, name


def _lstm_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=16, n_heads=2, n_kv_heads=1, ffn_dim=32,
                       lstm_layers=2)


def test_lstm_recurrence_runs_in_fp32_under_bf16_parameters():
    torch.manual_seed(0)
    lstm, ref = _bf16_and_reference(awaken(EnhancedLSTM(_lstm_cfg())))
    x = torch.randn(2, 64, 16).bfloat16()
    out, (h, c) = lstm.lstms[0](x)
    assert out.dtype == h.dtype == c.dtype == torch.float32
    want, (h_ref, c_ref) = ref.lstms[0](x.float())
    # fp32 round-off, far below bf16's (about 4e-3 relative per value)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((h, c), (h_ref, c_ref), atol=1e-6, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(lstm.lstms[0](x)[0], want, atol=1e-6, rtol=1e-5)
    y = lstm(x)
    assert y.dtype == torch.bfloat16  # back in the activation dtype
    y.float().square().sum().backward()
    _assert_bf16_grads(lstm)


def test_lstm_step_keeps_an_fp32_state_under_bf16_parameters():
    torch.manual_seed(1)
    lstm, _ = _bf16_and_reference(awaken(EnhancedLSTM(_lstm_cfg())))
    x = torch.randn(2, 12, 16).bfloat16()
    with torch.no_grad():
        full = lstm(x)
        _, (h0, c0) = lstm.lstms[0](lstm.norms[0](x))
        state = lstm.init_state(2, "cpu", torch.bfloat16)
        steps = []
        for pos in range(x.shape[1]):
            y, state = lstm.step(x[:, pos:pos + 1], state, pos)
            steps.append(y)
    assert state["h"].dtype == state["c"].dtype == torch.float32
    # layer 0 sees the same inputs in both paths: its state agrees to fp32 round-off
    torch.testing.assert_close(state["h"][:, 0], h0[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state["c"][:, 0], c0[0], atol=1e-6, rtol=1e-5)
    stepped = torch.cat(steps, dim=1)
    assert stepped.dtype == torch.bfloat16
    # the MLPs run in bf16: an fp32-ulp difference may flip one bf16 rounding, which the
    # MLP's two bf16 matmuls carry to a few bf16 ulps of the output (0.0078 each at 1)
    torch.testing.assert_close(stepped, full, atol=4e-2, rtol=2e-2)


def _hyena_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=16, n_heads=2, n_kv_heads=1, ffn_dim=32,
                       max_decoder_length=64, hyena_filter_dim=16)


def test_hyena_filter_and_ffts_run_in_fp32_under_bf16_parameters(monkeypatch):
    torch.manual_seed(2)
    hyena, ref = _bf16_and_reference(HyenaLongConvolution(_hyena_cfg()))
    taps = hyena.long_filter(64)
    assert taps.dtype == torch.float32
    torch.testing.assert_close(taps, ref.long_filter(64), atol=1e-6, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(hyena.long_filter(64), taps, atol=0, rtol=0)
    seen = record_fft_input_dtypes(monkeypatch)
    y = hyena(torch.randn(2, 64, 16).bfloat16())
    assert y.dtype == torch.bfloat16
    assert seen and set(seen) <= {torch.float32, torch.complex64}
    y.float().square().sum().backward()
    _assert_bf16_grads(hyena, prefix="filter_mlp")


def test_hyena_step_uses_the_fp32_filter_under_bf16_parameters():
    torch.manual_seed(3)
    hyena, ref = _bf16_and_reference(HyenaLongConvolution(_hyena_cfg()))
    state = hyena.init_state(2, torch.device("cpu"), torch.bfloat16)
    assert state["u"].dtype == state["filter_rev"].dtype == torch.float32
    torch.testing.assert_close(state["filter_rev"][0], ref.long_filter(64).flip(0),
                               atol=1e-6, rtol=1e-5)
    x = torch.randn(2, 10, 16).bfloat16()
    with torch.no_grad():
        full = hyena(x)
        steps = []
        for pos in range(x.shape[1]):
            y, state = hyena.step(x[:, pos:pos + 1], state, pos)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-2, rtol=2e-2)


def test_bf16_parameter_model_trains_with_fp32_islands():
    model = make_model().train().to(torch.bfloat16)
    out = model(*batch())
    assert torch.isfinite(out.loss) and int(out.aux["nonfinite_activations"]) == 0
    out.loss.backward()
    _assert_bf16_grads(model.decoder.memory)
    _assert_bf16_grads(model.decoder.embedding, prefix="frequency.hyena.filter_mlp")
