"""Loss spikes: which steps are outliers, and when a run rewinds (``train.spike``).

A step is an outlier when its loss or its gradient norm (both the same on every
rank: summed over the ranks, and DeepSpeed's global norm) lies above the mean
plus ``sigma`` standard deviations of the last ``window`` applied steps — the rule
of OLMo-core's ``SkipStepAdamW``, whose values (6 sigma, 128 steps) are the
defaults; the first ``window // 2`` steps of a run judge nothing. An outlier's
update is not applied (policy ``skip`` and ``rewind``) and it does not enter the
window. Under ``rewind``, ``rewind_after`` outliers in a row make the trainer
reload the newest checkpoint written before the first of them and go on from
the step it has reached, with the data that follows: the batches since that
checkpoint are not trained on (PaLM's remedy: rewind, skip the batches of the
spike). A spike again before training has checkpointed past the last rewind
stops the run (:class:`LossSpikeError`). The window and the rewinds are part of
the trainer's state (liquid_dist.train.state), so a requeue or an elastic resume
judges as the uninterrupted run would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


class LossSpikeError(RuntimeError):
    """The loss spiked again right after a rewind, or there is no checkpoint to rewind to."""


@dataclass
class SpikeState:
    """The running window and the rewinds of a run (same on every rank)."""

    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    """Of the last ``window`` applied steps, oldest first."""
    in_row: int = 0
    first: Optional[int] = None
    """The first step of the current run of outliers."""
    rewinds: list[tuple[int, int]] = field(default_factory=list)
    """(checkpoint step rewound to, step the rewind happened at), oldest first."""

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "in_row": self.in_row,
                "first": self.first, "rewinds": [list(r) for r in self.rewinds]}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> SpikeState:
        return cls(list(d["losses"]), list(d["norms"]), int(d["in_row"]), d["first"],
                   [(int(a), int(b)) for a, b in d["rewinds"]])


def _limit(values: list[float], window: int, sigma: float) -> Optional[float]:
    if len(values) < window // 2:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return mean + sigma * std


def outlier(state: SpikeState, window: int, sigma: float, *, loss: Optional[float] = None,
            grad_norm: Optional[float] = None) -> Optional[str]:
    """Why this loss or gradient norm is an outlier against the window; None if neither is
    (or the window is still too short). Non-finite values are the non-finite check's."""
    for name, value, history in (("loss", loss, state.losses),
                                 ("gradient norm", grad_norm, state.norms)):
        if value is None or not math.isfinite(value):
            continue
        limit = _limit(history, window, sigma)
        if limit is not None and value > limit:
            return (f"{name} {value:.4g} > {limit:.4g} (mean + {sigma:g} sigma of "
                    f"{len(history)} steps)")
    return None


def record(state: SpikeState, step: int, window: int, *, loss: float, grad_norm: float,
           is_outlier: bool) -> None:
    """After a step: an applied one joins the window, an outlier extends the run of them."""
    if is_outlier:
        state.in_row += 1
        state.first = step if state.first is None else state.first
        return
    state.in_row, state.first = 0, None
    state.losses = (state.losses + [loss])[-window:]
    state.norms = (state.norms + [grad_norm])[-window:]
