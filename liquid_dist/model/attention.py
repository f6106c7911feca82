"""Local grouped-query attention (seed 3.3) and decoder cross-attention.

``local_attention`` is the kernel: sliding-window attention with grouped K/V
heads (GQA) in flash-attn's layout, with four interchangeable backends that all
agree with :func:`reference_local_attention` (docs/model.md, "EnhancedLocalAttentionWithGQA"):

* ``flash``   - flash-attn's windowed kernel (CUDA, fp16/bf16);
* ``flex``    - PyTorch flex attention with a sliding-window block mask (CUDA);
* ``blocked`` - chunked local attention in plain PyTorch, O(L·w), forward and
  backward on every device: the CPU training path;
* ``sdpa``    - scaled-dot-product attention with a dense band mask, O(L²).

The mask structures that flex and flash need (a block mask, a packing of the
real tokens) depend on the padding mask, not on a layer: an
:class:`AttentionMaskPlan` builds them once and every layer of a stack shares
it. Every SDPA call goes through :func:`_gqa_sdpa`, which owns the rule that
keeps a fused CUDA kernel for grouped K/V with a mask.

Mask semantics, shared by every backend and the reference. With ``w`` =
``window``, query ``i`` sees key ``j`` iff ``i - w <= j <= i + w``
(``causal=False``) or ``i - w <= j <= i`` (``causal=True``), and key ``j`` is
real. ``key_padding_mask`` (B, L; True = real token) is one mask for a
self-attention sequence, so it masks queries too: the output at a padding
position is 0 in every backend. That is what flash-attn's variable-length path
(padding removed before the kernel) gives, and what its test reference gives
when the query and key padding masks are the same, so all backends agree
everywhere, not only at real positions. A row with no visible key outputs 0.

:class:`EnhancedLocalAttentionWithGQA` wraps the kernel with projections (and,
for the decoder, incremental decoding with a sliding-window K/V ring buffer);
:class:`CrossAttention` lets decoder positions attend to the whole encoder
output.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import flex_attention as flex

from .config import ModelConfig
from .init import initialised
from .utils import check_finite, xavier_linear, zero_padding

BACKENDS = ("auto", "flash", "flex", "blocked", "sdpa")

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------- helpers


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
    key_padding_mask: torch.Tensor | None,
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"local_attention expects q (B, L, H, D) and k, v (B, L, G, D); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, L, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != L or k.shape[3] != D:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, length and head dim"
        )
    if H % k.shape[2]:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({k.shape[2]})")
    if window < 0:
        raise ValueError(f"window must be >= 0; got {window}")
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, L)
    ):
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape {(B, L)}; got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )


def _band(length: int, window: int, causal: bool, device: torch.device) -> torch.Tensor:
    """(L, L) bool, True where query i may see key j by position alone."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    right = 0 if causal else window
    return (j >= i - window) & (j <= i + right)


def _gqa_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with grouped K/V, on a fused kernel where one exists.

    q (B, H, Lq, D), k and v (B, G, Lk, D) with H % G == 0, query head h
    reading K/V head h // (H // G) (as ``repeat_interleave``); attn_mask as
    SDPA's or None. Returns (B, H, Lq, D). The one rule for grouped K/V: on
    CUDA with a mask, K/V are expanded to the H query heads, because torch
    2.11 has no fused kernel for ``enable_gqa`` together with a mask (flash
    takes no mask; memory-efficient and cuDNN take no GQA) and would silently
    run the math kernel with fp32 (B, H, Lq, Lk) scores. Elsewhere SDPA's own
    ``enable_gqa`` groups them: on CPU, expanding made the blocked backend's
    calls 1.2-1.8× slower (fwd+bwd, 2 cores), and without a mask CUDA's flash
    kernel takes GQA natively.
    """
    H, G = q.shape[1], k.shape[1]
    if H != G and attn_mask is not None and q.is_cuda:
        k = k.repeat_interleave(H // G, dim=1)
        v = v.repeat_interleave(H // G, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                          enable_gqa=k.shape[1] != H)


def _masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None
) -> torch.Tensor:
    """Dense GQA attention; rows of ``allowed`` with no True output 0.

    q (B, Lq, H, D), k and v (B, Lk, G, D), allowed broadcastable to
    (B, 1, Lq, Lk) (True = may attend) or None. Returns (B, Lq, H, D). GQA
    groups like repeat_interleave (see :func:`_gqa_sdpa`).
    """
    row_ok = None
    if allowed is not None:
        # A row with no allowed key would softmax over nothing (NaN in the
        # forward and the backward); let it see every key and zero it after,
        # which also stops its gradient.
        row_ok = allowed.any(dim=-1, keepdim=True)
        allowed = allowed | ~row_ok
    out = _gqa_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed)
    if row_ok is not None:
        out = out * row_ok.to(out.dtype)
    return out.transpose(1, 2)


def _zero_padded_queries(out: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    if key_padding_mask is None:
        return out
    return out * key_padding_mask[:, :, None, None].to(out.dtype)


# ---------------------------------------------------------------- reference


def reference_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """The definition every backend is tested against, O(L²).

    Written like flash-attn's own test reference (``attention_ref``): upcast to
    (at least) fp32 (unless ``upcast=False``, which gives the low-precision PyTorch
    baseline of flash-attn's error rule), explicit band mask,
    ``masked_fill(-inf)``, softmax, fully masked rows set to 0, padding queries
    set to 0. Shapes as :func:`local_attention`; returns q's dtype.
    """
    dtype = q.dtype
    if upcast:
        acc = torch.promote_types(dtype, torch.float32)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
    B, L, H, D = q.shape
    n_rep = H // k.shape[2]
    k = k.repeat_interleave(n_rep, dim=2)
    v = v.repeat_interleave(n_rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q / math.sqrt(D), k)
    masked = ~_band(L, window, causal, q.device)[None, None]
    if key_padding_mask is not None:
        masked = masked | ~key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(masked, float("-inf"))
    attn = torch.softmax(scores, dim=-1)
    attn = attn.masked_fill(masked.all(dim=-1, keepdim=True), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", attn, v)
    if key_padding_mask is not None:
        out = out.masked_fill(~key_padding_mask[:, :, None, None], 0.0)
    return out.to(dtype)


# ----------------------------------------------------------------- backends


def default_block_size(window: int) -> int:
    """Query block of the ``blocked`` backend for a window ``window``.

    Each block of b queries reads b + 2w keys, so the work per query is
    (b + 2w) instead of the ideal 2w + 1: b ≈ w keeps the waste under 1.5×, and
    the bounds [16, 64] keep the batched attention calls from getting tiny
    (small w) while the waste b / 2w shrinks anyway for large w. Measured on
    2 CPU cores (B=8, H=4, G=2, D=32, fwd+bwd): b = clamp(w, 16, 64) was the
    fastest or within noise of it for w in {8, 32, 128}.
    """
    return max(16, min(window, 64))


def blocked_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Chunked local attention in plain PyTorch: the ``blocked`` backend.

    Cost: O(L·(b + 2w)·H·D) time and O(L·(b + 2w)) memory for the block masks
    (b = ``block_size``, default :func:`default_block_size`); forward and
    backward on any device and dtype. Queries are cut into blocks of b; block n
    reads keys [n·b − w, n·b + b − 1 + w] (to n·b + b − 1 when causal), taken
    from zero-padded K/V with ``unfold`` (no loop over blocks or positions).
    All blocks then go through one batched ``scaled_dot_product_attention``
    call with a (b, b + 2w) mask, so the fused SDPA kernels (and their
    backward) do the work: on 2 CPU cores this was 2-9× faster than the same
    blocks through einsum + softmax. GQA as :func:`_gqa_sdpa` does it (K/V
    repeated on CUDA only). Shapes and mask semantics as :func:`local_attention`.
    """
    B, L, H, D = q.shape
    G = k.shape[2]
    if L == 0:
        return q.new_zeros(q.shape)
    # A window beyond L - 1 sees the whole sequence: clamping keeps the key
    # span (and the padding) bounded by the sequence length.
    w = min(window, L - 1)
    b = min(block_size or default_block_size(w), L)
    if b < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    nb = -(-L // b)
    tail = nb * b - L
    right = 0 if causal else w
    span = b + w + right

    acc = torch.promote_types(k.dtype, torch.float32)

    def key_blocks(t: torch.Tensor) -> torch.Tensor:
        # (B, L, G, D) -> (B·nb, span, G, D): block n holds keys n·b − w ...
        # Built from an fp32 copy so that the backward adds up a key's
        # gradients from its ~span/b overlapping blocks in fp32: summed in
        # bf16, dK/dV came out 3x less precise than a bf16 reference.
        blocks = F.pad(t.to(acc), (0, 0, 0, 0, w, tail + right)).unfold(1, span, b)
        return blocks.permute(0, 1, 4, 2, 3).reshape(B * nb, span, G, D).to(t.dtype)

    qb = F.pad(q, (0, 0, 0, 0, 0, tail)).reshape(B * nb, b, H, D)
    real = key_padding_mask if key_padding_mask is not None else q.new_ones(
        (B, L), dtype=torch.bool
    )
    # Keys outside [0, L) are padding as well: one mask covers both.
    real_keys = F.pad(real, (w, tail + right), value=False).unfold(1, span, b)
    # Query r of a block is key slot r + w of it, so the band is the same
    # (b, span) pattern in every block.
    r = torch.arange(b, device=q.device)[:, None]
    s = torch.arange(span, device=q.device)[None, :]
    band = (s >= r) & (s <= r + w + right)
    allowed = band[None, None] & real_keys.reshape(B * nb, 1, 1, span)  # (B·nb, 1, b, span)
    out = _masked_sdpa(qb, key_blocks(k), key_blocks(v), allowed)
    out = out.reshape(B, nb * b, H, D)[:, :L]
    return _zero_padded_queries(out, key_padding_mask)


def sdpa_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with a dense band mask: the ``sdpa`` backend.

    Cost: O(L²·H·D) time and an O(B·L²) boolean mask; any device, forward
    and backward. A reference and the fast choice for short sequences
    (L <= 2w + 1, where the band is the whole matrix anyway). Shapes and mask
    semantics as :func:`local_attention`.
    """
    L = q.shape[1]
    allowed = _band(L, window, causal, q.device)[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return _zero_padded_queries(_masked_sdpa(q, k, v, allowed), key_padding_mask)


# ------------------------------------------------------- shared mask plans


@functools.cache
def _compiled(fn):
    """``torch.compile(fn, dynamic=False)``, made once per function.

    Static shapes: every new input shape, and every new value of an integer
    a mask_mod closes over (the window), compiles again; past
    ``torch._dynamo.config.recompile_limit`` dynamo silently runs ``fn``
    eagerly instead.
    """
    return torch.compile(fn, dynamic=False)


def _flex_mask_mod(window: int, causal: bool, real: torch.Tensor | None):
    """flex's ``mask_mod`` for :func:`local_attention`'s mask.

    True where key ``kv_idx`` is in query ``q_idx``'s band and, given ``real``
    (B, L) bool, both the key and the query of row ``b`` are real tokens.
    """
    right = 0 if causal else window
    if real is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx >= q_idx - window) & (kv_idx <= q_idx + right)
        return mask_mod

    def padded_mask_mod(b, h, q_idx, kv_idx):
        in_band = (kv_idx >= q_idx - window) & (kv_idx <= q_idx + right)
        # Masking padding queries too makes their rows empty (output 0),
        # and lets flex skip their blocks.
        return in_band & real[b, kv_idx] & real[b, q_idx]
    return padded_mask_mod


def _flex_block_mask(length: int, window: int, causal: bool, real: torch.Tensor | None,
                     device: torch.device):
    """The block mask of :func:`_flex_mask_mod` from compiled ``create_block_mask``.

    One batch entry per row of ``real``, or one broadcast over the batch
    without it; broadcast over heads. The mask is evaluated in O(B·L²) fused
    steps and only the O(B·(L/128)²) tile table is stored.
    """
    create = _compiled(flex.create_block_mask)
    return create(
        mask_mod=_flex_mask_mod(window, causal, real),
        B=None if real is None else real.shape[0], H=None, Q_LEN=length, KV_LEN=length,
        device=device,
    )


@functools.lru_cache(maxsize=16)
def _band_block_mask(length: int, window: int, causal: bool, device: torch.device):
    """:func:`_flex_block_mask` without padding, kept per (L, w, causal, device), 16 most recent."""
    return _flex_block_mask(length, window, causal, None, device)


class _VarlenPacking(NamedTuple):
    """flash-attn's varlen layout of a (B, L) padding mask; see :func:`_varlen_packing`."""

    real: torch.Tensor        # (B·L,) bool, the flattened mask
    dest: torch.Tensor        # (B·L,) long, the packed row of each flattened position
    cu_seqlens: torch.Tensor  # (B + 1,) int32, cumulative real lengths


def _varlen_packing(real: torch.Tensor) -> _VarlenPacking:
    """Pack a (B, L) padding mask for ``flash_attn_varlen_func``, without a host sync.

    Real tokens first, in their order, then the padding: flattened position i
    goes to packed row ``dest[i]`` (a permutation of the B·L rows), so row b's
    real tokens occupy packed rows ``cu_seqlens[b]`` to ``cu_seqlens[b + 1] - 1``.
    They keep their distances only if they are one contiguous run in row b.
    """
    flat = real.flatten()
    n_real = flat.cumsum(0)
    n_pad = (~flat).cumsum(0)
    dest = torch.where(flat, n_real - 1, n_real[-1] + n_pad - 1)
    cu_seqlens = F.pad(real.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return _VarlenPacking(flat, dest, cu_seqlens)


def _check_contiguous_rows(real: torch.Tensor) -> None:
    """Raise ValueError unless each row's real tokens are one contiguous run (one host sync)."""
    # A run starts wherever a real token follows padding or opens the row.
    starts = real[:, :1].sum(1) + (real[:, 1:] & ~real[:, :-1]).sum(1)
    if bool((starts > 1).any()):
        raise ValueError(
            "attention backend 'flash' with a key_padding_mask needs the real tokens of each "
            "row to be contiguous (right padding); use backend 'flex' or 'blocked' otherwise"
        )


class AttentionMaskPlan:
    """The mask structures of one padding mask, built once and shared by every layer.

    flex's block mask and flash-attn's varlen packing depend on the padding
    mask (and the length, window and causality), never on a layer's
    activations. The encoder and the decoder each make one plan per forward
    and pass it to all their layers: a structure is built the first time a
    layer asks for it and reused by every later layer and by the
    activation-checkpoint recompute. Without a padding mask the flex block
    mask is also kept across forwards (per length, window, causality and
    device; the 16 most recent). The other backends need no plan.

    ``key_padding_mask`` (B, L) bool, True = real token, or None: the mask
    every call sharing the plan passes (:func:`local_attention` checks, without
    reading values, that it is this tensor or a ``detach()`` of it).
    ``validate``: when the flash packing is first built, check flash-attn's
    precondition (each row's real tokens are one contiguous run) and raise
    ValueError otherwise. That costs one host sync, so the model's plans
    validate only in strict mode (``model.check_finite``); the model's own
    batches are right padded.
    """

    def __init__(self, key_padding_mask: torch.Tensor | None = None, validate: bool = True):
        self.key_padding_mask = key_padding_mask
        self.validate = validate
        self._block_masks: dict[tuple[int, bool], object] = {}
        self._packing: _VarlenPacking | None = None

    def flex_block_mask(self, length: int, window: int, causal: bool, device: torch.device):
        """flex's ``BlockMask`` of :func:`local_attention`'s mask for these arguments.

        With a padding mask, ``length`` and ``device`` must be the mask's.
        """
        if self.key_padding_mask is None:
            return _band_block_mask(length, window, causal, device)
        key = (window, causal)
        if key not in self._block_masks:
            self._block_masks[key] = _flex_block_mask(
                length, window, causal, self.key_padding_mask, device)
        return self._block_masks[key]

    def flash_packing(self) -> _VarlenPacking:
        """flash-attn's varlen layout (:func:`_varlen_packing`) of the plan's padding mask."""
        if self._packing is None:
            if self.validate:
                _check_contiguous_rows(self.key_padding_mask)
            self._packing = _varlen_packing(self.key_padding_mask)
        return self._packing


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether ``a`` and ``b`` are one tensor: the same object, or alike views of the same data.

    The second case covers ``detach()`` copies, as module hooks make of their
    inputs (DeepSpeed ZeRO-3 does); nothing is read from the device.
    """
    if a is b:
        return True
    if a is None or b is None:
        return False
    return (a.device, a.dtype, a.shape, a.stride(), a.data_ptr()) == (
        b.device, b.dtype, b.shape, b.stride(), b.data_ptr())


def _plan_for(plan: AttentionMaskPlan | None,
              key_padding_mask: torch.Tensor | None) -> AttentionMaskPlan:
    """``plan`` after checking it belongs to ``key_padding_mask``; a new plan if None."""
    if plan is None:
        return AttentionMaskPlan(key_padding_mask)
    if not _same_tensor(plan.key_padding_mask, key_padding_mask):
        raise ValueError("the AttentionMaskPlan was made for another key_padding_mask")
    return plan


def flex_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    plan: AttentionMaskPlan | None = None,
) -> torch.Tensor:
    """Compiled flex attention with a sliding-window block mask: the ``flex`` backend.

    Cost: O(L·w·H·D) time (128×128 tiles outside the band are skipped) and
    O(L·H) memory, native GQA. CUDA only: flex attention has no backward on
    CPU. The block mask comes from ``plan`` (an :class:`AttentionMaskPlan` of
    ``key_padding_mask``; None makes one for this call), so the layers sharing
    a plan build it once. ``create_block_mask`` and ``flex_attention`` are
    compiled with ``dynamic=False``: every new (B, L) with padding (L
    without), window or causality compiles both again, and past
    ``torch._dynamo.config.recompile_limit`` (8 by default) dynamo silently
    runs them eagerly (O(L²)), so keep the set of batch shapes small. Shapes
    and mask semantics as :func:`local_attention`.
    """
    if not q.is_cuda:
        raise RuntimeError(
            "attention backend 'flex' needs CUDA tensors (flex attention has no backward "
            "on CPU); use backend 'blocked' or 'auto' on CPU"
        )
    return _flex_attention(q, k, v, window, causal, _plan_for(plan, key_padding_mask))


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                    causal: bool, plan: AttentionMaskPlan) -> torch.Tensor:
    """The flex calls of :func:`flex_local_attention` on any device flex runs on.

    The CUDA check is the caller's (on CPU flex runs forward only).
    """
    block_mask = plan.flex_block_mask(q.shape[1], window, causal, q.device)
    out = _compiled(flex.flex_attention)(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        block_mask=block_mask, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _import_flash():
    try:
        import flash_attn
    except ImportError as exc:
        raise RuntimeError(
            "attention backend 'flash' needs the flash-attn package (pip install "
            f"'liquid_dist[flash]' on a CUDA machine); it failed to import: {exc}"
        ) from exc
    return flash_attn


def _flash_available() -> bool:
    try:
        _import_flash()
    except RuntimeError:
        return False
    return True


def flash_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    plan: AttentionMaskPlan | None = None,
) -> torch.Tensor:
    """flash-attn's windowed kernel: the ``flash`` backend.

    Cost: O(L·w·H·D) time, O(L·H) memory, native GQA; CUDA, fp16/bf16, head
    dim <= 256; no host sync. Without a padding mask this is
    ``flash_attn_func`` with ``window_size=(w, 0 if causal else w)``. With
    one, ``flash_attn_varlen_func`` runs on the tokens packed real-first
    (:meth:`AttentionMaskPlan.flash_packing`, shared by the layers that share
    ``plan``; None makes a plan for this call), which is exact only if
    positions keep their distances. Precondition: every row's real tokens
    form one contiguous run (right padding, the project's layout; left
    padding works too). Checking it costs a host sync, so it is checked only
    by a validating plan (ValueError; a plan made here validates, the model's
    in strict mode); otherwise a mask with holes gives wrong outputs.
    Padding positions output 0 and pass back zero gradients. Shapes as
    :func:`local_attention`.
    """
    if not q.is_cuda or q.dtype not in _FLASH_DTYPES:
        raise RuntimeError(
            f"attention backend 'flash' needs CUDA fp16/bf16 tensors; got {q.dtype} on "
            f"{q.device.type} (use 'blocked' or 'auto' there)"
        )
    if q.shape[-1] > _FLASH_MAX_HEAD_DIM:
        raise RuntimeError(
            f"attention backend 'flash' supports head dim <= {_FLASH_MAX_HEAD_DIM}; "
            f"got {q.shape[-1]}"
        )
    return _flash_attention(q, k, v, window, causal, _plan_for(plan, key_padding_mask))


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                     causal: bool, plan: AttentionMaskPlan) -> torch.Tensor:
    """The flash-attn calls of :func:`flash_local_attention` on any tensors ``flash_attn`` takes.

    The device, dtype and head-dim checks are the caller's. The varlen call
    gets all B·L rows with cu_seqlens computed on the device and max_seqlen =
    L (an upper bound), so nothing is read back to the host. The kernel
    neither reads nor writes the rows past ``cu_seqlens[-1]`` (the padding):
    their outputs and their input gradients are undefined, and both are
    selected away with ``torch.where`` (multiplying by 0 would keep NaN).
    """
    flash_attn = _import_flash()
    B, L, H, D = q.shape
    w = min(window, max(L - 1, 0))
    window_size = (w, 0 if causal else w)
    if plan.key_padding_mask is None:
        return flash_attn.flash_attn_func(q, k, v, causal=causal, window_size=window_size)
    if B * L == 0:
        return q.new_zeros(q.shape)
    packing = plan.flash_packing()
    real = packing.real[:, None, None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        # The where passes back exact zeros for the padding rows, whatever
        # the kernel's gradient holds there.
        flat = torch.where(real, t.reshape(B * L, *t.shape[2:]), 0)
        return flat.new_empty(flat.shape).index_copy(0, packing.dest, flat)

    out = flash_attn.flash_attn_varlen_func(
        pack(q), pack(k), pack(v), packing.cu_seqlens, packing.cu_seqlens, L, L,
        causal=causal, window_size=window_size,
    )
    return torch.where(real, out.index_select(0, packing.dest), 0).view(B, L, H, D)


def choose_backend(q: torch.Tensor, window: int) -> str:
    """The backend ``auto`` runs for ``q`` (B, L, H, D) and ``window``.

    * CUDA, fp16/bf16, head dim <= 256 and flash-attn importable: ``flash``
      (the fastest kernel, native GQA);
    * other CUDA tensors: ``flex`` (windowed, O(L·w), any float dtype);
    * CPU: ``sdpa`` when L <= 2w + 1 (the band covers the whole score matrix,
      so the dense kernel does no wasted work: ~2× faster than ``blocked``
      there, fwd+bwd on 2 cores), else ``blocked`` (O(L·w), the only CPU path
      with a backward that is not O(L²)). The measured crossover is near
      L ≈ 2(2w + 1), and ``blocked`` wins from there on (2.5× at L = 4(2w + 1)).
    """
    if q.is_cuda:
        if q.dtype in _FLASH_DTYPES and q.shape[-1] <= _FLASH_MAX_HEAD_DIM and _flash_available():
            return "flash"
        return "flex"
    return "sdpa" if q.shape[1] <= 2 * window + 1 else "blocked"


_BACKEND_FUNCS = {
    "flash": flash_local_attention,
    "flex": flex_local_attention,
    "blocked": blocked_local_attention,
    "sdpa": sdpa_local_attention,
}


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    causal: bool,
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    plan: AttentionMaskPlan | None = None,
) -> torch.Tensor:
    """Sliding-window grouped-query attention.

    q (B, L, H, D); k, v (B, L, G, D) with H % G == 0, query head h using K/V
    head h // (H // G) (as ``repeat_interleave``); key_padding_mask (B, L) bool,
    True = real token, or None. Query i sees key j iff i − w <= j <= i + w
    (causal=False) or i − w <= j <= i (causal=True), w = ``window``, and j is
    real; padding queries and rows with no visible key output 0. Scale
    1/sqrt(D). Returns (B, L, H, D) in q's dtype. ``backend`` is one of
    ``auto`` (see :func:`choose_backend`), ``flash``, ``flex``, ``blocked``,
    ``sdpa``; an explicit backend that cannot run on these tensors raises
    RuntimeError rather than falling back silently. ``plan``: an
    :class:`AttentionMaskPlan` of this ``key_padding_mask`` (ValueError
    otherwise), shared by the calls of one forward so that flex and flash
    build their mask structures once; None makes one for this call, which
    also checks flash's contiguous-rows precondition (one host sync).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    _check_inputs(q, k, v, window, key_padding_mask)
    plan = _plan_for(plan, key_padding_mask)
    if backend == "auto":
        backend = choose_backend(q, window)
    if backend in ("flash", "flex"):
        return _BACKEND_FUNCS[backend](q, k, v, window, causal, key_padding_mask, plan)
    return _BACKEND_FUNCS[backend](q, k, v, window, causal, key_padding_mask)


# ------------------------------------------------------------------ modules


class _GQAProjections(nn.Module):
    """Query (H heads), key/value (G groups) and output projections shared by
    the self- and cross-attention modules; Dh = d / H. ``output_scale`` scales the
    output projection's init (:func:`~liquid_dist.model.utils.residual_scale`)."""

    @initialised
    def __init__(self, cfg: ModelConfig, output_scale: float = 1.0):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.check_finite = cfg.check_finite
        self.q_proj = xavier_linear(cfg.d_model, self.n_heads * self.head_dim)
        self.k_proj = xavier_linear(cfg.d_model, self.n_kv_heads * self.head_dim)
        self.v_proj = xavier_linear(cfg.d_model, self.n_kv_heads * self.head_dim)
        self.out_proj = xavier_linear(self.n_heads * self.head_dim, cfg.d_model,
                                      scale=output_scale)
        self.dropout = nn.Dropout(cfg.dropout)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return self.q_proj(x).view(B, L, self.n_heads, self.head_dim)

    def _keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        return k, v

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        B, L = o.shape[:2]
        y = self.dropout(self.out_proj(o.reshape(B, L, self.n_heads * self.head_dim)))
        return check_finite(type(self).__name__, y, self.check_finite)


class EnhancedLocalAttentionWithGQA(_GQAProjections):
    """Local self-attention with grouped K/V heads (seed 3.3).

    Projections d → H·Dh (queries) and d → G·Dh (keys, values), Dh = d / H,
    H = ``cfg.n_heads``, G = ``cfg.n_kv_heads``; :func:`local_attention` with
    window ``cfg.window`` and backend ``cfg.attention_backend``; output
    projection H·Dh → d and dropout. No rotary embeddings: the model has
    learned absolute positions. ``causal=True`` is the decoder form and adds
    incremental decoding (:meth:`init_state`, :meth:`step`).
    """

    @initialised
    def __init__(self, cfg: ModelConfig, causal: bool, output_scale: float = 1.0):
        super().__init__(cfg, output_scale)
        self.causal = causal
        self.window = cfg.window
        self.backend = cfg.attention_backend

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self._queries(x), *self._keys_values(x))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                plan: AttentionMaskPlan | None = None) -> torch.Tensor:
        """x (B, L, d), mask (B, L) bool (True = real) or None → (B, L, d).

        ``plan``: the :class:`AttentionMaskPlan` of ``mask`` that the layers of
        one forward share, or None (one for this call). Outputs at real
        positions do not depend on what padding holds; at padding positions
        they are the output projection's bias.
        """
        x = zero_padding(x, mask)
        q, k, v = self._project(x)
        o = local_attention(
            q, k, v, window=self.window, causal=self.causal, backend=self.backend,
            key_padding_mask=mask, plan=plan,
        )
        return self._output(o)

    def init_state(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Empty sliding-window cache: a ring buffer of window + 1 slots.

        ``k``, ``v``: (B, window + 1, G, Dh); ``pos``: (B, window + 1) long,
        the absolute position held in each slot, −1 for an empty slot.
        """
        if not self.causal:
            raise RuntimeError("incremental decoding needs the causal (decoder) form")
        slots = self.window + 1
        shape = (batch_size, slots, self.n_kv_heads, self.head_dim)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "pos": torch.full((batch_size, slots), -1, device=device, dtype=torch.long),
        }

    def step(
        self, x_t: torch.Tensor, state: dict[str, torch.Tensor], pos: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One decoding step: x_t (B, 1, d) at absolute position ``pos`` → (B, 1, d).

        Equals ``forward`` at ``pos`` given steps 0..pos−1 were run before.
        Returns a new state; the passed one is not modified. O(window) per step.
        """
        if not self.causal:
            raise RuntimeError("incremental decoding needs the causal (decoder) form")
        q, k, v = self._project(x_t)
        slot = torch.tensor([pos % (self.window + 1)], device=x_t.device)
        # index_copy / index_fill are out of place: the caller's state (maybe
        # shared across beams before a reorder) stays untouched.
        k_buf = state["k"].index_copy(1, slot, k.to(state["k"].dtype))
        v_buf = state["v"].index_copy(1, slot, v.to(state["v"].dtype))
        p_buf = state["pos"].index_fill(1, slot, pos)
        # Consecutive steps leave exactly positions pos − window .. pos in the
        # ring; the second test also keeps stale slots out if a caller resumes
        # at a later pos.
        visible = (p_buf >= 0) & (p_buf >= pos - self.window)  # (B, slots)
        o = _masked_sdpa(q, k_buf.to(q.dtype), v_buf.to(q.dtype), visible[:, None, None, :])
        return self._output(o), {"k": k_buf, "v": v_buf, "pos": p_buf}


class CrossAttention(_GQAProjections):
    """Decoder-to-encoder attention (docs/model.md): full, GQA, encoder padding mask.

    Queries H·Dh from the decoder stream, keys and values G·Dh from the encoder
    output (``memory``), Dh = d / H; no window, no causality (the whole
    encoder output is known before decoding starts). For generation the
    encoder K/V are computed once (:meth:`compute_kv`) and every step calls
    :meth:`attend` on its one position.
    """

    def compute_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, Lm, d) → k, v, each (B, Lm, G, Dh) (batch first: beams reorder them)."""
        return self._keys_values(memory)

    def attend(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, Ld, d) attends to k, v from :meth:`compute_kv` → (B, Ld, d).

        memory_mask (B, Lm) bool, True = real encoder token, or None. Masked
        memory never reaches the output; a row whose memory is all padding
        gets a zero attention output (the output projection's bias).
        """
        q = self._queries(x)
        allowed = None if memory_mask is None else memory_mask[:, None, None, :]
        return self._output(_masked_sdpa(q, k.to(q.dtype), v.to(q.dtype), allowed))

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, Ld, d), memory (B, Lm, d), memory_mask (B, Lm) bool or None → (B, Ld, d)."""
        return self.attend(x, *self.compute_kv(memory), memory_mask)
