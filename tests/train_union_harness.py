"""One process trained on the union of a W-rank data split (test harness, not a test).

The loader keys each rank's stream by its rank (liquid_dist/data/stream.py), so
no single-rank loader setting reproduces what W ranks read. This harness
feeds one process, in turn, rank 0's batch, rank 1's batch, ... of loaders
built for W ranks; with ``train.grad_accum = W`` one optimizer step then sees
exactly the global batch of one W-rank step.

With ``--concat`` each step is instead ONE batch: the W ranks' batches stacked
row-wise, each padded to the widest (padding masked: encoder mask False,
labels -100), with ``train.micro_batch_size = W x`` the ranks' batch size.

    python tests/train_union_harness.py --ranks 2 [--concat] --config ... [--set ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import torch

from liquid_dist.data import build_train_loader
from liquid_dist.train.entry import pretrain


class UnionLoader:
    """Round-robin over the batches of several ranks' loaders (same length by construction)."""

    def __init__(self, loaders: list[Any]):
        self.loaders = loaders

    def __iter__(self) -> Iterator[Any]:
        for batches in zip(*self.loaders, strict=True):
            yield from batches

    @property
    def epoch(self) -> int:
        return self.loaders[0].epoch

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for loader, s in zip(self.loaders, state["ranks"], strict=True):
            loader.load_state_dict(s)


def _pad(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


PAD_VALUES = {"encoder_input_ids": 0, "encoder_attention_mask": False, "decoder_input_ids": 0,
              "labels": -100}


class ConcatLoader(UnionLoader):
    """One batch per step: the ranks' batches stacked, padded to the widest of each side."""

    def __iter__(self) -> Iterator[Any]:
        for batches in zip(*self.loaders, strict=True):
            yield {k: torch.cat([_pad(b[k], max(x[k].shape[1] for x in batches), v)
                                 for b in batches])
                   for k, v in PAD_VALUES.items()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--resume", default="auto")
    p.add_argument("--concat", action="store_true")
    args = p.parse_args()

    def factory(cfg, env):
        per_rank = cfg.train.micro_batch_size // (args.ranks if args.concat else 1)
        loaders = [build_train_loader(cfg.data, rank=r, world_size=args.ranks,
                                      batch_size=per_rank, seed=cfg.train.seed)
                   for r in range(args.ranks)]
        return (ConcatLoader if args.concat else UnionLoader)(loaders)

    return pretrain(args.config, args.set, resume=args.resume, train_loader_factory=factory)


if __name__ == "__main__":
    sys.exit(main())
