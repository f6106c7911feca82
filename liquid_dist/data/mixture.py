"""The token plan of a run's training mixture: what the run draws from each source, against
what the source holds, checked before any process group.

A step draws S examples (the global batch), each of ``raw`` tokens of the
step's objective (documents packed with an EOS after each); within a stage
(``data.stages``, or the sources' weights) the examples of each objective
are apportioned to the sources by their shares. Over ``steps`` steps a source
gives the sum over the stages and objectives of ``steps of the objective in
the stage * S * share * raw`` tokens, within two examples per stage and
objective; one pass over it gives its manifests' tokens plus one EOS per
document. Their ratio is the
number of epochs the run reads it: a source read more than its
``max_repetition`` epochs is a ConfigError naming it, the planned and the
available tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from liquid_dist.config import ConfigError
from liquid_dist.data.stream import StreamSpec


@dataclass(frozen=True)
class SourcePlan:
    """One source of the plan: its name, share of the examples, the tokens one pass over it
    gives (None: no manifest), the tokens the run is expected to draw, and its limit in
    epochs (None: no limit)."""

    name: str
    share: float
    available: Optional[int]
    planned: int
    max_repetition: Optional[float]

    @property
    def epochs(self) -> Optional[float]:
        """Passes over the source the run reads; None when its size is unknown."""
        if self.available is None:
            return None
        return self.planned / self.available if self.available else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "share": self.share, "available_tokens": self.available,
                "planned_tokens": self.planned, "epochs": self.epochs,
                "max_repetition": self.max_repetition}


@dataclass(frozen=True)
class TokenPlan:
    """Per source of the training stream, what ``steps`` steps draw from it."""

    steps: int
    sources: tuple[SourcePlan, ...]

    def check(self) -> None:
        """ConfigError for the first source read more epochs than its ``max_repetition``."""
        for i, s in enumerate(self.sources):
            epochs = s.epochs
            if s.max_repetition is not None and epochs is not None and epochs > s.max_repetition:
                raise ConfigError(
                    f"data.sources[{i}].max_repetition" if len(self.sources) > 1
                    else "data.max_repetition", s.max_repetition,
                    f"at least {epochs:.2f}: source '{s.name}' has {s.available:,} tokens and "
                    f"train.max_steps={self.steps} draws {s.planned:,} of them, {epochs:.2f} "
                    "epochs (add data, lower its weight or the steps, or raise its "
                    "max_repetition)")

    def table(self) -> str:
        """The plan as a table, one line per source."""
        lines = [f"token plan for {self.steps} steps: source, share, tokens available, "
                 "planned, epochs (limit)"]
        for s in self.sources:
            available = "unknown" if s.available is None else f"{s.available:,}"
            epochs = "?" if s.epochs is None else f"{s.epochs:.2f}"
            limit = "none" if s.max_repetition is None else f"{s.max_repetition:g}"
            lines.append(f"  {s.name}: {s.share:.3f}, {available}, {s.planned:,}, "
                         f"{epochs} ({limit})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "sources": [s.to_dict() for s in self.sources]}


def token_plan(spec: StreamSpec, steps: int) -> TokenPlan:
    """The :class:`TokenPlan` of ``steps`` steps of the training stream ``spec``: each
    stage's steps of each objective (the objectives drawn per epoch), apportioned to the
    sources by their shares as the loader's :class:`~liquid_dist.data.stream.Mixer` does
    (within two examples per stage and objective)."""
    ends = [s.start_step for s in spec.stages[1:]] + [steps]
    tokens = [0.0] * len(spec.sources)
    examples = [0.0] * len(spec.sources)
    for stage, end in zip(spec.stages, ends, strict=True):
        for o, n in enumerate(_objective_steps(spec, stage.start_step, min(end, steps))):
            for i, share in enumerate(stage.shares):
                examples[i] += n * spec.streams * share
                tokens[i] += n * spec.streams * share * spec.shapes[o].raw
    total = sum(examples) or 1.0
    return TokenPlan(steps, tuple(
        SourcePlan(name=s.name, share=n / total, available=s.tokens, planned=round(t),
                   max_repetition=s.max_repetition)
        for s, n, t in zip(spec.sources, examples, tokens, strict=True)))


def _objective_steps(spec: StreamSpec, start: int, end: int) -> list[int]:
    """How many of the global steps [start, end) have each objective."""
    counts = np.zeros(len(spec.objectives), dtype=np.int64)
    per = spec.steps_per_epoch
    for epoch in range(start // per, -(-end // per)):
        lo, hi = max(start, epoch * per) - epoch * per, min(end, (epoch + 1) * per) - epoch * per
        counts += np.bincount(spec.epoch_objectives(epoch)[lo:hi],
                              minlength=len(spec.objectives))
    return [int(c) for c in counts]
