"""The learning-rate schedule every molgen training uses: linear warm-up, a constant plateau, cosine cool-down."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, decay_steps: int, floor: float = 0.1, decay_start: int = 0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step``.

    min(1, (step + 1) / warmup) * (floor + (1 - floor) (1 + cos(pi s)) / 2), with
    s = clamp((step - decay_start) / decay_steps, 0, 1) when decay_steps > 0 (no decay otherwise).
    ``decay_start > 0`` gives a warm-up / stable / decay schedule: a long run trains at the full rate and is
    cooled down over its last ``decay_steps`` steps, which can be branched off any plateau checkpoint.
    """
    warm = min(1.0, (step + 1) / max(1, warmup))
    if decay_steps <= 0:
        return warm
    s = min(1.0, max(0.0, (step - decay_start) / decay_steps))
    return warm * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * s)))
