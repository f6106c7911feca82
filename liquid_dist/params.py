"""Parameter counts of a config: total, and active per token.

``python -m liquid_dist.params configs/base-moe.yaml [--set key=value ...]``
builds the model on the meta device (no memory, no time) and prints the
counts. "Active per token" counts the shared (dense) parameters plus the
parameters of the experts one token uses: ``top_k`` experts at least and,
with dynamic k, ``k_max`` at most.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch import nn


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Return total, expert, dense and active-per-token (min/max) counts."""
    from .model.moe import MoELayer

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


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> None:
    from .config import load_config
    from .model import LiquidFoundationModelOptimized

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="vocabulary size used when model.vocab_size is 'auto'")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    m = cfg.model
    if m.vocab_size == "auto":
        m = dataclasses.replace(m, vocab_size=args.vocab_size)
        print(f"model.vocab_size: auto -> counting with {args.vocab_size}")
    with torch.device("meta"):
        model = LiquidFoundationModelOptimized(m)
    for key, value in count_parameters(model).items():
        print(f"{key:>22}: {value:>14,d}  ({_fmt(value)})")


if __name__ == "__main__":
    main()
