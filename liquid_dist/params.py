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

from .model.counts import count_parameters


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
