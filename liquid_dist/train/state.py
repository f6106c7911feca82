"""The trainer's own state: what a checkpoint keeps of the run besides the engine's and the
data loaders' (liquid_dist.train.checkpoint writes it into ``trainer_state.pt``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from liquid_dist.checkpoint_format import CheckpointError
from liquid_dist.train.spikes import SpikeState

COUNTERS = ("step", "run_id", "nan_skips_total", "nan_skips_in_row")
"""The plain fields, stored as they are (the spike window has its own state dict)."""


@dataclass
class TrainerState:
    """Counters of the run; the same on every rank."""

    step: int = 0
    """Optimizer steps taken (skipped updates included)."""
    run_id: Optional[str] = None
    """The metrics run id (wandb's, when configured): one run across requeues."""
    nan_skips_total: int = 0
    nan_skips_in_row: int = 0
    spike: SpikeState = field(default_factory=SpikeState)
    """The loss-spike window and rewinds (liquid_dist.train.spikes)."""

    def state_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in COUNTERS}, "spike": self.spike.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From a checkpoint's trainer state (CheckpointError naming a missing key). A
        checkpoint written before the spike window existed starts with an empty one."""
        missing = [k for k in COUNTERS if k not in state]
        if missing:
            raise CheckpointError(f"trainer state without {missing}")
        for k in COUNTERS:
            setattr(self, k, state[k])
        self.spike = (SpikeState.from_state_dict(state["spike"]) if "spike" in state
                      else SpikeState())
