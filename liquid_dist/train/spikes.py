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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from liquid_dist.checkpoint_format import (
    CHECKPOINTS,
    CheckpointError,
    CheckpointRef,
    newest_valid_checkpoint,
)


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


class SpikeGuard:
    """The loss-spike rule of a run, in one place: ``train.spike`` (``cfg``) applied to the
    window that ``window()`` returns (the trainer state's: a rewind replaces it).

    In a step the loss is judged before the update (:meth:`loss_outlier`) and the
    gradient norm inside the optimizer's step, where DeepSpeed has it
    (:meth:`norm_outlier`); after the step :meth:`record` updates the window and says
    whether a rewind is due.
    """

    def __init__(self, cfg: Any, window: Callable[[], SpikeState]):
        self.cfg, self._window = cfg, window

    def judges(self, nonfinite: bool) -> bool:
        """Whether a step is judged: the policy is on and the step is finite (a non-finite
        step is the non-finite check's)."""
        return self.cfg.policy != "off" and not nonfinite

    def loss_outlier(self, loss: float) -> Optional[str]:
        return outlier(self._window(), self.cfg.window, self.cfg.sigma, loss=loss)

    def norm_outlier(self, grad_norm: float) -> Optional[str]:
        return outlier(self._window(), self.cfg.window, self.cfg.sigma, grad_norm=grad_norm)

    def record(self, step: int, *, loss: float, grad_norm: float,
               reason: Optional[str]) -> bool:
        """A judged step: an applied one joins the window, an outlier (``reason``) extends
        the run of them; True when the policy rewinds now (``rewind_after`` in a row)."""
        window = self._window()
        record(window, step, self.cfg.window, loss=loss, grad_norm=grad_norm,
               is_outlier=reason is not None)
        return (reason is not None and self.cfg.policy == "rewind"
                and window.in_row >= self.cfg.rewind_after)

    def rewind_target(self, run_dir: Path, step: int,
                      damage: Callable[[Path], list[str]]) -> tuple[CheckpointRef, str]:
        """The checkpoint a rewind at ``step`` goes back to — the newest valid one
        (``damage``: the verification) written before the spike's first step — and the
        spike's description. LossSpikeError when there is none, or when it is not past
        the last rewind (the spike came again before training got past it)."""
        window = self._window()
        first, rewinds = window.first, window.rewinds
        spike = f"loss spike at steps {first}-{step}"
        try:
            ref, _ = newest_valid_checkpoint(run_dir, before=first, damage=damage)
        except CheckpointError as exc:
            raise LossSpikeError(f"{spike}: no checkpoint to rewind to ({exc})") from exc
        if ref is None:
            raise LossSpikeError(f"{spike}: no checkpoint before step {first} to rewind to")
        if rewinds and ref.step <= rewinds[-1][1]:
            raise LossSpikeError(
                f"{spike}, again before training got past the rewind at step "
                f"{rewinds[-1][1]} (to the checkpoint of step {rewinds[-1][0]}): stopping. "
                f"Its checkpoints are in {run_dir / CHECKPOINTS}; lower train.lr or "
                "check the data around these steps")
        return ref, spike

