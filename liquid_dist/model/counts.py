"""Parameter counts of a model: total, experts, dense, and active per token."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Return total, expert, dense and active-per-token (min/max) counts."""
    from .moe import MoELayer

    total = sum(p.numel() for p in model.parameters())
    expert = 0
    active_min = active_max = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            cfg = module.cfg
            n = sum(p.numel() for p in module.expert_parameters())
            expert += n
            k_min = cfg.top_k
            k_max = cfg.k_max if cfg.dynamic_k else cfg.top_k
            active_min += n * k_min // cfg.num_experts
            active_max += n * k_max // cfg.num_experts
    dense = total - expert
    return {
        "total": total,
        "dense": dense,
        "experts": expert,
        "active_per_token_min": dense + active_min,
        "active_per_token_max": dense + active_max,
    }
