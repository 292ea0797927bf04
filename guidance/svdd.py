"""SVDD: soft value-based decoding in diffusion models (Li et al. 2024), on the engine's step interface.

At every transition i -> i + 1 each particle draws M children from the model's own stochastic transition
p(x_{i+1} | x_i), scores each child by a soft value v(x_{i+1}) and keeps one child, drawn with probabilities
softmax(v / alpha) over its M children (alpha = 0: the argmax; alpha -> inf: a uniform pick, which leaves
the model's distribution unchanged). SVDD-PM uses v = r(D(x_{i+1}, t_{i+1})), the reward of the child's
denoised estimate; SVDD-MC passes ``value(x_t, t, x0, mask) -> [B]``, e.g. a learned value network
(``guidance.value.as_value``; ``mask`` is the padding mask or None).

The chosen child's denoiser output is kept in ``state.x0``, so the next transition reuses it: a run costs
1 + M (n_steps - 1) model evaluations per particle (the first denoising, then M per transition; the last
children's estimates are the outputs), plus the completions' calls with ``Completions``. Particles never
interact, so batches split freely.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from molgen.guidance.completions import Completions
from molgen.guidance.core import GuidanceResult, Scorer, Timer, check_count, gumbel_choice
from molgen.guidance.engine import as_engine


def svdd_calls(n_steps: int, candidates: int) -> int:
    """Model evaluations per output of SVDD: 1 + M (n_steps - 1)."""
    return 1 + candidates * (n_steps - 1)


def branch_schedule(times: Tensor, candidates: int, branch_below: float | None = None) -> list[int]:
    """Children per transition i -> i + 1 on a grid of ``times`` (decreasing): M where t_{i+1} <= branch_below
    (everywhere when None), else 1."""
    if branch_below is None:
        return [candidates] * (len(times) - 1)
    if math.isnan(branch_below):
        raise ValueError("branch_below must be a time in [0, 1], got nan")
    return [candidates if float(t) <= branch_below else 1 for t in times[1:]]


def choose(values: Tensor, alpha: float, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of ``values`` [B, M]: softmax(values / alpha) draw; alpha = 0 -> argmax."""
    if alpha == 0:
        return values.argmax(-1)
    return gumbel_choice(values.double() / alpha, generator)


def svdd_sample(
    sampler: Any,
    x_T: Tensor,
    reward: Callable[[Any], Tensor],
    *,
    candidates: int,
    alpha: float = 0.0,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    cond: Mapping[str, Tensor] | None = None,
    decode: Callable[[Tensor], Any] | None = None,
    value: Callable[..., Tensor] | Completions | None = None,
    branch_below: float | None = None,
) -> GuidanceResult:
    """SVDD from ``x_T`` [B, ...] with M = ``candidates`` children per particle and step.

    ``sampler``: a stochastic continuous ``Sampler`` (ddpm_ancestral, euler_maruyama, dpmpp_2m_sde) or a
    masked-diffusion ``DiscreteSampler``. ``reward`` scores the final samples (and, for SVDD-PM, each
    child's denoised estimate); ``value(x_t, t, x0, mask)`` replaces the child score for SVDD-MC, and
    ``Completions`` scores each child by sampled completions (the last children: by their own reward).
    ``branch_below``: branch only into children at times t <= branch_below (one child, no value, above it),
    which spends the calls where values are informative: 1 + sum_i M_i calls (``branch_schedule``)."""
    check_count("candidates", candidates)
    if not (alpha >= 0 and not math.isnan(alpha)):
        raise ValueError(f"alpha must be >= 0 (0 = argmax, inf = no guidance), got {alpha}")
    engine = as_engine(sampler)
    schedule = branch_schedule(engine.times, candidates, branch_below)
    scorer = Scorer.of(reward, decode)
    b = x_T.shape[0]
    dev = x_T.device
    value_calls = 0
    with Timer() as timer:
        state, _ = engine.estimate(engine.init(x_T, mask=mask, cond=cond), 0)
        chosen = None
        for i, m in enumerate(schedule):
            spread = torch.arange(b, device=dev).repeat_interleave(m)  # particle p -> rows p*M .. p*M + M - 1
            kids = engine.step(engine.select(state, spread), i, generator)
            kids, x0 = engine.estimate(kids, i + 1)
            if m == 1:  # nothing to choose
                state, chosen = kids, None
                continue
            if value is None:
                v = scorer(x0, engine.mask(kids))
            elif isinstance(value, Completions):
                v = value.estimate(engine, kids, i + 1, scorer, generator)
            else:
                v = value(kids.x, engine.time(kids, i + 1), x0, engine.mask(kids)).double()
                value_calls += x0.shape[0]
            pick = torch.arange(b, device=dev) * m + choose(v.reshape(b, m), alpha, generator)
            state, chosen = engine.select(kids, pick), v[pick]
        samples = engine.finish(state)  # the cached estimate of the chosen children: no model call
        exact = value is None or isinstance(value, Completions)  # the last children were scored by their reward
        rewards = chosen if exact and chosen is not None else scorer(samples, engine.mask(state))
    return GuidanceResult(
        samples=samples, rewards=rewards, model_calls=engine.rows, model_batches=engine.batches,
        reward_calls=scorer.calls, seconds=timer.seconds,
        info={"candidates": candidates, "alpha": alpha,
              **({"branch_below": branch_below} if branch_below is not None else {}), "value_calls": value_calls,
              **({"value": value.spec} if isinstance(value, Completions) else {})}, mask=engine.mask(state),
    )
