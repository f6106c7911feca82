"""The seed's monitoring hooks: per-block activation RMS, gradient norms, non-finite counts.

``nonfinite_act/<block>``: the non-finite activations the block replaced by 0
(its aux ``nonfinite``); ``nonfinite_grad/<block>``: non-finite gradient entries.

Every ``train.monitor_every`` steps the trainer arms forward hooks on each
encoder and decoder block for that step's forward passes, then reads the
gradients after the last backward and before the optimizer step. Values are
averaged over the step's micro-batches and over ranks (activations) or
reduced over the partitions of every rank (gradients: under ZeRO-3 each rank
holds a slice of every gradient). All ranks must call :meth:`BlockMonitor.collect`
(it runs collectives).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class BlockMonitor:
    """Hooks on ``model.encoder.blocks[i]`` / ``model.decoder.blocks[i]``."""

    def __init__(self, model: nn.Module, zero_stage: int):
        self.zero_stage = zero_stage
        self.blocks: list[tuple[str, nn.Module]] = (
            [(f"encoder.blocks.{i}", b) for i, b in enumerate(model.encoder.blocks)]
            + [(f"decoder.blocks.{i}", b) for i, b in enumerate(model.decoder.blocks)])
        n = len(self.blocks)
        self._handles: list[Any] = []
        self._recording = False
        self._sq_sum = torch.zeros(n, dtype=torch.float64)
        self._count = torch.zeros(n, dtype=torch.float64)
        self._nonfinite = torch.zeros(n, dtype=torch.float64)

    def arm(self) -> None:
        """Record the block outputs of the forward passes until :meth:`pause`."""
        self._sq_sum.zero_()
        self._count.zero_()
        self._nonfinite.zero_()
        for i, (_, block) in enumerate(self.blocks):
            self._handles.append(block.register_forward_hook(self._hook(i)))
        self._recording = True

    def pause(self) -> None:
        """Stop recording (before backward: checkpointed blocks re-run their forward)."""
        self._recording = False

    def resume(self) -> None:
        self._recording = True

    def _hook(self, i: int):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self._recording:
                return
            # a block returns (x, aux): x is finite, aux["nonfinite"] counts what it replaced
            x, aux = out
            self._nonfinite[i] += float(aux["nonfinite"])
            self._sq_sum[i] += float(x.detach().float().square().sum())
            self._count[i] += x.numel()
        return hook

    def _grad_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        n = len(self.blocks)
        sq = torch.zeros(n, dtype=torch.float64)
        bad = torch.zeros(n, dtype=torch.float64)
        for i, (_, block) in enumerate(self.blocks):
            for p in block.parameters():
                if not p.requires_grad:
                    continue
                g = safe_get_local_grad(p) if self.zero_stage == 3 else safe_get_full_grad(p)
                if g is None:
                    continue
                g = g.detach().float()
                finite = torch.isfinite(g)
                bad[i] += float((~finite).sum())
                sq[i] += float(torch.where(finite, g, 0.0).square().sum())
        return sq, bad

    def collect(self, device: torch.device) -> dict[str, float]:
        """Remove the hooks and return the step's statistics (a collective on every rank)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._recording = False
        grad_sq, grad_bad = self._grad_sums()
        n = len(self.blocks)
        world = dist.get_world_size() if dist.is_initialized() else 1
        # ZeRO-3 holds slices of each gradient: sum them; other stages hold it whole
        grad_share = 1.0 if self.zero_stage == 3 else 1.0 / world
        buf = torch.cat([self._sq_sum, self._count, self._nonfinite,
                         grad_sq * grad_share, grad_bad * grad_share]).to(device)
        if world > 1:
            dist.all_reduce(buf)
        buf = buf.cpu()
        sq, cnt, nf, gsq, gbad = (buf[k * n:(k + 1) * n] for k in range(5))
        out: dict[str, float] = {}
        for i, (name, _) in enumerate(self.blocks):
            out[f"act_rms/{name}"] = float((sq[i] / cnt[i].clamp(min=1)).sqrt())
            out[f"grad_norm/{name}"] = float(gsq[i].sqrt())
            if nf[i] > 0:
                out[f"nonfinite_act/{name}"] = int(nf[i])
            if gbad[i] > 0:
                out[f"nonfinite_grad/{name}"] = int(round(float(gbad[i])))
        return out
