"""Learning rate: linear warm-up, then cosine decay to ``min_lr``.

The schedule is a pure function of the step, so resuming needs no scheduler
state and a skipped (non-finite) step does not shift it.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based: the first update is step 0).

    Steps ``0 .. warmup_steps-1`` rise linearly to ``lr`` (step ``warmup_steps-1``
    uses ``lr``); then a half cosine falls from ``lr`` to ``min_lr`` at the last
    step ``max_steps-1``; beyond it the rate stays at ``min_lr``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - 1 - max(warmup_steps - 1, 0))
    progress = min(1.0, (step - max(warmup_steps - 1, 0)) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
