"""The value of a noisy state from sampled completions: v(x_t) ~ E[r(x_0) | x_t] by Monte Carlo.

From a state x_i at grid point i (denoised estimate cached), run K = ``copies`` stochastic completions to the
end of the grid with the model's own transition (``engine.complete``: ``steps`` transitions over the remaining
grid points), score each completed sample and reduce per state:

    alpha = 0:  v(x_i) = (1/K) sum_k r(x_0^(k))                          (the value, E[r(x_0) | x_i])
    alpha > 0:  v(x_i) = alpha log (1/K) sum_k exp(r(x_0^(k)) / alpha)    (the soft value of SVDD)

Unlike the reward of the denoised estimate r(E[x_0 | x_i]) (SVDD-PM, FK's default), this averages the reward
over the law of x_0 given x_i, so it is unbiased for the value even where D(x_i) is a blurred mean that no
sample resembles (early steps). With all remaining grid points (``steps`` >= n - 1 - i) the completions are
draws of the sampler's own output law given x_i. For continuous DDPM-type solvers one jump to the end
(``steps = 1``) adds only the last grid point's small noise: it is the denoised estimate refined by one more
call, nearly deterministic; the spread of x_0 given x_i comes from the noise of intermediate points, so use
``steps >= 2`` there.

Cost, counted in the method's ``model_calls``: a continuous completion takes ``steps`` model calls per copy
(fewer near the end of the grid), a masked-diffusion one ``steps - 1`` (``steps = 1``: all masked tokens drawn at
once from the cached p(x_0 | x_i), free). Used by ``svdd_sample(..., value=Completions(...))`` and by FK tilting
(``Tilt(..., value=Completions(...))``, the intermediate rewards r_i). From the command line:
``--value completions:K[:STEPS[:ALPHA]]`` (``parse_value``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from molgen.guidance.core import Scorer, check_count


@dataclass(frozen=True)
class Completions:
    """K = ``copies`` completions of ``steps`` transitions each, reduced by the mean (alpha = 0) or the soft
    value alpha log mean exp(r / alpha)."""

    copies: int = 4
    steps: int = 1
    alpha: float = 0.0

    def __post_init__(self) -> None:
        check_count("completion copies", self.copies)
        check_count("completion steps", self.steps)
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"completion alpha must be finite and >= 0 (0 = mean), got {self.alpha}")

    @property
    def spec(self) -> str:
        """The command-line form, ``completions:K:STEPS:ALPHA`` (``parse_value`` reads it back)."""
        return f"completions:{self.copies}:{self.steps}:{self.alpha:g}"

    def estimate(self, engine: Any, state: Any, i: int, scorer: Scorer,
                 generator: torch.Generator | None = None) -> Tensor:
        """v(x_i) [B] (float64) for the states of ``state`` at grid point i, estimate cached. At the last grid
        point the completion is the estimate itself: it is scored once per state."""
        copies = self.copies if i < engine.n_steps - 1 else 1
        x0 = engine.complete(state, i, copies, self.steps, generator)
        mask = engine.mask(state)
        r = scorer(x0, None if mask is None else mask.repeat_interleave(copies, 0)).double()
        return reduce(r.reshape(-1, copies), self.alpha)


def reduce(r: Tensor, alpha: float) -> Tensor:
    """Per row of r [B, K]: the mean (alpha = 0) or alpha (logsumexp(r / alpha) - log K)."""
    if alpha == 0:
        return r.mean(-1)
    return alpha * (torch.logsumexp(r / alpha, -1) - math.log(r.shape[-1]))


def parse_value(spec: str) -> Completions:
    """``completions:K[:STEPS[:ALPHA]]`` -> Completions(K, STEPS (default 1), ALPHA (default 0))."""
    parts = spec.split(":")
    if parts[0] != "completions" or not 2 <= len(parts) <= 4:
        raise ValueError(f"bad value spec {spec!r}: expected completions:K[:STEPS[:ALPHA]], e.g. completions:4:2")
    try:
        copies = int(parts[1])
        steps = int(parts[2]) if len(parts) > 2 else 1
        alpha = float(parts[3]) if len(parts) > 3 else 0.0
    except ValueError as err:
        raise ValueError(f"bad value spec {spec!r}: K and STEPS are integers, ALPHA a number ({err})") from None
    return Completions(copies, steps, alpha)
