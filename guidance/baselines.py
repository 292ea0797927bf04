"""Baselines: unguided sampling, best-of-N at equal model calls, gradient (DPS / reconstruction) guidance.

Best-of-N draws N complete samples per output and keeps the one with the highest reward; a run with n_steps
model evaluations per sample costs N n_steps per output, so at SVDD's budget 1 + M (n_steps - 1) it gets
N = floor((1 + M (n_steps - 1)) / n_steps) candidates (``equal_call_candidates``).

Gradient guidance adds the reward's gradient through the denoised estimate to the score,
s*(x_t) = s(x_t) + scale grad_x r(D(x_t)), i.e. in x0 form D* = D + scale (sigma^2 / alpha) grad_x r(D(x_t))
(DPS-style reconstruction guidance). For a Gaussian prior and a linear reward it is exact: the tilted
marginal's score is s + scale grad_x E[a . x_0 | x_t].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from molgen.diffusion import Sampler
from molgen.diffusion.parameterization import check_prediction, to_x0
from molgen.diffusion.schedules import Schedule
from molgen.guidance.core import GuidanceResult, Scorer, Timer, check_count, counted
from molgen.guidance.engine import as_engine
from molgen.guidance.rewards import TensorReward


def equal_call_candidates(n_steps: int, budget: int) -> int:
    """Best-of-N's N for a per-output budget of model calls (at least 1)."""
    return max(1, budget // n_steps)


def best_of_n(
    sampler: Any,
    x_T: Tensor,
    reward: Callable[[Any], Tensor],
    *,
    candidates: int,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    cond: Mapping[str, Tensor] | None = None,
    decode: Callable[[Tensor], Any] | None = None,
) -> GuidanceResult:
    """``x_T`` [G * N, ...] -> the highest-reward sample of each group of N = ``candidates`` (N = 1: unguided).

    ``sampler``: any continuous ``Sampler`` (ODE solvers too) or a masked-diffusion ``DiscreteSampler``;
    only the final samples are scored."""
    n = check_count("candidates", candidates)
    if x_T.shape[0] % n:
        raise ValueError(f"x_T has {x_T.shape[0]} rows, not a multiple of candidates={n}")
    scorer = Scorer.of(reward, decode)
    groups = x_T.shape[0] // n
    with Timer() as timer:
        x0, rows, batches = run_unguided(sampler, x_T, generator, mask, cond)
        r = scorer(x0, mask)
        index = r.reshape(groups, n).argmax(-1) + n * torch.arange(groups, device=x_T.device)
    return GuidanceResult(
        samples=x0[index], rewards=r[index], model_calls=rows, model_batches=batches,
        reward_calls=scorer.calls, seconds=timer.seconds, particles=x0, particle_rewards=r,
        info={"candidates": n}, mask=None if mask is None else mask[index],
    )


def run_unguided(sampler: Any, x_T: Tensor, generator: torch.Generator | None = None, mask: Tensor | None = None,
                 cond: Mapping[str, Tensor] | None = None) -> tuple[Tensor, int, int]:
    """Plain sampling with model-call accounting: (samples, rows evaluated, batched calls)."""
    if isinstance(sampler, Sampler):
        run, counter = counted(sampler)
        x0 = run.finish(run.run(run.init(x_T, mask=mask, cond=cond), generator))
        return x0, counter.rows * getattr(sampler.model, "calls_per_row", 1), counter.batches
    engine = as_engine(sampler)
    st = engine.init(x_T, mask=mask, cond=cond)
    for i in range(engine.n_steps - 1):
        st, _ = engine.estimate(st, i)
        st = engine.step(st, i, generator)
    st, _ = engine.estimate(st, engine.n_steps - 1)
    return engine.finish(st), engine.rows, engine.batches


class GradientGuided:
    """x0 predictor D* = D + scale sigma^2 / alpha grad_x r(D(x)), for a differentiable reward ``fn``.

    Samples whose gradient is not finite get no guidance at that call (counted in ``bad_gradients``)."""

    prediction = "x0"

    def __init__(self, model: Callable[..., Tensor], schedule: Schedule, fn: Callable[[Tensor], Tensor],
                 scale: float, prediction: str | None = None) -> None:
        pred = prediction or getattr(model, "prediction", None)
        if pred is None:
            raise ValueError("the model declares no prediction: pass prediction=")
        self.model, self.schedule, self.fn, self.scale = model, schedule, fn, float(scale)
        self.model_prediction = check_prediction(pred)
        self.bad_gradients = 0

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        t64 = t.to(torch.float64)
        shape = (-1, *[1] * (x.ndim - 1))
        d_a, d_s = self.schedule.d_alpha_sigma(t64)
        a, s, d_a, d_s = (v.reshape(shape).to(x.dtype) for v in (self.schedule.alpha(t64),
                                                                  self.schedule.sigma(t64), d_a, d_s))
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            d = to_x0(self.model_prediction, self.model(xg, t, **cond).to(x.dtype), xg, a, s, d_a, d_s)
            (grad,) = torch.autograd.grad(self.fn(d).sum(), xg)
        ok = torch.isfinite(grad.flatten(1)).all(1)
        self.bad_gradients += int((~ok).sum())
        grad = torch.where(ok.reshape(shape), grad, torch.zeros_like(grad))
        return d.detach() + self.scale * s**2 / a * grad


def dps_sample(
    sampler: Sampler,
    x_T: Tensor,
    reward: TensorReward | Callable[[Tensor], Tensor],
    *,
    scale: float,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    cond: Mapping[str, Tensor] | None = None,
) -> GuidanceResult:
    """Gradient guidance with any solver; each model call also costs one backward pass (``info``)."""
    fn = reward.grad_fn if isinstance(reward, TensorReward) else reward
    if isinstance(reward, TensorReward) and not reward.differentiable:
        raise ValueError(f"reward {reward.name!r} is not differentiable; DPS needs a differentiable reward")
    guided = GradientGuided(sampler.model, sampler.schedule, fn, scale, sampler.prediction)
    plan = dataclasses.replace(sampler, model=guided, prediction="x0")
    run, counter = counted(plan)
    scorer = Scorer.of(reward)
    with Timer() as timer:
        x0 = run.finish(run.run(run.init(x_T, mask=mask, cond=cond), generator))
        r = scorer(x0, mask)
    return GuidanceResult(
        samples=x0, rewards=r, model_calls=counter.rows, model_batches=counter.batches,
        reward_calls=scorer.calls, seconds=timer.seconds,
        info={"scale": scale, "backward_calls": counter.rows, "bad_gradients": guided.bad_gradients}, mask=mask,
    )
