"""The run's DeepSpeed engine, built from outside the trainer (as torchtitan applies its
parallelism from outside the model): the model built and partitioned
(:mod:`liquid_dist.parallel.construction`), its blocks compiled
(``train.compile``: :mod:`liquid_dist.parallel.compile`), the ZeRO-3 leaf modules
chosen, the optimizer, ``deepspeed.initialize`` with the plan's config, and fp32
master weights shared with the parameters' partitions (ds_compat)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from liquid_dist.model.utils import param_groups as model_param_groups
from liquid_dist.parallel.build_plan import BuildPlan
from liquid_dist.parallel.compile import compile_blocks
from liquid_dist.parallel.construction import build_model
from liquid_dist.parallel.ds_compat import share_fp32_master_partitions, zero_partition_padding
from liquid_dist.parallel.expert_parallel import ExpertLayout, split_expert_param_groups


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose :meth:`step` does nothing while ``skip`` is set.

    DeepSpeed calls the wrapped optimizer's ``step`` from inside its own (after
    gradient reduction and clipping) and zeroes the gradients afterwards in
    any case, so a skipped step leaves weights and moments untouched.
    """

    skip: bool = False
    skip_if: Optional[Callable[[], bool]] = None
    """Asked inside the step, when DeepSpeed has the gradient norm (the spike check)."""

    def step(self, closure=None):  # type: ignore[override]
        if self.skip or (self.skip_if is not None and self.skip_if()):
            return None
        return super().step(closure)


class PretrainingModule(nn.Module):
    """What DeepSpeed wraps: the model, returning a dict of tensors DeepSpeed can traverse.

    ``forward(**batch)`` -> ``loss``, ``ce``, ``ce_sum`` (summed over the real targets),
    ``aux_loss`` (the weighted auxiliary terms), the auxiliary terms (scalars) and
    ``expert_usage`` (MoE layers, experts). Weights are stored as ``model.*``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, encoder_input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                labels: torch.Tensor,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        out = self.model(encoder_input_ids, decoder_input_ids,
                         encoder_attention_mask=encoder_attention_mask, labels=labels)
        result = {"loss": out.loss, "ce_sum": out.ce_sum, "aux_loss": out.aux_loss, **out.aux}
        if out.expert_usage:
            result["expert_usage"] = torch.stack([u.float() for u in out.expert_usage])
        return result


@dataclass
class BuiltEngine:
    engine: Any
    """The DeepSpeed engine around a :class:`PretrainingModule`."""
    optimizer: SkippableAdamW
    model: nn.Module
    """The model inside the engine (this rank's experts, ZeRO-3 partitions)."""
    parameter_counts: dict[str, int]
    """Of the whole model (liquid_dist.model.counts)."""
    expert_layout: Optional[ExpertLayout]


def build_engine(plan: BuildPlan, device: torch.device, *,
                 init_from: Optional[Union[str, Path]] = None) -> BuiltEngine:
    """The engine of ``plan`` on this rank (every rank calls it, after the process group
    exists). ``init_from``: a converted model directory whose weights the model starts
    from (the run plan checked it); otherwise drawn from ``train.seed``."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from liquid_dist.model import MoELayer
    from liquid_dist.model.block import ImprovedTransformerBlock

    t = plan.config.train
    # DeepSpeed 0.19 calls torch.distributed functions that torch 2.13 deprecates
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    # built on the meta device, valued module by module (drawn from t.seed, the same on
    # every layout, or read from a converted model) and partitioned as it goes under ZeRO-3
    built = build_model(plan, device=device, init_from=init_from)
    if t.compile:
        compile_blocks(built.model)
    module = PretrainingModule(built.model)
    leaf = ImprovedTransformerBlock if t.compile else MoELayer
    if plan.zero3 and any(isinstance(m, leaf) for m in module.modules()):
        # routing decides per batch which experts run: fetch a MoE layer's parameters as
        # one unit, or ranks disagree on the prefetch order; a compiled block is fetched
        # as one unit too, so that ZeRO-3's hooks run around its graph, not inside it (a
        # model without MoE has no leaf)
        set_z3_leaf_modules(module, [leaf])
    param_groups = model_param_groups(module, t.weight_decay)
    if built.expert_layout is not None:
        param_groups = split_expert_param_groups(param_groups)
    optimizer = SkippableAdamW(param_groups, lr=t.lr, betas=(t.beta1, t.beta2),
                               weight_decay=t.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           config=plan.ds_config, dist_init_required=False)
    if plan.zero3:  # fp32: one copy of each partition, not two (ds_compat)
        share_fp32_master_partitions(engine)
        zero_partition_padding(engine)
    return BuiltEngine(engine=engine, optimizer=optimizer, model=built.model,
                       parameter_counts=built.counts, expert_layout=built.expert_layout)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward's autocast for the run's precision (``bf16``, ``fp16``; none for fp32)."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch on ``device`` (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def plain_grad_norm(engine: Any) -> Optional[float]:
    """The global gradient norm of an engine without ZeRO, which DeepSpeed (fp32) does not
    compute; None without gradients. Read before the update."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

