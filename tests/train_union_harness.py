"""Training on the union of a W-rank data split, or as one of W ranks (test harness, not a test).

The data order does not depend on the world size (liquid_dist/data/stream.py):
global step i holds the same examples for any split of its global batch into
ranks x grad_accum x micro-batch, and micro-batch j = k * W + r of a step is
rank r's k-th. So one process with ``train.grad_accum = W x`` the ranks'
grad_accum, reading the real loader of world size 1, sees exactly the
micro-batches of one W-rank step, rank 0's first.

    python tests/train_union_harness.py --ranks 2 [--concat] [--mask-targets] --config ...
    torchrun --nproc_per_node 2 tests/train_union_harness.py --ranks 2 [--mask-targets] ...

* One process (world size 1), ``--ranks W``: the union of W ranks. With
  ``--concat`` each step is ONE batch instead: the W micro-batches of the step
  stacked row-wise, each padded to the widest (padding masked: encoder mask
  False, labels -100), with ``train.micro_batch_size = W x`` the ranks' one.
* Under a launcher with world size W == ``--ranks``: this process is one of W
  ranks and reads the real loader of its rank, as ``launch/pretrain.py`` does.
* ``--mask-targets`` (both sides): in every batch, each row's trailing
  :func:`masked_tail` labels become -100 (decoder padding, which the model and
  trainer mask), a number that depends on the row's tokens only, so ranks and
  micro-batches hold different numbers of real targets, and masking a stacked
  batch equals stacking masked batches.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import torch

from liquid_dist.data import build_train_loader
from liquid_dist.parallel.distributed import exit_process
from liquid_dist.train.entry import pretrain


def masked_tail(encoder_input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, how many trailing labels ``--mask-targets`` masks: 0 .. Ld // 2, a hash
    of the row's tokens (so at least half of every row's targets stay real)."""
    key = encoder_input_ids.sum(1) * 31 + labels.clamp(min=0).sum(1) * 7
    return key % (labels.shape[1] // 2 + 1)


def mask_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with each row's last ``masked_tail`` targets turned into padding."""
    labels, dec = batch["labels"].clone(), batch["decoder_input_ids"].clone()
    width = labels.shape[1]
    start = width - masked_tail(batch["encoder_input_ids"], labels)
    pos = torch.arange(width).unsqueeze(0)
    labels[pos >= start.unsqueeze(1)] = -100
    # padding on the decoder input too, as a padded batch has it (teacher forcing
    # reads label j-1 at position j; the first masked label's position keeps its input)
    dec[pos > start.unsqueeze(1)] = 0
    return dict(batch, labels=labels, decoder_input_ids=dec)


class _Wrapped:
    """A loader passed through, its batches transformed; state and epoch delegated."""

    def __init__(self, loader: Any, mask: bool):
        self.loader, self.mask = loader, mask

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            yield mask_targets(batch) if self.mask else batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._batches()

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        return self.loader.load_state_dict(state)

    def stats(self) -> dict[str, Any]:
        return self.loader.stats()


def _pad(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


PAD_VALUES = {"encoder_input_ids": 0, "encoder_attention_mask": False, "decoder_input_ids": 0,
              "labels": -100}


class ConcatLoader(_Wrapped):
    """One batch per step: the step's ``ranks`` micro-batches stacked, padded to the widest
    of each side (a step has one objective, so widths agree unless a caller's differ)."""

    def __init__(self, loader: Any, mask: bool, ranks: int):
        super().__init__(loader, mask)
        self.ranks = ranks

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        parts: list[dict[str, torch.Tensor]] = []
        for batch in self._batches():
            parts.append(batch)
            if len(parts) == self.ranks:
                yield {k: torch.cat([_pad(b[k], max(x[k].shape[1] for x in parts), v)
                                     for b in parts])
                       for k, v in PAD_VALUES.items()}
                parts = []


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--resume", default="auto")
    p.add_argument("--concat", action="store_true")
    p.add_argument("--mask-targets", action="store_true")
    args = p.parse_args()

    def factory(cfg, env):
        t = cfg.train
        if env.world_size == args.ranks and args.ranks > 1:
            if args.concat:
                raise SystemExit("--concat is the one-process side")
            loader = build_train_loader(cfg.data, rank=env.rank, world_size=env.world_size,
                                        batch_size=t.micro_batch_size, seed=t.seed,
                                        grad_accum=t.grad_accum)
            return _Wrapped(loader, args.mask_targets)
        if env.world_size != 1:
            raise SystemExit(f"--ranks {args.ranks}: run in 1 process (the union) or on "
                             f"{args.ranks} ranks, not {env.world_size}")
        if args.concat:
            # W ranks x micro-batch m x grad_accum GA == this step's GA batches of W*m rows
            loader = build_train_loader(cfg.data, rank=0, world_size=1,
                                        batch_size=t.micro_batch_size // args.ranks,
                                        seed=t.seed, grad_accum=args.ranks * t.grad_accum)
            return ConcatLoader(loader, args.mask_targets, args.ranks)
        loader = build_train_loader(cfg.data, rank=0, world_size=1,
                                    batch_size=t.micro_batch_size, seed=t.seed,
                                    grad_accum=t.grad_accum)
        return _Wrapped(loader, args.mask_targets)

    return pretrain(args.config, args.set, resume=args.resume, train_loader_factory=factory)


if __name__ == "__main__":
    exit_process(main())
