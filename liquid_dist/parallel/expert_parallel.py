"""Expert parallelism for :class:`~liquid_dist.model.moe.MoELayer` under DeepSpeed ZeRO-3.

The model stays parallelism-agnostic; this module plugs into it from outside
(docs/parallelism.md explains the choice):

* :func:`apply_expert_parallel` replaces each MoE layer's fused expert tensors
  ``w1 / b1 / w2 / b2`` (first dim = expert) by this rank's contiguous slice of
  ``num_experts / ep_size`` experts and installs an :class:`ExpertExchange` as
  the layer's ``expert_parallel`` hook: the project's router, dispatch, combine
  and auxiliary losses run unchanged on every rank, and only the expert
  computation moves to the rank that holds the expert (two ``all_to_all_single``
  calls in the expert-parallel group, differentiable). ``all_to_all_single``
  takes host split sizes, so expert parallelism is where the MoE layer reads
  the device on the host: the layer reads its number of assignments (to send
  only those rows) and the exchange reads both split sizes in one go after
  exchanging the per-expert counts — two host reads per MoE layer forward,
  none in backward (the backward reuses the forward's splits).
* The sliced parameters are marked the way DeepSpeed's AutoEP marks its expert
  parameters (``ds_zero_placement_family = "autoep_expert"``, the EP group
  name, ``allreduce = False``), so ZeRO-3 itself partitions and reduces them
  over the expert-data-parallel group only, divides their gradients by the
  global data-parallel size and adds their norm into the one gradient norm
  used for clipping and reporting.
  Unmarked, ZeRO-3 would broadcast rank 0's experts to every rank and average
  different experts' gradients, and training would run, wrongly (docs/parallelism.md,
  "The choice").

Groups and markings are DeepSpeed's, reached through
:mod:`liquid_dist.parallel.ds_compat` (legacy layout): with W ranks and
ep_size P, the expert-parallel groups are ``[0..P-1], [P..2P-1], ...`` and
rank r holds global experts ``[(r % P) * E/P, (r % P + 1) * E/P)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from liquid_dist.model.init import expert_slice
from liquid_dist.parallel.ds_compat import (
    create_expert_groups,
    expert_parallel_group,
    expert_parallel_rank,
    mark_expert_parameter,
)


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """Global expert indices ``[start, stop)`` held by expert-parallel rank ``ep_rank``."""
    local = num_experts // ep_size
    return ep_rank * local, (ep_rank + 1) * local


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward sends the gradients back the reverse way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        output_splits, input_splits = ctx.splits
        grad_in = grad.new_empty((sum(input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), input_splits, output_splits,
                               group=ctx.group)
        return grad_in, None, None, None


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: Any) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


def _join_graph(y: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``y`` plus an exact zero that depends on every tensor in ``tensors``.

    The backward pass must run the same collectives on every rank: the reverse
    all-to-alls (reached only through ``x_recv``) and ZeRO's gradient reduction
    of every expert tensor (whose hooks fire only for tensors that get a
    gradient). A rank that received no rows would otherwise drop out of the
    graph and leave the other ranks waiting.
    """
    zero = sum(t.reshape(-1)[:1].sum() for t in tensors) * 0.0
    return y + zero.to(y.dtype)


@dataclass
class ExpertExchange:
    """The ``MoELayer.expert_parallel`` hook: rows to their experts' ranks and back.

    ``__call__(x_sorted, tokens_per_expert, layer) -> y_sorted``: ``x_sorted``
    (M, d) the assignment rows of :func:`~liquid_dist.model.moe.dispatch`
    grouped by global expert (``MoELayer.forward`` cuts the non-assignment
    rows off, so padding is never sent; M = ``tokens_per_expert.sum()``),
    ``tokens_per_expert`` (E,) the group sizes; returns (M, d_out) in the same
    row order, each row computed by the rank that holds its expert. Reads the
    send and receive split sizes on the host once, after the exchange of the
    counts. Every rank of the group joins both exchanges even when it sends or
    receives no rows, so a rank whose experts get no tokens never leaves the
    others waiting.
    """

    group: Any
    ep_size: int
    ep_rank: int
    num_experts: int

    def __call__(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor,
                 layer: nn.Module) -> torch.Tensor:
        local = self.num_experts // self.ep_size
        counts = tokens_per_expert.to(torch.int64).contiguous()
        # received[s, j]: rows rank s sends for this rank's local expert j
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.ep_size, local)
        # the exchange's one host read: both split sizes at once
        send_splits, recv_splits = torch.stack(
            [counts.view(self.ep_size, local).sum(1), received.sum(1)]).tolist()
        x_recv = _all_to_all(x_sorted, recv_splits, send_splits, self.group)
        # rows arrive grouped by source rank, then by expert: regroup by expert,
        # sources in rank order (stable), i.e. the global batch's token order
        expert_of_row = torch.repeat_interleave(
            torch.arange(local, device=counts.device).repeat(self.ep_size), received.reshape(-1),
            output_size=x_recv.shape[0])
        order = torch.argsort(expert_of_row, stable=True)
        y_local = layer.local_expert_forward(x_recv[order], received.sum(0))
        y_local = _join_graph(y_local, [x_recv, *layer.expert_parameters()])
        y_recv = torch.empty_like(y_local).index_copy(0, order, y_local)
        return _all_to_all(y_recv, send_splits, recv_splits, self.group)


@dataclass(frozen=True)
class ExpertLayout:
    """Which global experts this rank holds (the same for every MoE layer)."""

    ep_size: int
    ep_rank: int
    num_experts: int
    group_name: str
    layers: tuple[str, ...]

    @property
    def global_experts(self) -> list[int]:
        start, stop = expert_range(self.num_experts, self.ep_size, self.ep_rank)
        return list(range(start, stop))


def _moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from liquid_dist.model.moe import MoELayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


def apply_expert_parallel(model: nn.Module, ep_size: int) -> ExpertLayout:
    """Keep this rank's slice of every MoE layer's experts and install the exchange hook.

    Call on every rank after the model is built (on the meta device, or whole
    with the same seed) and before ``deepspeed.initialize``: rank r keeps global
    experts :func:`expert_range` of its expert-parallel rank, whose values
    (drawn or loaded, liquid_dist.model.init) are exactly the corresponding
    slice of a single-process model. Needs the default process group
    (collective: creates the groups) and an ``ep_size`` dividing the experts and the
    world size (the run plan checks it: liquid_dist.train.prepare).
    """
    layers = _moe_layers(model)
    if not layers:
        raise ValueError("expert parallelism needs a model with MoE layers")
    num_experts = layers[0][1].cfg.num_experts
    name = create_expert_groups(ep_size)
    ep_rank = expert_parallel_rank(name)
    start, stop = expert_range(num_experts, ep_size, ep_rank)
    hook = ExpertExchange(group=expert_parallel_group(name), ep_size=ep_size,
                          ep_rank=ep_rank, num_experts=num_experts)
    for _, layer in layers:
        for attr in ("w1", "b1", "w2", "b2"):
            full = getattr(layer, attr)
            if full is None:
                continue
            mark_expert_parameter(expert_slice(layer, attr, start, stop), name)
        layer.expert_parallel = hook
    return ExpertLayout(ep_size=ep_size, ep_rank=ep_rank, num_experts=num_experts,
                        group_name=name, layers=tuple(n for n, _ in layers))


def split_expert_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move expert parameters into their own optimizer groups (same hyper-parameters).

    ZeRO-3 keeps one partition process group per optimizer sub-group, so expert
    and dense parameters must never share a group. Uses DeepSpeed's own
    ``split_params_into_different_moe_groups_for_optimizer`` (groups need a
    ``name``; unnamed ones are named by position).
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [dict(g, name=g.get("name", f"group{i}")) for i, g in enumerate(param_groups)]
    split = split_params_into_different_moe_groups_for_optimizer(named)
    return [g for g in split if g["params"]]
