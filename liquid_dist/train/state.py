"""The trainer's own state: what a checkpoint keeps of the run besides the engine's and the
data loaders' (liquid_dist.train.checkpoint writes it into ``trainer_state.pt``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from liquid_dist.checkpoint_format import CheckpointError


@dataclass
class TrainerState:
    """Counters of the run; the same on every rank."""

    step: int = 0
    """Optimizer steps taken (skipped updates included)."""
    run_id: Optional[str] = None
    """The metrics run id (wandb's, when configured): one run across requeues."""
    nan_skips_total: int = 0
    nan_skips_in_row: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From a checkpoint's trainer state (CheckpointError naming a missing key)."""
        missing = [f.name for f in dataclasses.fields(self) if f.name not in state]
        if missing:
            raise CheckpointError(f"trainer state without {missing}")
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])
