"""Validation: the loss over the validation streams at a step, the same on every rank."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from liquid_dist.parallel.engine import autocast, to_device


class Validator:
    """Evaluates an engine every ``every`` steps and at the last one (:meth:`should_validate`)
    on this rank's part of the validation stream ``loader`` (``data.val_shards``; None
    without one) and of each stream of ``sources`` (``data.val_sources``, by name).

    ``piece_bytes`` (:attr:`liquid_dist.data.Tokenizer.piece_bytes`) gives each target
    token's UTF-8 bytes, for bits per byte: a target's piece text, none for EOS and the
    ``sentinel_ids`` (span corruption's markers; a document's first piece counts its
    dummy-prefix space).
    """

    def __init__(self, loader: Optional[Any], sources: dict[str, Any], *, every: int,
                 device: torch.device, precision: str, world_size: int,
                 piece_bytes: np.ndarray, sentinel_ids: tuple[int, ...]):
        self.loader, self.sources, self.every = loader, sources, every
        self.device, self.precision, self.world_size = device, precision, world_size
        self.piece_bytes = torch.from_numpy(piece_bytes.copy())
        self.piece_bytes[list(sentinel_ids)] = 0

    def should_validate(self, step: int, *, last: bool) -> bool:
        return last or step % self.every == 0

    def _sums(self, engine: Any, loader: Any) -> torch.Tensor:
        """[summed CE, target tokens, summed aux loss, target bytes, batches] of ``loader``
        over every rank (float64, on the CPU). Collective."""
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        for batch in loader:
            labels = batch["labels"]
            targets = labels[labels != -100]
            with autocast(self.device, self.precision):
                out = engine(**to_device(batch, self.device))
            sums += torch.stack([out["ce_sum"].detach().double(),
                                 sums.new_tensor(float(targets.numel())),
                                 out["aux_loss"].detach().double(),
                                 sums.new_tensor(float(self.piece_bytes[targets].sum())),
                                 sums.new_tensor(1.0)])
        if self.world_size > 1:
            dist.all_reduce(sums)
        return sums.cpu()

    @torch.no_grad()
    def validate(self, engine: Any, step: int) -> tuple[dict[str, Any], str]:
        """The ``eval`` record of ``step`` and its human line: the token-weighted
        cross-entropy over every rank's validation batches (``val_ce``, ``val_ppl``),
        ``val_loss`` = it + the mean auxiliary loss, ``bits_per_byte``; and per
        validation source its ``val_ce`` and ``bits_per_byte`` (``sources``). Without
        ``data.val_shards`` the top-level figures are those of every source's batches
        together. Collective: every rank calls it."""
        engine.eval()
        per_source = {name: self._sums(engine, loader) for name, loader in self.sources.items()}
        sums = (self._sums(engine, self.loader) if self.loader is not None
                else torch.stack(list(per_source.values())).sum(0))
        engine.train()
        val_ce, bpb = _ce(sums), _bits_per_byte(sums)
        val_loss = val_ce + float(sums[2]) / max(1.0, float(sums[4]))
        record: dict[str, Any] = {
            "kind": "eval", "step": step, "val_ce": val_ce, "val_loss": val_loss,
            "val_ppl": math.exp(val_ce) if val_ce < 50 else float("inf"),
            "bits_per_byte": bpb}
        line = (f"eval step {step}: val ce {val_ce:.4f} (ppl {math.exp(min(val_ce, 50)):.1f}), "
                f"val loss {val_loss:.4f}")
        if per_source:
            record["sources"] = {name: {"val_ce": _ce(s), "bits_per_byte": _bits_per_byte(s)}
                                 for name, s in per_source.items()}
            line += "; " + ", ".join(f"{name} {r['val_ce']:.4f}"
                                     for name, r in record["sources"].items())
        return record, line


def _ce(sums: torch.Tensor) -> float:
    return float(sums[0] / sums[1].clamp(min=1))


def _bits_per_byte(sums: torch.Tensor) -> Optional[float]:
    return float(sums[0] / math.log(2) / sums[3]) if sums[3] > 0 else None
