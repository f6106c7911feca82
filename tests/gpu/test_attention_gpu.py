"""GPU checks of the local attention backends (run by hand on a CUDA machine).

Every backend, in bf16, against the fp32 reference with flash-attn's own
rule: the backend's error is at most 2× the error of the same reference
computed in bf16 (3× for gradients).
"""

from __future__ import annotations

import pytest
import torch

from liquid_dist.config import ModelConfig
from liquid_dist.model.attention import (
    EnhancedLocalAttentionWithGQA,
    choose_backend,
    local_attention,
    reference_local_attention,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
B, L, H, G, D = 2, 300, 8, 2, 64  # L is not a multiple of flex's 128 tiles
FLOOR = 1e-5  # where both errors are ~0 (e.g. rows that are all padding)


def _flash_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True)
def _room_for_recompiles(monkeypatch):
    # flex compiles once per (shape, window, causal, padded); the parametrised
    # cases below exceed dynamo's default limit, after which it would silently
    # run flex eagerly.
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)


def _mask(kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    lengths = torch.tensor([L, 171], device=DEVICE)
    return torch.arange(L, device=DEVICE)[None, :] < lengths[:, None]


def _run(fn, q, k, v, g):
    out = fn(q, k, v)
    grads = torch.autograd.grad((out.float() * g).sum(), (q, k, v))
    return out.float(), [x.float() for x in grads]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _check_backend(backend: str, causal: bool, window: int, mask_kind: str,
                   dtype: torch.dtype = torch.bfloat16) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(B, L, H, D, device=DEVICE, generator=gen)
    k = torch.randn(B, L, G, D, device=DEVICE, generator=gen)
    v = torch.randn(B, L, G, D, device=DEVICE, generator=gen)
    g = torch.randn(B, L, H, D, device=DEVICE, generator=gen)
    mask = _mask(mask_kind)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out_ref, grads_ref = _run(
        lambda q, k, v: reference_local_attention(q, k, v, window, causal, mask), *full, g)
    out_pt, grads_pt = _run(
        lambda q, k, v: reference_local_attention(q, k, v, window, causal, mask, upcast=False),
        *low, g)
    out, grads = _run(
        lambda q, k, v: local_attention(q, k, v, window=window, causal=causal, backend=backend,
                                        key_padding_mask=mask), *low, g)
    assert _max_err(out, out_ref) <= 2 * _max_err(out_pt, out_ref) + FLOOR
    for name, got, pt, ref in zip("qkv", grads, grads_pt, grads_ref, strict=True):
        assert _max_err(got, ref) <= 3 * _max_err(pt, ref) + FLOOR, f"d{name}"


@pytest.mark.parametrize("mask_kind", ["none", "right"])
@pytest.mark.parametrize("window", [16, 127, 512])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["flex", "flash", "blocked", "sdpa"])
def test_backend_matches_reference_in_bf16(backend, causal, window, mask_kind):
    if backend == "flash" and not _flash_importable():
        pytest.skip("flash-attn is not installed on this machine")
    _check_backend(backend, causal, window, mask_kind)


def test_auto_picks_flash_for_half_and_flex_for_fp32():
    half = torch.zeros(1, 8, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    single = torch.zeros(1, 8, 2, 64, device=DEVICE)
    assert choose_backend(half, 4) == ("flash" if _flash_importable() else "flex")
    assert choose_backend(single, 4) == "flex"


def test_flash_rejects_padding_with_holes():
    if not _flash_importable():
        pytest.skip("flash-attn is not installed on this machine")
    q = torch.randn(1, 16, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, 16, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    mask = torch.ones(1, 16, dtype=torch.bool, device=DEVICE)
    mask[0, 5] = False
    with pytest.raises(ValueError, match="contiguous"):
        local_attention(q, k, k, window=4, causal=False, backend="flash", key_padding_mask=mask)


@pytest.mark.parametrize("backend", ["flex", "auto"])
def test_decoder_step_matches_forward_on_gpu(backend):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=128, n_heads=4, n_kv_heads=2, window=8,
                      attention_backend=backend)
    attn = EnhancedLocalAttentionWithGQA(cfg, causal=True).to(DEVICE).eval()
    x = torch.randn(2, 40, 128, device=DEVICE)
    with torch.no_grad():
        full = attn(x)
        state = attn.init_state(2, x.device, x.dtype)
        steps = []
        for t in range(40):
            y, state = attn.step(x[:, t:t + 1], state, t)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
