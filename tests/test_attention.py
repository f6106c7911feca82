"""Local GQA attention backends, the attention modules and cross-attention (DESIGN.md §2.3)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from liquid_dist.config import ModelConfig
from liquid_dist.model.attention import (
    CrossAttention,
    EnhancedLocalAttentionWithGQA,
    blocked_local_attention,
    choose_backend,
    local_attention,
    reference_local_attention,
)
from liquid_dist.model.utils import NonFiniteError

L = 13  # not a multiple of any block size used below
CPU_BACKENDS = ["blocked", "sdpa", "auto"]
WINDOWS = [1, 3, L - 1, L + 4]
HEADS = [(4, 2), (4, 1)]
MASKS = ["none", "right", "holes"]
TOL = dict(atol=1e-5, rtol=1e-5)


def _qkv(H: int, G: int, B: int = 3, length: int = L, D: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, length, H, D, generator=g, requires_grad=True)
    k = torch.randn(B, length, G, D, generator=g, requires_grad=True)
    v = torch.randn(B, length, G, D, generator=g, requires_grad=True)
    return q, k, v


def _mask(kind: str, B: int = 3, length: int = L, seed: int = 1) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "right":
        # Full row, a row padded after 7 tokens, and a row that is all padding.
        lengths = torch.tensor([length, 7, 0])[:B]
        return torch.arange(length)[None, :] < lengths[:, None]
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, length, generator=g) < 0.6


def _forward_and_grads(fn, q, k, v, seed: int = 2):
    out = fn(q, k, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    return out, grads


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, window=3, ffn_dim=64,
                max_encoder_length=32, max_decoder_length=32, attention_backend="blocked")
    base.update(kw)
    return ModelConfig(**base)


# ------------------------------------------------------------ local_attention


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backends_match_reference_forward_and_gradients(backend, causal, heads, window,
                                                             mask_kind):
    q, k, v = _qkv(*heads)
    mask = _mask(mask_kind)
    out, grads = _forward_and_grads(
        lambda q, k, v: local_attention(q, k, v, window=window, causal=causal, backend=backend,
                                        key_padding_mask=mask), q, k, v)
    ref, ref_grads = _forward_and_grads(
        lambda q, k, v: reference_local_attention(q, k, v, window, causal, mask), q, k, v)
    torch.testing.assert_close(out, ref, **TOL)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("block_size", [1, 4, 5, 12, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_blocked_matches_reference_for_any_block_size(block_size, causal):
    q, k, v = _qkv(4, 2)
    mask = _mask("right")
    for window in (0, 2, 6):
        out, grads = _forward_and_grads(
            lambda q, k, v, w=window: blocked_local_attention(q, k, v, w, causal, mask,
                                                              block_size=block_size), q, k, v)
        ref, ref_grads = _forward_and_grads(
            lambda q, k, v, w=window: reference_local_attention(q, k, v, w, causal, mask),
            q, k, v)
        torch.testing.assert_close(out, ref, **TOL)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, **TOL)


def test_reference_band_is_the_documented_window():
    # One head, values = one-hot positions: the output row of query i is the
    # attention distribution over keys, so its support is the visible set.
    length, window = 9, 2
    q = torch.zeros(1, length, 1, length)
    k = torch.zeros(1, length, 1, length)
    v = torch.eye(length).view(1, length, 1, length)
    for causal in (False, True):
        attn = reference_local_attention(q, k, v, window, causal)[0, :, 0]
        i = torch.arange(length)[:, None]
        j = torch.arange(length)[None, :]
        right = 0 if causal else window
        visible = (j >= i - window) & (j <= i + right)
        assert torch.equal(attn > 0, visible)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_queries_and_rows_without_keys_output_zero_with_finite_grads(backend):
    q, k, v = _qkv(4, 2)
    mask = _mask("right")
    for causal in (False, True):
        out, grads = _forward_and_grads(
            lambda q, k, v, c=causal: local_attention(q, k, v, window=1, causal=c,
                                                      backend=backend, key_padding_mask=mask),
            q, k, v)
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
        assert out[mask].abs().sum() > 0
        for grad in grads:
            assert torch.isfinite(grad).all()
        # The all-padding row gets no gradient at all.
        assert torch.equal(grads[0][2], torch.zeros_like(grads[0][2]))


def test_auto_picks_sdpa_for_short_and_blocked_for_long_sequences_on_cpu():
    short = torch.zeros(1, 7, 2, 4)
    long = torch.zeros(1, 40, 2, 4)
    assert choose_backend(short, window=3) == "sdpa"
    assert choose_backend(long, window=3) == "blocked"


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_gpu_only_backends_raise_clear_error_on_cpu(backend):
    q, k, v = _qkv(4, 2)
    with pytest.raises(RuntimeError, match=f"'{backend}' needs CUDA"):
        local_attention(q, k, v, window=2, causal=False, backend=backend)


def test_bad_arguments_raise_clear_errors():
    q, k, v = _qkv(4, 2)
    with pytest.raises(ValueError, match="unknown attention backend"):
        local_attention(q, k, v, window=2, causal=False, backend="dense")
    q3, k3, v3 = _qkv(4, 3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        local_attention(q3, k3, v3, window=2, causal=False)
    with pytest.raises(ValueError, match="key_padding_mask"):
        local_attention(q, k, v, window=2, causal=False,
                        key_padding_mask=torch.ones(3, L, dtype=torch.long))
    with pytest.raises(ValueError, match="window"):
        local_attention(q, k, v, window=-1, causal=False)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_tensor(backend: str, length: int, window: int) -> int:
    q, k, v = _qkv(2, 1, B=1, length=length, D=4)
    mask = torch.ones(1, length, dtype=torch.bool)
    with _LargestTensor() as meter:
        out = local_attention(q, k, v, window=window, causal=False, backend=backend,
                              key_padding_mask=mask)
        out.sum().backward()
    return meter.largest


def test_blocked_memory_is_linear_in_length_not_quadratic():
    length, window, heads = 1024, 4, 2
    # The meter sees the dense O(L²) score matrix of the sdpa path ...
    assert _largest_tensor("sdpa", length, window) >= length * length
    # ... and nothing bigger than O(L·(block + 2w)) per head in the blocked one.
    block = 16
    assert _largest_tensor("blocked", length, window) <= 2 * heads * length * (block + 2 * window)


# -------------------------------------------------- EnhancedLocalAttentionWithGQA


@pytest.mark.parametrize("backend", ["blocked", "sdpa"])
def test_decoder_step_matches_forward(backend):
    torch.manual_seed(0)
    attn = EnhancedLocalAttentionWithGQA(_cfg(attention_backend=backend), causal=True).eval()
    B, length = 2, 11  # several times around the ring buffer of window + 1 = 4 slots
    x = torch.randn(B, length, 32)
    with torch.no_grad():
        full = attn(x)
        state = attn.init_state(B, x.device, x.dtype)
        steps = []
        for t in range(length):
            y, state = attn.step(x[:, t:t + 1], state, t)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_decoder_state_is_batch_first_reorderable_and_not_mutated():
    torch.manual_seed(0)
    attn = EnhancedLocalAttentionWithGQA(_cfg(), causal=True).eval()
    B, length = 3, 9
    x = torch.randn(B, length, 32)
    perm = torch.tensor([2, 0, 0])  # beam search may duplicate and drop rows
    with torch.no_grad():
        full = attn(x)
        state = attn.init_state(B, x.device, x.dtype)
        for t in range(5):
            _, state = attn.step(x[:, t:t + 1], state, t)
        for tensor in state.values():
            assert tensor.shape[0] == B
        before = {name: t.clone() for name, t in state.items()}
        state = {name: t.index_select(0, perm) for name, t in state.items()}
        kept = dict(state)
        outs = []
        for t in range(5, length):
            y, state = attn.step(x[perm, t:t + 1], state, t)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=1), full[perm, 5:], **TOL)
    for name in before:
        assert torch.equal(kept[name], before[name].index_select(0, perm))


@pytest.mark.parametrize("backend", ["blocked", "sdpa"])
def test_causal_module_is_causal(backend):
    torch.manual_seed(0)
    attn = EnhancedLocalAttentionWithGQA(_cfg(attention_backend=backend), causal=True).eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        base = attn(x)
        for t in (0, 5, 10):
            changed = x.clone()
            changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:]) * 10
            out = attn(changed)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], **TOL)
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("causal", [False, True])
def test_attention_only_reaches_window_positions(causal):
    torch.manual_seed(0)
    cfg = _cfg()
    attn = EnhancedLocalAttentionWithGQA(cfg, causal=causal).eval()
    x = torch.randn(1, 16, 32)
    p = 8
    changed = x.clone()
    changed[:, p] += 5.0
    with torch.no_grad():
        moved = (attn(changed) - attn(x)).abs().amax(dim=-1)[0] > 1e-6
    i = torch.arange(16)
    lo = p if causal else p - cfg.window
    assert torch.equal(moved, (i >= lo) & (i <= p + cfg.window))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_encoder_padding_content_and_amount_do_not_change_real_outputs(backend):
    torch.manual_seed(0)
    attn = EnhancedLocalAttentionWithGQA(_cfg(attention_backend=backend), causal=False).eval()
    length, real = 12, 6
    x = torch.randn(2, length, 32)
    mask = torch.arange(length)[None, :] < torch.tensor([length, real])[:, None]
    garbage = x.clone()
    garbage[1, real:] = torch.randn(length - real, 32) * 100
    with torch.no_grad():
        out = attn(x, mask)
        out_garbage = attn(garbage, mask)
        alone = attn(x[1:, :real])  # the same sequence with no padding after it
    torch.testing.assert_close(out_garbage[mask], out[mask], **TOL)
    torch.testing.assert_close(out[1, :real], alone[0], **TOL)


def test_module_backends_agree():
    torch.manual_seed(0)
    attn = EnhancedLocalAttentionWithGQA(_cfg(), causal=False).eval()
    x = torch.randn(2, 20, 32)
    mask = torch.arange(20)[None, :] < torch.tensor([20, 13])[:, None]
    outs = {}
    with torch.no_grad():
        for backend in ("blocked", "sdpa", "auto"):
            attn.backend = backend
            outs[backend] = attn(x, mask)
    torch.testing.assert_close(outs["sdpa"], outs["blocked"], **TOL)
    torch.testing.assert_close(outs["auto"], outs["blocked"], **TOL)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    cfg = _cfg()
    x = torch.randn(2, 10, 32)
    memory = torch.randn(2, 7, 32)
    mask = torch.arange(10)[None, :] < torch.tensor([10, 6])[:, None]
    memory_mask = torch.arange(7)[None, :] < torch.tensor([7, 4])[:, None]
    modules = [
        (EnhancedLocalAttentionWithGQA(cfg, causal=False), lambda m: m(x, mask)),
        (EnhancedLocalAttentionWithGQA(cfg, causal=True), lambda m: m(x)),
        (CrossAttention(cfg), lambda m: m(x, memory, memory_mask)),
    ]
    for module, run in modules:
        run(module).square().sum().backward()
        for name, param in module.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_dropout_only_in_training():
    torch.manual_seed(0)
    attn = EnhancedLocalAttentionWithGQA(_cfg(dropout=0.5), causal=False)
    x = torch.randn(1, 8, 32)
    attn.train()
    assert not torch.equal(attn(x), attn(x))
    attn.eval()
    assert torch.equal(attn(x), attn(x))


def test_strict_mode_names_the_module_on_non_finite_output():
    attn = EnhancedLocalAttentionWithGQA(_cfg(check_finite=True), causal=False)
    x = torch.randn(1, 8, 32)
    x[0, 3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="EnhancedLocalAttentionWithGQA"):
        attn(x)


def test_init_state_shapes():
    attn = EnhancedLocalAttentionWithGQA(_cfg(window=5), causal=True)
    state = attn.init_state(3, "cpu", torch.float32)
    assert state["k"].shape == (3, 6, 2, 8)
    assert state["v"].shape == (3, 6, 2, 8)
    assert state["pos"].shape == (3, 6)
    with pytest.raises(RuntimeError, match="causal"):
        EnhancedLocalAttentionWithGQA(_cfg(), causal=False).init_state(1, "cpu", torch.float32)


# ------------------------------------------------------------- CrossAttention


def _cross_inputs():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 32)
    memory = torch.randn(3, 9, 32)
    memory_mask = torch.arange(9)[None, :] < torch.tensor([9, 4, 0])[:, None]
    return x, memory, memory_mask


def test_cross_attention_forward_equals_attend_of_compute_kv():
    cross = CrossAttention(_cfg()).eval()
    x, memory, memory_mask = _cross_inputs()
    with torch.no_grad():
        k, v = cross.compute_kv(memory)
        assert k.shape == (3, 9, 2, 8) and v.shape == (3, 9, 2, 8)
        for m in (None, memory_mask):
            full = cross(x, memory, m)
            torch.testing.assert_close(cross.attend(x, k, v, m), full, **TOL)
            steps = torch.cat([cross.attend(x[:, t:t + 1], k, v, m) for t in range(6)], dim=1)
            torch.testing.assert_close(steps, full, **TOL)


def test_cross_attention_matches_explicit_gqa_softmax():
    cross = CrossAttention(_cfg()).eval()
    x, memory, memory_mask = _cross_inputs()
    with torch.no_grad():
        got = cross(x, memory, memory_mask)
        q = cross.q_proj(x).view(3, 6, 4, 8)
        k, v = cross.compute_kv(memory)
        k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8 ** 0.5
        scores = scores.masked_fill(~memory_mask[:, None, None, :], float("-inf"))
        attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-padding memory row -> 0
        o = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(3, 6, 32)
        want = cross.out_proj(o)
    torch.testing.assert_close(got, want, **TOL)


def test_cross_attention_ignores_masked_memory():
    cross = CrossAttention(_cfg()).eval()
    x, memory, memory_mask = _cross_inputs()
    changed = memory.clone()
    changed[~memory_mask] = torch.randn(int((~memory_mask).sum()), 32) * 100
    with torch.no_grad():
        out = cross(x, memory, memory_mask)
        out_changed = cross(x, changed, memory_mask)
        unmasked = cross(x, changed)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out_changed, out, **TOL)
    assert not torch.allclose(unmasked, out)  # the mask is what hides the change
