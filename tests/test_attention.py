"""Local GQA attention backends, the attention modules and cross-attention (docs/model.md)."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import flex_attention as torch_flex
from torch.utils._python_dispatch import TorchDispatchMode

from liquid_dist.config import ModelConfig, MoEConfig
from liquid_dist.model import LiquidFoundationModelOptimized, attention
from liquid_dist.model.attention import (
    AttentionMaskPlan,
    CrossAttention,
    EnhancedLocalAttentionWithGQA,
    _gqa_sdpa,
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


# ------------------------------------------------- SDPA's grouped K/V rule


def _record_sdpa(monkeypatch) -> list[tuple[int, bool]]:
    """Record (K/V heads, enable_gqa) of every SDPA call, then run it."""
    calls = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        calls.append((k.shape[1], kwargs.get("enable_gqa", False)))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def test_sdpa_calls_on_cpu_keep_kv_grouped(monkeypatch):
    calls = _record_sdpa(monkeypatch)
    q, k, v = (t.detach() for t in _qkv(4, 2))
    mask = _mask("right")
    for backend in ("blocked", "sdpa"):
        local_attention(q, k, v, window=2, causal=False, backend=backend, key_padding_mask=mask)
    x, memory, memory_mask = _cross_inputs()
    with torch.no_grad():
        CrossAttention(_cfg())(x, memory, memory_mask)
    assert len(calls) == 3 and all(call == (2, True) for call in calls)


def test_gqa_sdpa_expands_kv_on_cuda_only_with_a_mask(monkeypatch):
    # _gqa_sdpa is the one SDPA call of the blocked and sdpa backends, of
    # cross-attention and of the decoder step (the CPU test above sees them
    # all reach SDPA through it); here on fake CUDA tensors (shapes only).
    calls = _record_sdpa(monkeypatch)
    with FakeTensorMode():
        q = torch.empty(2, 4, 5, 8, device="cuda")
        kv = torch.empty(2, 2, 7, 8, device="cuda")
        out = _gqa_sdpa(q, kv, kv, torch.ones(2, 1, 5, 7, dtype=torch.bool, device="cuda"))
        _gqa_sdpa(q, kv, kv, None)
        _gqa_sdpa(q, q, q, torch.ones(2, 1, 5, 5, dtype=torch.bool, device="cuda"))
    assert out.shape == q.shape
    # With a mask: expanded to the query heads, so a fused kernel runs;
    # without one, or without groups: as given.
    assert calls == [(4, False), (2, True), (4, False)]


# --------------------------------------------------------------------- flex

# The stand-ins run flex eagerly on CPU, which torch warns about.
_EAGER_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture
def flex_calls(monkeypatch):
    """Stand-ins for flex's two functions and torch.compile that record each call.

    A call is bound to the installed torch's function's signature (TypeError if it
    does not fit) and then run eagerly; torch.compile returns the function
    itself, recording the keyword arguments it got for each stand-in.
    """
    calls = {"create_block_mask": [], "flex_attention": [], "compile": {}}
    stand_ins = {}

    def recorder(name):
        real = getattr(torch_flex, name)
        signature = inspect.signature(real)

        def record(*args, **kwargs):
            calls[name].append(signature.bind(*args, **kwargs).arguments)
            result = real(*args, **kwargs)
            calls[name][-1]["<result>"] = result
            return result
        return record

    for name in ("create_block_mask", "flex_attention"):
        stand_ins[name] = recorder(name)
        monkeypatch.setattr(torch_flex, name, stand_ins[name])

    def compile_(fn, **kwargs):
        # Eager flex compiles parts of itself too; those calls only pass through.
        for name, stand_in in stand_ins.items():
            if fn is stand_in:
                calls["compile"][name] = kwargs
        return fn

    monkeypatch.setattr(torch, "compile", compile_)
    attention._band_block_mask.cache_clear()
    yield calls
    attention._band_block_mask.cache_clear()


@_EAGER_FLEX
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("window", [1, L + 4])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("causal", [False, True])
def test_flex_calls_fit_torch_signatures_and_match_reference(flex_calls, causal, heads, window,
                                                             mask_kind):
    q, k, v = (t.detach() for t in _qkv(*heads))
    mask = _mask(mask_kind)
    # flex has no CPU backward: the forward, with the CUDA check bypassed.
    out = attention._flex_attention(q, k, v, window, causal, AttentionMaskPlan(mask))
    torch.testing.assert_close(out, reference_local_attention(q, k, v, window, causal, mask),
                               **TOL)
    assert flex_calls["compile"] == {"create_block_mask": {"dynamic": False},
                                     "flex_attention": {"dynamic": False}}
    (create,) = flex_calls["create_block_mask"]
    assert set(create) == {"mask_mod", "B", "H", "Q_LEN", "KV_LEN", "device", "<result>"}
    assert (create["B"], create["H"], create["Q_LEN"], create["KV_LEN"], create["device"]) == (
        None if mask is None else 3, None, L, L, q.device)
    (flex,) = flex_calls["flex_attention"]
    assert set(flex) == {"query", "key", "value", "block_mask", "enable_gqa", "<result>"}
    assert flex["block_mask"] is create["<result>"]
    assert flex["enable_gqa"] == (heads[0] != heads[1])
    assert flex["query"].shape == (3, heads[0], L, 8)  # flex's (B, H, L, D) layout
    assert flex["key"].shape == (3, heads[1], L, 8)


@_EAGER_FLEX
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True])
def test_flex_mask_mod_is_the_band_and_the_padding(flex_calls, causal, mask_kind):
    q, k, v = (t.detach() for t in _qkv(4, 2))
    mask = _mask(mask_kind)
    window = 3
    attention._flex_attention(q, k, v, window, causal, AttentionMaskPlan(mask))
    mask_mod = flex_calls["create_block_mask"][0]["mask_mod"]
    b = torch.arange(3)[:, None, None]
    i = torch.arange(L)[None, :, None]
    j = torch.arange(L)[None, None, :]
    want = attention._band(L, window, causal, q.device)[None].expand(3, L, L)
    if mask is not None:
        want = want & mask[:, None, :] & mask[:, :, None]
    assert torch.equal(mask_mod(b, 0, i, j).expand(3, L, L), want)


@_EAGER_FLEX
def test_flex_block_mask_built_once_per_plan_and_kept_across_steps_without_padding(flex_calls):
    q, k, v = (t.detach() for t in _qkv(4, 2))
    mask = _mask("right")
    created = flex_calls["create_block_mask"]
    for _ in range(2):  # two forwards ...
        plan = AttentionMaskPlan(mask)
        for _ in range(3):  # ... of three layers
            attention._flex_attention(q, k, v, 2, False, plan)
    assert len(created) == 2 and len(flex_calls["flex_attention"]) == 6
    layers = flex_calls["flex_attention"]
    assert layers[0]["block_mask"] is layers[2]["block_mask"]
    assert layers[2]["block_mask"] is not layers[3]["block_mask"]
    # Another window or causality in one plan: another block mask.
    attention._flex_attention(q, k, v, 2, True, plan)
    assert len(created) == 3
    # Without padding the block mask depends on (L, window, causal, device) only.
    created.clear()
    for _ in range(2):
        plan = AttentionMaskPlan(None)
        for _ in range(3):
            attention._flex_attention(q, k, v, 2, False, plan)
    assert len(created) == 1 and created[0]["B"] is None
    attention._flex_attention(q[:, :7], k[:, :7], v[:, :7], 2, False, AttentionMaskPlan(None))
    assert len(created) == 2


# -------------------------------------------------------------------- flash

# Stand-ins with flash-attn 2.8.3's exact signatures, read from
# Dao-AILab/flash-attention at tag v2.8.3 (commit 060c9188beec3a8b62b33a3bfa6d5d2d44975fab),
# flash_attn/flash_attn_interface.py: flash_attn_func (line 1135) and
# flash_attn_varlen_func (line 1370). They compute with reference_local_attention
# in fp32 and, like the kernel, leave the varlen rows past cu_seqlens[-1]
# undefined (NaN) in the output and in the input gradients.


class _Undefined(torch.autograd.Function):
    """NaN in the rows a kernel does not own, in the forward and in the backward."""

    @staticmethod
    def forward(ctx, x, owned):
        ctx.save_for_backward(owned)
        return torch.where(owned[:, None, None], x, float("nan"))

    @staticmethod
    def backward(ctx, grad):
        (owned,) = ctx.saved_tensors
        return torch.where(owned[:, None, None], grad, float("nan")), None


def _flash_window(window_size, causal: bool, length: int) -> tuple[int, bool]:
    """flash's (left, right) window as the reference's (window, causal)."""
    left, right = (length if w < 0 else w for w in window_size)
    if causal or right == 0:
        return left, True
    assert left == right, "the stand-in covers symmetric and causal windows"
    return left, False


def _fake_flash_attn(calls: list) -> types.ModuleType:
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                        deterministic=False, return_attn_probs=False):
        calls.append(("flash_attn_func", dict(locals())))
        return reference_local_attention(q, k, v, *_flash_window(window_size, causal, q.shape[1]))

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        calls.append(("flash_attn_varlen_func", dict(locals())))
        n, cu = q.shape[0], cu_seqlens_q.long()
        owned = torch.arange(n, device=q.device) < cu[-1]
        q, k, v = (_Undefined.apply(t, owned) for t in (q, k, v))
        # Sequence b, position t (< its length) is packed row cu[b] + t: unpack
        # to (B, max_seqlen), right padded, without reading cu on the host,
        # and read no row outside the sequences.
        t = torch.arange(max_seqlen_q, device=q.device)
        real = t[None, :] < (cu[1:] - cu[:-1])[:, None]
        rows = (cu[:-1, None] + t[None, :]).clamp(max=n - 1)
        q, k, v = (torch.where(real[:, :, None, None], x[rows], 0) for x in (q, k, v))
        out = reference_local_attention(q, k, v, *_flash_window(window_size, causal, max_seqlen_q),
                                        key_padding_mask=real)
        r = torch.arange(n, device=q.device)
        seq = torch.searchsorted(cu[1:], r, right=True).clamp(max=cu.numel() - 2)
        pos = (r - cu[seq]).clamp(0, max_seqlen_q - 1)
        return _Undefined.apply(out[seq, pos], owned)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


@pytest.fixture
def flash_calls(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(calls))
    return calls


def _flash_mask(kind: str, length: int = L) -> torch.Tensor | None:
    if kind in ("none", "right"):
        return _mask(kind, length=length)
    if kind == "left":
        return _mask("right", length=length).flip(1)
    # All padding, so that no row is owned by the kernel.
    return torch.zeros(3, length, dtype=torch.bool)


@pytest.mark.parametrize("mask_kind", ["none", "right", "left", "empty"])
@pytest.mark.parametrize("window", [1, 3, L + 4])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_calls_fit_flash_attn_and_match_reference(flash_calls, causal, heads, window,
                                                        mask_kind):
    q, k, v = _qkv(*heads)
    mask = _flash_mask(mask_kind)
    # CPU fp32, with the device and dtype checks bypassed.
    out, grads = _forward_and_grads(
        lambda q, k, v: attention._flash_attention(q, k, v, window, causal,
                                                   AttentionMaskPlan(mask)), q, k, v)
    ref, ref_grads = _forward_and_grads(
        lambda q, k, v: reference_local_attention(q, k, v, window, causal, mask), q, k, v)
    torch.testing.assert_close(out, ref, **TOL)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, n=name: f"d{n}: {m}")
    w = min(window, L - 1)
    (name, args), = flash_calls
    assert args["window_size"] == (w, 0 if causal else w) and args["causal"] == causal
    defaults = dict(dropout_p=0.0, softmax_scale=None, softcap=0.0, alibi_slopes=None,
                    deterministic=False, return_attn_probs=False)
    assert {key: args[key] for key in defaults} == defaults
    if mask is None:
        assert name == "flash_attn_func"
        return
    assert name == "flash_attn_varlen_func"
    assert args["q"].shape == (3 * L, heads[0], 8) and args["k"].shape == (3 * L, heads[1], 8)
    assert args["cu_seqlens_q"] is args["cu_seqlens_k"]
    assert args["cu_seqlens_q"].dtype == torch.int32
    assert args["cu_seqlens_q"].tolist() == [0, *mask.sum(1).cumsum(0).tolist()]
    assert args["max_seqlen_q"] == args["max_seqlen_k"] == L
    assert type(args["max_seqlen_q"]) is int and args["block_table"] is None


def test_flash_packing_is_shared_by_a_plan_and_holes_are_refused_when_validating(flash_calls):
    q, k, v = (t.detach() for t in _qkv(4, 2))
    mask = _mask("right")
    plan = AttentionMaskPlan(mask, validate=False)
    for _ in range(3):
        attention._flash_attention(q, k, v, 2, False, plan)
    first = flash_calls[0][1]["cu_seqlens_q"]
    assert all(args["cu_seqlens_q"] is first for _, args in flash_calls)
    holes = torch.ones(3, L, dtype=torch.bool)
    holes[1, 4] = False
    with pytest.raises(ValueError, match="contiguous"):
        attention._flash_attention(q, k, v, 2, False, AttentionMaskPlan(holes))
    with pytest.raises(ValueError, match="contiguous"):
        attention._flash_attention(q, k, v, 2, False, AttentionMaskPlan(holes, validate=True))


def test_flash_packing_never_reads_device_values_on_the_host(flash_calls):
    # Meta tensors hold no values: an .item(), .tolist(), nonzero or bool() of
    # a tensor fails on them, as each would be a host sync on a GPU.
    q, k, v = (torch.empty(t.shape, device="meta", requires_grad=True) for t in _qkv(4, 2))
    mask = torch.ones(3, L, dtype=torch.bool, device="meta")
    for m in (None, mask):
        out = attention._flash_attention(q, k, v, 2, True, AttentionMaskPlan(m, validate=False))
        assert out.shape == q.shape
        torch.autograd.grad(out.sum(), (q, k, v))
    assert [name for name, _ in flash_calls] == ["flash_attn_func", "flash_attn_varlen_func"]
    # The validating plan's precondition check is the one host sync.
    with pytest.raises(RuntimeError, match="meta"):
        attention._flash_attention(q, k, v, 2, True, AttentionMaskPlan(mask))


def test_a_plan_serves_only_its_own_mask():
    q, k, v = _qkv(4, 2)
    mask = _mask("right")
    with pytest.raises(ValueError, match="another key_padding_mask"):
        local_attention(q, k, v, window=2, causal=False, key_padding_mask=mask.clone(),
                        plan=AttentionMaskPlan(mask))
    with pytest.raises(ValueError, match="another key_padding_mask"):
        local_attention(q, k, v, window=2, causal=False, plan=AttentionMaskPlan(mask))
    # A detach() of it is the same mask (DeepSpeed ZeRO-3's hooks pass modules those).
    out = local_attention(q, k, v, window=2, causal=False, key_padding_mask=mask.detach(),
                          plan=AttentionMaskPlan(mask))
    torch.testing.assert_close(out, reference_local_attention(q, k, v, 2, False, mask), **TOL)


def test_every_layer_of_a_stack_forward_shares_one_plan(monkeypatch):
    seen = []
    real = attention.local_attention

    def recording(q, k, v, **kwargs):
        seen.append((kwargs["causal"], kwargs["plan"], kwargs["key_padding_mask"]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention, "local_attention", recording)
    cfg = _cfg(n_encoder_layers=3, n_decoder_layers=2, freq_heads=2, band_block=4,
               hyena_filter_dim=8, dropout=0.0, moe=MoEConfig(num_experts=2, top_k=1, k_max=1,
                                                              expert_ffn_dim=16))
    model = LiquidFoundationModelOptimized(cfg).eval()
    enc = torch.randint(4, 64, (2, 10))
    dec = torch.randint(4, 64, (2, 6))
    enc_mask = torch.arange(10)[None, :] < torch.tensor([10, 6])[:, None]
    labels = dec.masked_fill(torch.arange(6)[None, :] >= torch.tensor([6, 4])[:, None], -100)
    for _ in range(2):
        model(enc, dec, encoder_attention_mask=enc_mask, labels=labels)
    assert len(seen) == 2 * (3 + 2)
    for forward in (seen[:5], seen[5:]):
        encoder, decoder = forward[:3], forward[3:]
        assert [c for c, _, _ in forward] == [False] * 3 + [True] * 2
        assert len({id(p) for _, p, _ in encoder}) == len({id(p) for _, p, _ in decoder}) == 1
        assert encoder[0][1] is not decoder[0][1]
        for _, plan, mask in forward:
            assert plan.key_padding_mask is mask and not plan.validate
    assert torch.equal(seen[0][2], enc_mask)
    assert seen[0][1] is not seen[5][1]  # a new plan per forward
