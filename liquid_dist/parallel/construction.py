"""Building the model of a run without any rank holding it whole (docs/parallelism.md,
"Construction").

The model is built on the meta device (shapes only), cut to this rank's experts
under expert parallelism (free on meta tensors), then given its values one
module at a time — drawn by the init rules (liquid_dist.model.init: the same
values on every layout) or read from a converted model — and, under ZeRO-3,
each module is partitioned by DeepSpeed's own ``zero.Init(module=...)`` as soon
as its parameters have values. A rank therefore never holds more than its
partitions plus one module's parameters; an expert tensor is partitioned over
its expert-data-parallel group, as ``mark_expert_parameter`` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.model.counts import count_parameters
from liquid_dist.model.init import Source, init_parameters
from liquid_dist.model.moe import PRECISION_DTYPES
from liquid_dist.model.pretrained import canonical_names, weight_source
from liquid_dist.parallel.build_plan import BuildPlan
from liquid_dist.parallel.ds_compat import is_expert_parameter
from liquid_dist.parallel.expert_parallel import ExpertLayout, apply_expert_parallel


@dataclass
class BuiltModel:
    model: LiquidFoundationModelOptimized
    counts: dict[str, int]
    """Of the whole model (before expert parallelism and ZeRO-3 cut it)."""
    expert_layout: Optional[ExpertLayout]


def zero3_partitioner(ds_config: dict[str, Any]):
    """``after_module`` for :func:`init_parameters`: partition a module's own parameters
    with ``deepspeed.zero.Init(module=...)`` (over the expert-data-parallel group for
    expert tensors, the whole world otherwise)."""
    import deepspeed

    def partition(module: nn.Module) -> None:
        own = [p for p in module.parameters(recurse=False) if not hasattr(p, "ds_id")]
        if not own:
            return
        experts = {is_expert_parameter(p) for p in own}
        if len(experts) > 1:
            raise ValueError(f"{type(module).__name__} mixes expert and dense parameters")
        group = own[0].ds_zero_partition_process_group if experts.pop() else None
        deepspeed.zero.Init(module=module, config_dict_or_path=ds_config,
                            data_parallel_group=group)

    return partition


def build_model(plan: BuildPlan, *, device: torch.device,
                init_from: Optional[Union[str, Path]] = None) -> BuiltModel:
    """The run's model on this rank: this rank's experts (``parallel.ep_size``), valued
    from ``init_from`` (a converted model directory) or drawn with ``train.seed``, and,
    under ZeRO-3, partitioned module by module with the plan's DeepSpeed config. Needs
    the process group under expert parallelism or ZeRO-3."""
    with torch.device("meta"):
        model = LiquidFoundationModelOptimized(plan.model_config)
    counts = count_parameters(model)
    source: Optional[Source] = None
    if init_from is not None:
        source = weight_source(init_from, canonical_names(model))
    ep = plan.config.parallel.ep_size
    layout = apply_expert_parallel(model, ep) if ep > 1 else None
    init_parameters(model, plan.config.train.seed, source=source, device=device,
                    dtype=PRECISION_DTYPES[plan.precision] if plan.zero3 else None,
                    after_module=zero3_partitioner(plan.ds_config) if plan.zero3 else None)
    return BuiltModel(model=model, counts=counts, expert_layout=layout)
