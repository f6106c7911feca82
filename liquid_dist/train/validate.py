"""Validation: the loss over the validation stream at a step, the same on every rank."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from liquid_dist.parallel.engine import autocast, to_device


class Validator:
    """Evaluates an engine on ``loader`` (this rank's part of the validation stream) every
    ``every`` steps and at the last one (:meth:`should_validate`)."""

    def __init__(self, loader: Any, *, every: int, device: torch.device, precision: str,
                 world_size: int):
        self.loader, self.every = loader, every
        self.device, self.precision, self.world_size = device, precision, world_size

    def should_validate(self, step: int, *, last: bool) -> bool:
        return last or step % self.every == 0

    @torch.no_grad()
    def validate(self, engine: Any, step: int) -> tuple[dict[str, Any], str]:
        """The ``eval`` record of ``step`` and its human line: the token-weighted
        cross-entropy over every rank's validation batches (``val_ce``, ``val_ppl``) and
        ``val_loss`` = it + the mean auxiliary loss. Collective: every rank calls it."""
        engine.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in self.loader:
            n = float((batch["labels"] != -100).sum())
            with autocast(self.device, self.precision):
                out = engine(**to_device(batch, self.device))
            sums += torch.stack([out["ce_sum"].detach().double(), sums.new_tensor(n),
                                 out["aux_loss"].detach().double()])
        batches = len(self.loader)
        engine.train()
        if self.world_size > 1:
            dist.all_reduce(sums)
        sums = sums.cpu()
        val_ce = float(sums[0] / sums[1].clamp(min=1))
        val_loss = val_ce + float(sums[2]) / max(1, batches * self.world_size)
        record = {"kind": "eval", "step": step, "val_ce": val_ce, "val_loss": val_loss,
                  "val_ppl": math.exp(val_ce) if val_ce < 50 else float("inf")}
        return record, (f"eval step {step}: val ce {val_ce:.4f} "
                        f"(ppl {math.exp(min(val_ce, 50)):.1f}), val loss {val_loss:.4f}")
