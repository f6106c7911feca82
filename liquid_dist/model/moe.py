"""MoELayer (seed 3.4; docs/model.md, "MoELayer"): softmax-gated, dropless mixture of experts.

One forward is four separate steps, so that expert parallelism can put an
``all_to_all_single`` between :func:`dispatch` and :func:`expert_forward` (and
back before :func:`combine`) without touching the router:

1. :func:`route` — gate probabilities, per-token k, top-k_max selection with the
   weights of slots ``>= k`` set to exactly zero (fixed shapes);
2. :func:`dispatch` — sort the N * k_max routing slots by expert (stable), the
   slots that are not assignments after every expert's group;
3. :func:`expert_forward` — every expert on its contiguous block of rows, on
   one of the interchangeable backends ``grouped_mm`` / ``loop`` / ``megablocks``
   (``auto``: see :func:`resolve_moe_backend`);
4. :func:`combine` — weight each expert output by its gate and sum per token.

Dropless: no assignment is ever dropped for capacity. A slot whose weight is
zero (beyond the token's k, or any slot of a padding token) is not an
assignment: it is sorted after every expert's group, no expert computes it, its
expert output row is exactly 0, and expert parallelism does not send it.

Fixed shapes, no host synchronisation: every tensor's shape depends only on N
and k_max, never on the routing, and no device value is read on the host, so a
layer without expert parallelism is one ``torch.compile(fullgraph=True)`` graph
and never stalls the GPU queue. Group sizes come from a binary search in the
sorted expert ids, each row's expert from a search in their running sum, and the
grouped GEMM is the custom op ``liquid_dist::grouped_mm`` (:func:`grouped_mm`),
one opaque call for dynamo in every dtype. Two documented exceptions, both
inherent to an API that takes sizes on the host:

* ``megablocks``: MegaBlocks' ``gmm`` takes the group sizes on the host (one
  read per layer forward);
* expert parallelism: ``all_to_all_single`` takes host split sizes. The layer
  reads its number of assignments to cut the other rows off before the
  exchange (so they are never sent), and the exchange reads its send and
  receive splits once, after exchanging the counts
  (liquid_dist/parallel/expert_parallel.py): two host reads per MoE layer
  forward, none in backward.

Expert weight layout (fused over experts, shared by every backend):

* ``expert_type="mlp"``: ``w1 (E, d, F)``, ``b1 (E, F)``, ``w2 (E, F, d)``,
  ``b2 (E, d)``; expert e computes ``GELU(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``.
* ``expert_type="linear"`` (the seed's ``y_j = W_j x + b_j``): ``w1 (E, d, d)``,
  ``b1 (E, d)``; ``w2`` and ``b2`` are ``None``; expert e computes
  ``x @ w1[e] + b1[e]``.

MegaBlocks stores ``w1``/``w2`` as ``(E * F, d)`` with ``act(x @ w1[e].T) @ w2[e]``:
its ``w1`` is ``w1.transpose(1, 2).reshape(E * F, d)`` and its ``w2`` is
``w2.reshape(E * F, d)`` of this layout (liquid_dist/model/megablocks.py maps
both ways).

Expert parallelism plugs in from outside: ``MoELayer.expert_parallel`` (None by
default) replaces the local expert step by an exchange with the ranks that hold
the other experts (liquid_dist/parallel/expert_parallel.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, MoEConfig
from .init import (
    Constant,
    PerExpert,
    TruncNormal,
    XavierNormal,
    initialised,
    new_parameter,
    set_init,
)
from .megablocks import MEGABLOCKS_ERROR, megablocks_expert_forward
from .utils import check_finite

__all__ = ["MEGABLOCKS_ERROR", "MOE_BACKENDS", "DispatchInfo", "MoELayer", "combine",
           "dispatch", "expert_forward", "grouped_mm", "resolve_moe_backend", "route",
           "routing_width"]

MOE_BACKENDS = ("auto", "grouped_mm", "loop", "megablocks")
"""The values of ``moe.backend``."""

_ROUTER_INIT_SCALE = 0.1
"""Switch Transformer's router init scale s: weights ~ truncated N(0, s / d_model)."""

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Resolved ``train.precision`` -> the dtype the experts compute in."""


class DispatchInfo(NamedTuple):
    """What :func:`combine` needs to undo :func:`dispatch` (stays on the local rank).

    All per-row tensors have M = N * k_max rows, in :func:`dispatch`'s order.
    ``slot_index`` (M,): each row's flat slot ``n * k_max + s`` in the (N, k_max)
    routing tables (a permutation of ``range(M)``). ``weight`` (M,): that slot's
    gate weight (fp32, differentiable; exactly 0 for a non-assignment).
    ``expert_index`` (M,): the row's expert, ``E`` (= ``num_experts``) for a
    non-assignment.
    """

    slot_index: torch.Tensor
    weight: torch.Tensor
    expert_index: torch.Tensor
    num_tokens: int
    k_max: int


def routing_width(moe_cfg: MoEConfig) -> int:
    """The number of routing slots per token: k_max under dynamic k, else top_k (<= E)."""
    k = moe_cfg.k_max if moe_cfg.dynamic_k else moe_cfg.top_k
    return min(k, moe_cfg.num_experts)


def route(
    logits: torch.Tensor, moe_cfg: MoEConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate, per-token k and top-k_max selection.

    ``logits`` (N, E) router outputs (computed in fp32 by the caller). Returns
    ``(weights, experts, k, probs)``:

    * ``probs`` (N, E) fp32 softmax gate p, differentiable;
    * ``experts`` (N, k_max) int64, the k_max most probable experts, most probable first;
    * ``k`` (N,) int64: ``max(1, min(E, floor(top_k * (1 + H(p)))))`` with H the
      token's routing entropy (natural log) under ``dynamic_k``, further capped
      by ``k_max`` (the tensor width); ``top_k`` otherwise;
    * ``weights`` (N, k_max) fp32: p of the selected experts (divided by their sum
      under ``renormalize``), exactly 0 in slots ``>= k``; differentiable
      w.r.t. the logits.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    width = routing_width(moe_cfg)
    top_p, experts = torch.topk(probs, width, dim=-1)
    if moe_cfg.dynamic_k:
        with torch.no_grad():
            entropy = torch.special.entr(probs).sum(-1)
            k = torch.floor(moe_cfg.top_k * (1.0 + entropy)).long()
            k = k.clamp(1, moe_cfg.num_experts).clamp_max(width)
    else:
        k = torch.full(probs.shape[:1], width, dtype=torch.long, device=probs.device)
    active = torch.arange(width, device=probs.device) < k.unsqueeze(-1)
    weights = top_p.masked_fill(~active, 0.0)
    if moe_cfg.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts, k, probs


def dispatch(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, DispatchInfo]:
    """Sort the N * k_max routing slots by expert, the non-assignments last.

    ``x`` (N, d), ``experts`` / ``weights`` (N, k_max) from :func:`route`; a slot
    is an assignment iff its weight is non-zero. Returns ``(x_sorted,
    tokens_per_expert, info)``:

    * ``x_sorted`` (N * k_max, d): one row per slot, its token's input. The
      assignments come first, grouped by expert in expert order and, within an
      expert, in token order (a stable sort, so the result is deterministic);
      the non-assignments follow, after every expert's group;
    * ``tokens_per_expert`` (E,) int64: the size of each expert's group (its sum
      is the number of assignments, the rows an expert computes);
    * ``info``: what :func:`combine` needs; it stays local.

    Every shape depends only on N and k_max, and nothing is read on the host
    (no ``nonzero``, no ``bincount``): the group sizes are a binary search of
    the expert ids ``0..E`` in the sorted ids. The first
    ``tokens_per_expert.sum()`` rows of ``x_sorted`` and ``tokens_per_expert``
    are exactly what an expert-parallel all-to-all has to send.
    """
    num_tokens, k_max = experts.shape
    flat_weights = weights.reshape(-1)
    # Non-assignments get the sentinel expert E: sorted after every real group.
    keys = torch.where(flat_weights != 0, experts.reshape(-1), num_experts)
    expert_index, slot_index = torch.sort(keys, stable=True)
    # index_select: a deterministic backward for any thread count (see _grouped_experts)
    x_sorted = x.index_select(0, torch.div(slot_index, k_max, rounding_mode="floor"))
    bounds = torch.searchsorted(
        expert_index, torch.arange(num_experts + 1, device=keys.device, dtype=keys.dtype)
    )
    tokens_per_expert = bounds.diff()
    info = DispatchInfo(slot_index, flat_weights.index_select(0, slot_index), expert_index,
                        num_tokens, k_max)
    return x_sorted, tokens_per_expert, info


def combine(y_sorted: torch.Tensor, info: DispatchInfo) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: (N * k_max, d) -> (N, d).

    ``y_sorted`` in :func:`dispatch`'s row order, finite in every row (what
    :func:`expert_forward` returns: its non-assignment rows are exactly 0, and
    their weight is 0, so they add exactly 0). Every row is written to its own
    routing slot (``index_copy`` of a permutation) and the k_max slots of a
    token are summed in slot order, so the result is deterministic on every
    device (no atomic accumulation). The result dtype is the promotion of
    ``y_sorted``'s and the fp32 weights' (fp32).
    """
    weighted = y_sorted * info.weight.unsqueeze(-1)
    slots = weighted.new_zeros(info.num_tokens * info.k_max, y_sorted.shape[-1])
    slots = slots.index_copy(0, info.slot_index, weighted)
    return slots.view(info.num_tokens, info.k_max, y_sorted.shape[-1]).sum(1)


# ------------------------------------------------------------ grouped GEMM op


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise RuntimeError(
            f"grouped_mm backend: torch {torch.__version__} has no grouped GEMM "
            "(torch.nn.functional.grouped_mm / torch._grouped_mm); use moe.backend='loop'"
        )
    return fn


def _call_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    try:
        return _grouped_mm_fn()(a, b, offs=offs)
    except RuntimeError as exc:
        raise RuntimeError(
            f"grouped_mm backend failed for {a.dtype} on {a.device.type} "
            f"(a {tuple(a.shape)}, b {tuple(b.shape)}): {exc}; use moe.backend='loop'"
        ) from exc


@torch.library.custom_op("liquid_dist::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM over row groups: ``a`` (M, K), ``b`` (E, K, N) -> (M, N).

    ``offs`` (E,) int32, the running sum of the group sizes: rows
    ``[offs[e-1], offs[e])`` of the result are those rows of ``a`` times
    ``b[e]``; rows ``>= offs[-1]`` are exactly 0 (``torch._grouped_mm`` leaves
    them uninitialised) and their rows of ``a`` are never read. Differentiable
    in ``a`` and ``b`` with the same grouped GEMMs as ``torch._grouped_mm``'s
    own backward (rows ``>= offs[-1]`` of the input gradient are 0 too; an
    empty group's weight gradient is 0), in every dtype the grouped GEMM takes.
    A ``torch.library`` custom op, so that ``torch.compile`` traces it as one
    opaque call: dynamo never sees ``torch._grouped_mm``'s bf16-only meta
    check (which fails fp32 graphs even on CPU) nor its data-dependent loop.
    """
    out = _call_grouped_mm(a, b, offs)
    computed = torch.arange(a.shape[0], device=a.device) < offs[-1]
    return torch.where(computed.unsqueeze(-1), out, 0)


@grouped_mm.register_fake
def _grouped_mm_fake(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("liquid_dist::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(a: torch.Tensor, grad: torch.Tensor,
                           offs: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`grouped_mm` w.r.t. ``b``: (E, K, N), group e = ``a_e^T @ grad_e``.

    ``a`` (M, K), ``grad`` (M, N), ``offs`` as in :func:`grouped_mm`; rows
    ``>= offs[-1]`` are not read. An empty group's block is exactly 0 (forced:
    Blackwell kernels have been seen to leave it non-zero, pytorch#172439).
    """
    out = _call_grouped_mm(a.t(), grad, offs)
    sizes = offs.diff(prepend=offs.new_zeros(1))
    return torch.where((sizes > 0).view(-1, 1, 1), out, 0)


@grouped_mm_weight_grad.register_fake
def _grouped_mm_weight_grad_fake(a: torch.Tensor, grad: torch.Tensor,
                                 offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(offs.shape[0], a.shape[1], grad.shape[1])


def _grouped_mm_setup_context(ctx, inputs, output) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, grad: torch.Tensor):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()  # the grouped GEMM rejects zero strides (e.g. from a .sum())
    grad_a = grouped_mm(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_b = grouped_mm_weight_grad(a, grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup_context)


# ------------------------------------------------------------ backends


def _check_grouped_mm_alignment(dims: dict[str, int], dtype: torch.dtype) -> None:
    # The kernels need every row stride to be a multiple of 16 bytes.
    per_16_bytes = max(1, 16 // dtype.itemsize)
    bad = {name: n for name, n in dims.items() if n % per_16_bytes}
    if bad:
        raise ValueError(
            f"grouped_mm backend needs {', '.join(dims)} to be multiples of {per_16_bytes} "
            f"for {dtype} (16-byte rows); got {bad}; use moe.backend='loop'"
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # The grouped GEMM is not on autocast's list; cast by hand as F.linear would be.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_mm_is_fast(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``grouped_mm`` has a sync-free kernel here: CPU any float dtype; CUDA bf16.

    On CUDA, ``torch._grouped_mm`` takes bf16 only (its kernels are SM90/SM100);
    fp32 and fp16 go to a fallback that copies the offsets to the host and
    loops over the groups (docs/design.md, "Platform facts").
    """
    return device_type == "cpu" or (device_type == "cuda" and dtype == torch.bfloat16)


def _auto_backend(device_type: str, dtype: torch.dtype) -> str:
    return "grouped_mm" if _grouped_mm_is_fast(device_type, dtype) else "loop"


def resolve_moe_backend(moe_cfg: MoEConfig, device_type: str, precision: str) -> str:
    """The expert-compute backend a run uses; ConfigError if ``moe.backend`` cannot work there.

    ``device_type`` ``"cpu"`` or ``"cuda"`` (any other is treated as a device
    without a fast grouped GEMM); ``precision`` the *resolved* ``train.precision``
    (``fp32`` / ``bf16`` / ``fp16``). Needs no GPU. Decisions:

    * ``auto`` -> ``grouped_mm`` where it has a fast sync-free kernel (CPU in
      any precision, CUDA in bf16), else ``loop`` (CUDA fp32 / fp16: exact and
      sync-free, but every expert computes every row, E times the expert FLOPs);
    * ``grouped_mm`` -> itself where it is fast; on CUDA fp32 / fp16 a
      ConfigError (its fallback there reads the offsets on the host in every
      layer);
    * ``megablocks`` -> itself on CUDA in bf16 (MegaBlocks' grouped GEMM is
      bf16 CUDA only), else a ConfigError;
    * ``loop`` -> itself everywhere.

    The same table decides ``auto`` at run time in :func:`expert_forward` from
    the device and the compute dtype, so a model built with ``auto`` runs
    anywhere.
    """
    if precision not in PRECISION_DTYPES:
        raise ConfigError("train.precision", precision,
                          f"a resolved precision, one of {sorted(PRECISION_DTYPES)} "
                          "(liquid_dist.parallel.build_plan.resolve_precision)")
    backend = moe_cfg.backend
    if backend not in MOE_BACKENDS:
        raise ConfigError("model.moe.backend", backend, f"one of {list(MOE_BACKENDS)}")
    dtype = PRECISION_DTYPES[precision]
    if backend == "auto":
        return _auto_backend(device_type, dtype)
    if backend == "grouped_mm" and not _grouped_mm_is_fast(device_type, dtype):
        raise ConfigError(
            "model.moe.backend", backend,
            f"a backend that runs without host syncs on {device_type} in {precision}: "
            "'auto' or 'loop' (exact; every expert computes every row), or "
            "train.precision=bf16 for grouped_mm (on CUDA it takes bf16 only; in fp32 / "
            "fp16 it falls back to a loop that copies the offsets to the host)")
    if backend == "megablocks" and not (device_type == "cuda" and precision == "bf16"):
        raise ConfigError(
            "model.moe.backend", backend,
            f"'auto', 'grouped_mm' or 'loop' on {device_type} in {precision} "
            "(MegaBlocks' grouped GEMM runs on CUDA in bf16 only)")
    return backend


def _row_experts(tokens_per_expert: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows,) int64: the expert of each row of a grouped block; E for rows past the groups."""
    ends = torch.cumsum(tokens_per_expert, 0)
    index = torch.arange(rows, device=tokens_per_expert.device, dtype=ends.dtype)
    return torch.searchsorted(ends, index, right=True)


def _loop_experts(x: torch.Tensor, row_expert: torch.Tensor, w1: torch.Tensor,
                  b1: torch.Tensor, w2: torch.Tensor | None,
                  b2: torch.Tensor | None) -> torch.Tensor:
    """The reference: for each expert, one matmul over all rows, keeping only its own.

    Sync-free and fixed-shape (compiles with ``fullgraph=True``) at E times the
    expert FLOPs. Inputs of other rows are replaced by 0 before the matmul and
    outputs selected after it (``torch.where``, not a multiplication), so a row
    only ever reaches its own expert, in the forward and in every gradient.
    """
    out_dim = (w1 if w2 is None else w2).shape[-1]
    out = x.new_zeros(x.shape[0], out_dim)
    for e in range(w1.shape[0]):
        mine = (row_expert == e).unsqueeze(-1)
        h = torch.where(mine, x, 0) @ w1[e] + b1[e]
        if w2 is not None:
            h = F.gelu(h) @ w2[e] + b2[e]
        out = torch.where(mine, h, out)
    return out


def _grouped_experts(x: torch.Tensor, tokens_per_expert: torch.Tensor,
                     row_expert: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                     w2: torch.Tensor | None, b2: torch.Tensor | None) -> torch.Tensor:
    dims = {"d_model": w1.shape[1]}
    if w2 is not None:
        dims["expert_ffn_dim"] = w1.shape[2]
    _check_grouped_mm_alignment(dims, x.dtype)
    offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    # Row E of the padded biases is 0: rows past the groups stay exactly 0. index_select,
    # not x[index]: its backward (index_add_) sums a bias's rows in a fixed order on the
    # CPU with any number of threads; indexing's (index_put_ with accumulate) does not.
    h = grouped_mm(x.contiguous(), w1, offs) + F.pad(b1, (0, 0, 0, 1)).index_select(
        0, row_expert)
    if w2 is None:
        return h
    return grouped_mm(F.gelu(h), w2, offs) + F.pad(b2, (0, 0, 0, 1)).index_select(
        0, row_expert)


def expert_forward(
    x_sorted: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """Run each expert on its contiguous block of expert-sorted rows.

    ``x_sorted`` (M, d): the first ``tokens_per_expert.sum()`` rows grouped by
    expert in expert order, ``tokens_per_expert`` (E,) the group sizes (E =
    ``w1.shape[0]``, the local experts under expert parallelism); rows after
    the groups (:func:`dispatch`'s non-assignments) are computed by no expert.
    Weights in the module's layout (``w2``/``b2`` None for linear experts);
    ``backend`` one of :data:`MOE_BACKENDS` (``auto`` decided here from the
    device and the compute dtype, as in :func:`resolve_moe_backend`). Returns
    (M, d_out) in the compute dtype (the autocast dtype when autocast is on,
    else ``x_sorted``'s), its rows after the groups exactly 0. Every backend
    computes the same function; experts with no rows get exactly zero
    gradient, and so do the input rows after the groups. ``grouped_mm`` and
    ``loop`` are fixed-shape and read nothing on the host; ``megablocks``
    reads the group sizes on the host.
    """
    if backend not in MOE_BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}; expected one of {list(MOE_BACKENDS)}")
    dtype = _compute_dtype(x_sorted)
    x_sorted = x_sorted.to(dtype)
    w1, b1 = w1.to(dtype), b1.to(dtype)
    if w2 is not None:
        w2, b2 = w2.to(dtype), b2.to(dtype)
    if backend == "auto":
        backend = _auto_backend(x_sorted.device.type, dtype)
    if backend == "megablocks":
        return megablocks_expert_forward(x_sorted, tokens_per_expert, w1, b1, w2, b2)
    row_expert = _row_experts(tokens_per_expert, x_sorted.shape[0])
    if backend == "loop":
        return _loop_experts(x_sorted, row_expert, w1, b1, w2, b2)
    return _grouped_experts(x_sorted, tokens_per_expert, row_expert, w1, b1, w2, b2)


class MoELayer(nn.Module):
    """Dropless mixture of experts with a softmax gate and per-token dynamic k.

    ``forward(x, mask)``: x (B, L, d) or (N, d); mask (B, L) / (N,) bool, True =
    real token, or None (all real). Every token is routed, but the routing
    weights of padding tokens are set to exactly zero, so :func:`dispatch`
    sorts their slots after every expert's group: padding is never computed by
    an expert nor sent to another rank, and its output row is exactly 0.
    Without expert parallelism the forward (and backward) is fixed-shape and
    reads nothing on the host (module docstring). Returns ``(y, aux)`` with y
    shaped and typed like x (output dropout applied) and ``aux`` holding,
    unweighted (the model applies the loss weights), over real tokens only:

    * ``moe_entropy``: log E - H(p̄) >= 0, p̄ the mean gate distribution over
      real tokens; 0 when balanced (scalar, differentiable);
    * ``moe_overuse``: Σ_j ReLU(p̄_j - θ), θ = ``overuse_threshold`` (scalar,
      differentiable; soft usage so that it has a gradient);
    * ``expert_usage`` (E,): hard fraction of the real tokens' assignments
      (non-zero-weight slots) that went to each expert (sums to 1; no grad);
    * ``mean_k``: mean number of selected experts per real token (no grad).

    Both losses are 0 when the batch has no real token. The router runs in fp32
    even under autocast, so k and the losses do not depend on the precision.
    """

    @initialised
    def __init__(
        self,
        moe_cfg: MoEConfig,
        d_model: int,
        dropout: float = 0.0,
        check_finite: bool = False,
        output_scale: float = 1.0,
    ):
        super().__init__()
        self.cfg = moe_cfg
        self.check_finite = check_finite
        self.output_scale = output_scale
        num_experts = moe_cfg.num_experts
        # Switch Transformer's router init: truncated normal, std sqrt(0.1 / d), zero
        # bias. Routing starts near uniform, so no expert is favoured by the draw.
        self.router = nn.Linear(d_model, num_experts)
        set_init(self.router, "weight", TruncNormal((_ROUTER_INIT_SCALE / d_model) ** 0.5))
        set_init(self.router, "bias", Constant(0.0))
        hidden = moe_cfg.expert_ffn_dim if moe_cfg.expert_type == "mlp" else d_model
        # Each expert's matrices as one Linear each (Xavier-normal; the output matrix's
        # std times output_scale), zero biases; one generator per expert (init.PerExpert).
        mlp = moe_cfg.expert_type == "mlp"
        new_parameter(self, "w1", torch.empty(num_experts, d_model, hidden),
                      PerExpert(XavierNormal(1.0 if mlp else output_scale)))
        new_parameter(self, "b1", torch.empty(num_experts, hidden), PerExpert(Constant(0.0)))
        if mlp:
            new_parameter(self, "w2", torch.empty(num_experts, hidden, d_model),
                          PerExpert(XavierNormal(output_scale)))
            new_parameter(self, "b2", torch.empty(num_experts, d_model), PerExpert(Constant(0.0)))
        else:
            self.register_parameter("w2", None)
            self.register_parameter("b2", None)
        self.dropout = nn.Dropout(dropout)
        # Set from outside by liquid_dist.parallel.expert_parallel: a callable
        # (x_sorted, tokens_per_expert, layer) -> y_sorted that exchanges the
        # rows with the ranks holding the other experts; it gets the assignment
        # rows only (forward cuts the others off); None = all experts here.
        self.expert_parallel = None

    def expert_parameters(self) -> list[nn.Parameter]:
        """The fused expert tensors (first dim = expert index); the router is not one."""
        return [p for p in (self.w1, self.b1, self.w2, self.b2) if p is not None]

    def local_expert_forward(
        self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor
    ) -> torch.Tensor:
        """:func:`expert_forward` on the experts this module holds (all, or a slice under EP)."""
        return expert_forward(
            x_sorted, tokens_per_expert, self.w1, self.b1, self.w2, self.b2, self.cfg.backend
        )

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, E) fp32 logits, outside autocast."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float(), self.router.bias.float())

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, experts, k, probs = route(self.router_logits(tokens), self.cfg)
        real = None
        if mask is not None:
            real = mask.reshape(-1).bool()
            # Zero-weight slots are not dispatched: padding reaches no expert.
            weights = weights.masked_fill(~real.unsqueeze(-1), 0.0)
        x_sorted, tokens_per_expert, info = dispatch(
            tokens, experts, weights, self.cfg.num_experts
        )
        if self.expert_parallel is None:
            y_sorted = self.local_expert_forward(x_sorted, tokens_per_expert)
        else:
            # The exchange needs host split sizes anyway: read the number of
            # assignments here, so that the other rows are never sent.
            assigned = int(tokens_per_expert.sum())
            y_sent = self.expert_parallel(x_sorted[:assigned], tokens_per_expert, self)
            y_sorted = F.pad(y_sent, (0, 0, 0, x_sorted.shape[0] - assigned))
        y = self.dropout(combine(y_sorted, info).to(x.dtype)).reshape(shape)
        aux = self.aux_losses(probs, experts, weights, k, real)
        return check_finite("MoELayer", y, self.check_finite), aux

    def aux_losses(
        self,
        probs: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        k: torch.Tensor,
        real: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Auxiliary losses and usage statistics over the real tokens (see class doc).

        ``probs`` (N, E), ``experts`` / ``weights`` (N, k_max), ``k`` (N,) from
        :func:`route`; ``real`` (N,) bool or None (all real).
        """
        num_experts = probs.shape[-1]
        if real is None:
            real = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
        m = real.to(probs.dtype)
        count = m.sum()
        has_tokens = count > 0
        p_bar = (probs * m.unsqueeze(-1)).sum(0) / count.clamp_min(1.0)
        # Clamped inside the log only: finite gradient even where p̄_j == 0.
        h_bar = -(p_bar * torch.log(p_bar.clamp_min(torch.finfo(p_bar.dtype).tiny))).sum()
        zero = probs.new_zeros(())
        entropy_loss = torch.where(has_tokens, (math.log(num_experts) - h_bar).clamp_min(0), zero)
        overuse_loss = torch.where(
            has_tokens, F.relu(p_bar - self.cfg.overuse_threshold).sum(), zero
        )
        with torch.no_grad():
            assigned = ((weights != 0) & real.unsqueeze(-1)).to(probs.dtype)
            counts = probs.new_zeros(num_experts).index_add_(
                0, experts.reshape(-1), assigned.reshape(-1)
            )
            usage = counts / counts.sum().clamp_min(1.0)
            mean_k = (k.to(probs.dtype) * m).sum() / count.clamp_min(1.0)
        return {
            "moe_entropy": entropy_loss,
            "moe_overuse": overuse_loss,
            "expert_usage": usage,
            "mean_k": mean_k,
        }
