"""The DeepSpeed configuration of a run, derived from :class:`~liquid_dist.config.Config`.

Every value DeepSpeed would otherwise default is set explicitly, because some
defaults bite (docs/design.md, "Platform facts"): ``gradient_clipping`` defaults to 1.0 in
0.19 whatever the config says, ZeRO-3's ``memory_efficient_linear`` replaces
``torch.nn.functional.linear`` for the whole process, and its working-set
limits (1e9 parameters live, 5e8 per bucket) would let a rank hold a whole
1 B-parameter model gathered: they are set from the model's size instead
(:func:`zero3_working_set`).
"""

from __future__ import annotations

from typing import Any

import torch

from liquid_dist.config import Config, ModelConfig


def zero3_working_set(model: ModelConfig, ep_size: int = 1) -> dict[str, int]:
    """ZeRO-3's working-set limits for ``model`` (resolved vocabulary), in parameters.

    The unit is the largest thing ZeRO-3 gathers at once: a whole block (a MoE
    layer, or a compiled block, is fetched as one leaf module; with expert
    parallelism it holds ``num_experts / ep_size`` experts) or a single tensor
    (the token embedding, gathered whole). At most two units are live (the one
    computing and the one prefetched: ``stage3_max_live_parameters``, and a
    parameter is kept for reuse only within that distance,
    ``stage3_max_reuse_distance``); a prefetch or a gradient-reduction bucket
    holds one unit, and the optimizer steps over the rank's partition one unit at
    a time (``sub_group_size``): DeepSpeed flattens a sub-group's gradients into a
    new fp32 buffer and AdamW allocates two more of its size, so with the default
    (1e9) a rank of a model up to a few billion parameters would hold three more
    fp32 copies of its whole partition during the step.
    """
    from liquid_dist.model import LiquidFoundationModelOptimized, MoELayer
    from liquid_dist.model.block import ImprovedTransformerBlock

    if not isinstance(model.vocab_size, int):
        raise ValueError("resolve model.vocab_size first (liquid_dist.train.prepare)")
    with torch.device("meta"):
        built = LiquidFoundationModelOptimized(model)
    experts = {id(p) for m in built.modules() if isinstance(m, MoELayer)
               for p in m.expert_parameters()}

    def local(params) -> int:
        return sum(p.numel() // (ep_size if id(p) in experts else 1) for p in params)

    unit = max([local(m.parameters()) for m in built.modules()
                if isinstance(m, ImprovedTransformerBlock)]
               + [local([p]) for p in built.parameters()])
    return {"stage3_max_live_parameters": 2 * unit, "stage3_max_reuse_distance": 2 * unit,
            "stage3_prefetch_bucket_size": unit, "reduce_bucket_size": unit,
            "sub_group_size": unit}


def zero3_working_set_bytes(limits: dict[str, int], precision: str) -> float:
    """The bytes a rank may hold beyond its partitions during a step under ZeRO-3's
    working-set ``limits`` (:func:`zero3_working_set`, or a DeepSpeed config's
    ``zero_optimization``): the live gathered parameters, a prefetch bucket and a
    gradient-reduction bucket (in the parameters' dtype, which is DeepSpeed's gradient
    dtype too), and the optimizer step's transients of one sub-group (DeepSpeed's
    flattened fp32 gradient and AdamW's two fp32 temporaries: 12 bytes per element)."""
    from liquid_dist.model.moe import PRECISION_DTYPES

    return (PRECISION_DTYPES[precision].itemsize * (limits["stage3_max_live_parameters"]
                                                    + limits["stage3_prefetch_bucket_size"]
                                                    + limits["reduce_bucket_size"])
            + 12 * limits["sub_group_size"])


def build_deepspeed_config(cfg: Config, *, world_size: int, precision: str) -> dict[str, Any]:
    """The ``config`` dict for ``deepspeed.initialize``.

    ZeRO stage from ``parallel.zero_stage``; ``train_batch_size`` =
    micro batch x gradient accumulation x world size; ``precision`` resolved
    (``fp32`` / ``bf16`` / ``fp16``: liquid_dist.parallel.build_plan.resolve_precision);
    clipping from ``train.grad_clip`` (0 = off).
    The optimizer and the learning-rate schedule are the trainer's own
    (a torch AdamW, no compilation), so the config names neither. ZeRO-3's
    working set: :func:`zero3_working_set`.
    """
    t = cfg.train
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage == 3:
        zero.update(memory_efficient_linear=False,
                    # params below this size stay gathered; keep DeepSpeed's default
                    # explicit so a version change cannot alter memory silently
                    stage3_param_persistence_threshold=100_000,
                    stage3_gather_16bit_weights_on_model_save=False,
                    **zero3_working_set(cfg.model, cfg.parallel.ep_size))
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }
