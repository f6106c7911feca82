"""MoELayer (seed 3.4, DESIGN.md §2.4): softmax-gated, dropless mixture of experts.

One forward is four separate steps, so that expert parallelism can later put an
``all_to_all_single`` between :func:`dispatch` and :func:`expert_forward` (and
back before :func:`combine`) without touching the router:

1. :func:`route` — gate probabilities, per-token k, top-k_max selection with the
   weights of slots ``>= k`` set to exactly zero (fixed shapes);
2. :func:`dispatch` — drop the zero-weight slots and sort the remaining
   (token, expert) assignments by expert;
3. :func:`expert_forward` — every expert on its contiguous block of tokens, on
   one of the interchangeable backends ``grouped_mm`` / ``loop`` / ``megablocks``;
4. :func:`combine` — weight each expert output by its gate and sum per token.

Dropless: no assignment is ever dropped for capacity; a slot whose weight is
zero (beyond the token's k, or any slot of a padding token) is not an
assignment and is never computed nor exchanged.

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

from liquid_dist.config import MoEConfig
from liquid_dist.model.megablocks import MEGABLOCKS_ERROR, megablocks_expert_forward
from liquid_dist.model.utils import check_finite, xavier_linear

__all__ = ["MEGABLOCKS_ERROR", "DispatchInfo", "MoELayer", "combine", "dispatch",
           "expert_forward", "route", "routing_width"]



class DispatchInfo(NamedTuple):
    """What :func:`combine` needs to undo :func:`dispatch` (stays on the local rank).

    ``slot_index`` (M,): for each expert-sorted row, its flat slot ``n * k_max + s``
    in the (N, k_max) routing tables. ``weight`` (M,): that slot's gate weight
    (fp32, differentiable). ``expert_index`` (M,): the row's expert.
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
    """Sort the token assignments by expert, leaving out zero-weight slots.

    ``x`` (N, d), ``experts`` / ``weights`` (N, k_max) from :func:`route`.
    Returns ``(x_sorted, tokens_per_expert, info)``: ``x_sorted`` (M, d) holds one
    row per assignment with non-zero weight (M = number of such slots), grouped
    by expert in expert order and, within an expert, in token order (stable, so
    the result is deterministic); ``tokens_per_expert`` (E,) int64 counts the rows
    of each group. ``x_sorted`` and ``tokens_per_expert`` are exactly what an
    expert-parallel all-to-all has to send; ``info`` stays local.
    """
    num_tokens, k_max = experts.shape
    flat_experts = experts.reshape(-1)
    flat_weights = weights.reshape(-1)
    kept = torch.nonzero(flat_weights != 0, as_tuple=True)[0]
    order = torch.argsort(flat_experts[kept], stable=True)
    slot_index = kept[order]
    expert_index = flat_experts[slot_index]
    x_sorted = x[torch.div(slot_index, k_max, rounding_mode="floor")]
    tokens_per_expert = torch.bincount(expert_index, minlength=num_experts)
    info = DispatchInfo(slot_index, flat_weights[slot_index], expert_index, num_tokens, k_max)
    return x_sorted, tokens_per_expert, info


def combine(y_sorted: torch.Tensor, info: DispatchInfo) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: (M, d) -> (N, d).

    Every row is written to its own routing slot (``index_copy``, no two rows
    share one) and the k_max slots of a token are summed in slot order, so the
    result is deterministic on every device (no atomic accumulation). The result
    dtype is the promotion of ``y_sorted``'s and the fp32 weights' (fp32).
    """
    weighted = y_sorted * info.weight.unsqueeze(-1)
    slots = weighted.new_zeros(info.num_tokens * info.k_max, y_sorted.shape[-1])
    slots = slots.index_copy(0, info.slot_index, weighted)
    return slots.view(info.num_tokens, info.k_max, y_sorted.shape[-1]).sum(1)


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise RuntimeError(
            f"grouped_mm backend: torch {torch.__version__} has no grouped GEMM "
            "(torch.nn.functional.grouped_mm / torch._grouped_mm); use moe.backend='loop'"
        )
    return fn


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    The grouped GEMM backward rejects gradients with zero strides (e.g. from a
    ``.sum()``), so every grouped GEMM output passes through this.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped_matmul(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    try:
        out = _grouped_mm_fn()(a, b, offs=offs)
    except RuntimeError as exc:
        raise RuntimeError(
            f"grouped_mm backend failed for {a.dtype} on {a.device.type} "
            f"(a {tuple(a.shape)}, b {tuple(b.shape)}): {exc}; use moe.backend='loop'"
        ) from exc
    return _ContiguousGrad.apply(out)


def _check_grouped_mm_alignment(dims: dict[str, int], dtype: torch.dtype) -> None:
    # The kernels need every row stride to be a multiple of 16 bytes.
    per_16_bytes = max(1, 16 // torch.empty((), dtype=dtype).element_size())
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

    ``x_sorted`` (M, d) grouped by expert, ``tokens_per_expert`` (E,) the group
    sizes (sum M; E = ``w1.shape[0]``, the local experts under expert
    parallelism). Weights in the module's layout (``w2``/``b2`` None for linear
    experts). Returns (M, d_out) in the compute dtype (the autocast dtype when
    autocast is on, else ``x_sorted``'s). Every backend computes the same
    function; experts with no rows get no computation and zero gradient.
    """
    dtype = _compute_dtype(x_sorted)
    x_sorted = x_sorted.to(dtype)
    w1, b1 = w1.to(dtype), b1.to(dtype)
    if w2 is not None:
        w2, b2 = w2.to(dtype), b2.to(dtype)
    if backend == "grouped_mm":
        dims = {"d_model": w1.shape[1]}
        if w2 is not None:
            dims["expert_ffn_dim"] = w1.shape[2]
        _check_grouped_mm_alignment(dims, dtype)
        offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        expert_ids = torch.repeat_interleave(
            torch.arange(w1.shape[0], device=x_sorted.device),
            tokens_per_expert,
            output_size=x_sorted.shape[0],
        )
        h = _grouped_matmul(x_sorted.contiguous(), w1, offs) + b1[expert_ids]
        if w2 is None:
            return h
        return _grouped_matmul(F.gelu(h), w2, offs) + b2[expert_ids]
    if backend == "loop":
        outs = []
        start = 0
        for e, count in enumerate(tokens_per_expert.tolist()):
            if count == 0:
                continue
            h = x_sorted[start:start + count] @ w1[e] + b1[e]
            if w2 is not None:
                h = F.gelu(h) @ w2[e] + b2[e]
            outs.append(h)
            start += count
        if not outs:
            out_dim = (w1 if w2 is None else w2).shape[-1]
            return x_sorted.new_zeros(0, out_dim)
        return torch.cat(outs)
    if backend == "megablocks":
        return megablocks_expert_forward(x_sorted, tokens_per_expert, w1, b1, w2, b2)
    raise ValueError(f"unknown MoE backend {backend!r}; expected grouped_mm, loop or megablocks")


class MoELayer(nn.Module):
    """Dropless mixture of experts with a softmax gate and per-token dynamic k.

    ``forward(x, mask)``: x (B, L, d) or (N, d); mask (B, L) / (N,) bool, True =
    real token, or None (all real). Every token is routed, but the routing
    weights of padding tokens are set to exactly zero, so :func:`dispatch`
    leaves them out: padding is never computed by an expert nor sent to
    another rank, and its output row is exactly 0. Returns ``(y, aux)`` with y
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

    def __init__(
        self,
        moe_cfg: MoEConfig,
        d_model: int,
        dropout: float = 0.0,
        check_finite: bool = False,
    ):
        super().__init__()
        self.cfg = moe_cfg
        self.check_finite = check_finite
        num_experts = moe_cfg.num_experts
        self.router = xavier_linear(d_model, num_experts)
        hidden = moe_cfg.expert_ffn_dim if moe_cfg.expert_type == "mlp" else d_model
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        if moe_cfg.expert_type == "mlp":
            self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
            self.b2 = nn.Parameter(torch.zeros(num_experts, d_model))
        else:
            self.register_parameter("w2", None)
            self.register_parameter("b2", None)
        self.dropout = nn.Dropout(dropout)
        # Set from outside by liquid_dist.parallel.expert_parallel: a callable
        # (x_sorted, tokens_per_expert, layer) -> y_sorted that exchanges the
        # rows with the ranks holding the other experts; None = all experts here.
        self.expert_parallel = None
        self.reset_expert_parameters()

    def reset_expert_parameters(self) -> None:
        """Xavier-normal init of each expert's matrices (as one Linear each), zero biases."""
        with torch.no_grad():
            for w in (self.w1, self.w2):
                if w is None:
                    continue
                for e in range(w.shape[0]):
                    nn.init.xavier_normal_(w[e])
            for b in (self.b1, self.b2):
                if b is not None:
                    b.zero_()

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
            y_sorted = self.expert_parallel(x_sorted, tokens_per_expert, self)
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
