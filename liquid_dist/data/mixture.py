"""The token plan of a run's training mixture: what the run draws from each source, against
what the source holds, checked before any process group.

A step draws S examples (the global batch), each of ``raw`` tokens of its
objective (documents packed with an EOS after each), each from a source
drawn with its share in the step's stage (``data.stages``, or the sources'
weights). Over ``steps`` steps a source is expected to give the sum over the
stages of ``steps in the stage * S * mean raw * share`` tokens; one pass over
it gives its manifests' tokens plus one EOS per document. Their ratio is the
number of epochs the run reads it: a source read more than its
``max_repetition`` epochs is a ConfigError naming it, the planned and the
available tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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
    """The :class:`TokenPlan` of ``steps`` steps of the training stream ``spec``."""
    mean_raw = sum(p * shape.raw for p, shape in zip(spec.objective_probs, spec.shapes,
                                                      strict=True))
    ends = [s.start_step for s in spec.stages[1:]] + [steps]
    examples = [0.0] * len(spec.sources)  # expected examples per source
    for stage, end in zip(spec.stages, ends, strict=True):
        in_stage = max(0, min(end, steps) - stage.start_step)
        for i, share in enumerate(stage.shares):
            examples[i] += in_stage * spec.streams * share
    total = sum(examples) or 1.0
    return TokenPlan(steps, tuple(
        SourcePlan(name=s.name, share=n / total, available=s.tokens,
                   planned=round(n * mean_raw), max_repetition=s.max_repetition)
        for s, n in zip(spec.sources, examples, strict=True)))
