"""Feynman-Kac SMC: reward tilting (FK steering; continuous and masked discrete) and Feynman-Kac correctors.

**Reward tilting** (Singhal et al. 2025). Target p(x_0) exp(lambda r(x_0)). Particles move with the model's own
stochastic transition; at step i the value of a noisy state is the reward of its denoised estimate,
r_i = r(D(x_i, t_i)), or with ``Tilt(value=Completions(K, steps, alpha))`` the mean (soft) reward of K sampled
completions of x_i (``guidance.completions``, their model calls counted), and particles are weighted by
potentials G_i:

    difference: log G_i = lambda (r_i - r_{i-1})      (r_{-1} = 0; the product telescopes to lambda r_last)
    max:        log G_i = lambda max_{j <= i} r_j
    sum:        log G_i = lambda sum_{j <= i} r_j

With ``exact=True`` the final potential is lambda r(x_0) - sum_i log G_i, so the product of all potentials
is exp(lambda r(x_0)) and the weighted population targets the tilted distribution for any choice above
(the intermediate potentials only decide which particles survive).

**Feynman-Kac correctors** (Skreta et al. 2025). For a target path p~_t = prod_k q_{k,t}^{beta_k} of model
marginals (annealing q^beta, product q_1 q_2, classifier-free guidance q_c^w q_u^{1-w}), simulate the reverse
SDE of the combined score s* = sum_k beta_k s_k (in x0 form D* = sum_k beta_k D_k + (1 - sum_k beta_k) x / alpha)
and carry, in sampling time, d log w = h dt with

    h = g^2 / 2 ( |sum_k beta_k s_k|^2 - sum_k beta_k |s_k|^2 ),   g^2 = 2 sigma sigma' - 2 (alpha'/alpha) sigma^2

(annealing: g^2/2 beta (beta - 1) |s|^2; product: g^2 s_1 . s_2; CFG: -g^2/2 w (1 - w) |s_c - s_u|^2).
Since g^2 dt = sigma^2 d lambda (lambda the logSNR, increasing in sampling time), h dt = H d lambda with
H = (|sum_k beta_k e_k|^2 - sum_k beta_k |e_k|^2) / 2 and e_k = (x - alpha D_k) / sigma, which is integrated by
the trapezoid rule over the grid's logSNR points (the Euler rule in t is badly biased where g^2 blows up).
It follows from the Fokker-Planck equation of each q_k: with drift -f x + g^2 s* the Laplacian terms cancel
and what is left is h plus a particle-independent constant. Initial particles x_T ~ N(0, prior_std^2) get
log w_0 = -(sum_k beta_k - 1) |x_T|^2 / (2 prior_std^2), the ratio of prod_k q_{k,T}^{beta_k} to the prior.
Both kinds of weights can be combined in one run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from molgen.diffusion import Sampler
from molgen.diffusion.parameterization import check_prediction, to_x0
from molgen.diffusion.schedules import Schedule
from molgen.diffusion.spaces import expand_mask
from molgen.guidance.completions import Completions
from molgen.guidance.core import GuidanceResult, Scorer, Timer, check_count, gumbel_choice
from molgen.guidance.engine import as_engine
from molgen.guidance.smc import Particles, ResamplePolicy, ess, normalise

POTENTIALS = ("difference", "max", "sum")


# -------------------------------------------------------------------------------------------- reward tilting
@dataclass
class Tilt:
    """p(x) exp(lambda r(x)): the reward, its temperature, the FK-steering potential, how often
    intermediate rewards are taken (every ``every``-th step; the final reward always) and how (``value``:
    None = the reward of the denoised estimate, or sampled ``Completions``)."""

    reward: Callable[[Any], Tensor]
    lam: float = 1.0
    potential: str = "difference"
    every: int = 1
    exact: bool = True
    decode: Callable[[Tensor], Any] | None = None
    value: Completions | None = None

    def __post_init__(self) -> None:
        if self.potential not in POTENTIALS:
            raise ValueError(f"unknown FK potential {self.potential!r}; choose one of {POTENTIALS}")
        check_count("tilt every", self.every)


def potential_step(kind: str, lam: float, r: Tensor, carry: dict[str, Tensor]) -> Tensor:
    """log G_i for rewards r [P] of the current step; updates the running statistic in ``carry``."""
    if kind == "difference":
        log_g = lam * (r - carry["stat"])
        carry["stat"] = r
    elif kind == "max":
        carry["stat"] = torch.maximum(carry["stat"], r)
        log_g = lam * carry["stat"]
    else:
        carry["stat"] = carry["stat"] + r
        log_g = lam * carry["stat"]
    carry["log_prod"] = carry["log_prod"] + log_g
    return log_g


# -------------------------------------------------------------------------------------------- correctors
@dataclass
class Expert:
    """One factor q_k^beta_k: a denoiser, its exponent and an optional change of conditioning (CFG)."""

    model: Callable[..., Tensor]
    beta: float = 1.0
    cond: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    prediction: str | None = None

    def __post_init__(self) -> None:
        pred = self.prediction or getattr(self.model, "prediction", None)
        if pred is None:
            raise ValueError("an expert's model declares no prediction: pass prediction=")
        self.prediction = check_prediction(pred)


class Composition:
    """The denoiser of prod_k q_k^beta_k (an x0 predictor); remembers the experts' x0 estimates of its last
    call so that FK can weight particles without evaluating the models again."""

    prediction = "x0"

    def __init__(self, experts: Sequence[Expert], schedule: Schedule) -> None:
        if not experts:
            raise ValueError("a composition needs at least one expert")
        self.experts = list(experts)
        self.schedule = schedule
        self.betas = [float(e.beta) for e in self.experts]
        self.calls_per_row = len(self.experts)
        self.last: tuple[Tensor, list[Tensor]] | None = None

    @property
    def beta_sum(self) -> float:
        return sum(self.betas)

    def coefficients(self, t: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        t64 = t.to(torch.float64)
        d_a, d_s = self.schedule.d_alpha_sigma(t64)
        shape = (-1, *[1] * (x.ndim - 1))
        return tuple(v.reshape(shape).to(x.dtype) for v in (self.schedule.alpha(t64), self.schedule.sigma(t64),
                                                            d_a, d_s))

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        a, s, d_a, d_s = self.coefficients(t, x)
        outs = []
        for e in self.experts:
            c = e.cond(dict(cond)) if e.cond is not None else cond
            outs.append(to_x0(e.prediction, e.model(x, t, **c).to(x.dtype), x, a, s, d_a, d_s))
        self.last = (x, outs)
        combined = sum(b * d for b, d in zip(self.betas, outs))
        return combined + (1.0 - self.beta_sum) * x / a if self.beta_sum != 1.0 else combined

    def rate(self, x: Tensor, t: Tensor, outs: list[Tensor], mask: Tensor | None, space: Any) -> Tensor:
        """H(x, t) [B] = (|sum_k beta_k e_k|^2 - sum_k beta_k |e_k|^2) / 2 with e_k = (x - alpha D_k) / sigma
        (projected onto the state space, zero on padding), so that h dt = H d lambda (g^2 dt = sigma^2 d lambda
        in sampling time, lambda the logSNR): the weight integrand is smooth in lambda."""
        a, s, _, _ = self.coefficients(t, x)
        m = expand_mask(mask, x)
        eps = []
        for d in outs:
            e = space.project((x - a * d) / s, mask)
            eps.append(e if m is None else e * m)
        mix = sum(b * e for b, e in zip(self.betas, eps))
        sq = (mix**2).flatten(1).sum(1) - sum(b * (e**2).flatten(1).sum(1) for b, e in zip(self.betas, eps))
        return 0.5 * sq.double()

    def initial_log_weight(self, x_T: Tensor, prior_std: float, mask: Tensor | None, space: Any) -> Tensor:
        """-(sum beta - 1) |x_T|^2 / (2 prior_std^2): prod_k q_{k,T}^beta_k against the N(0, prior_std^2) draw."""
        x = space.project(x_T, mask)
        m = expand_mask(mask, x)
        x = x if m is None else x * m
        return -(self.beta_sum - 1.0) * (x.double() ** 2).flatten(1).sum(1) / (2.0 * prior_std**2)


def anneal(model: Callable[..., Tensor], beta: float, schedule: Schedule) -> Composition:
    """q^beta (beta > 1 sharpens, < 1 flattens)."""
    return Composition([Expert(model, beta)], schedule)


def product(model_1: Callable[..., Tensor], model_2: Callable[..., Tensor], schedule: Schedule) -> Composition:
    """q_1 q_2 (product of experts)."""
    return Composition([Expert(model_1), Expert(model_2)], schedule)


def cfg(model: Callable[..., Tensor], w: float, schedule: Schedule, key: str = "labels",
        null_label: int = 0) -> Composition:
    """q(x | c)^w q(x)^(1 - w): classifier-free guidance with guidance weight w; the unconditional model is
    the same network with ``cond[key]`` replaced by ``null_label``."""

    def null(cond: dict[str, Tensor]) -> dict[str, Tensor]:
        if key not in cond:
            raise ValueError(f"classifier-free guidance needs cond[{key!r}]")
        return {**cond, key: torch.full_like(cond[key], null_label)}

    return Composition([Expert(model, w), Expert(model, 1.0 - w, cond=null)], schedule)


# -------------------------------------------------------------------------------------------- the loop
def fk_sample(
    sampler: Any,
    x_T: Tensor,
    *,
    particles: int,
    tilt: Tilt | None = None,
    policy: ResamplePolicy | None = None,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    cond: Mapping[str, Tensor] | None = None,
    final: str = "sample",
) -> GuidanceResult:
    """Feynman-Kac SMC with ``x_T`` [G * K, ...] holding G groups of K = ``particles`` particles.

    ``sampler`` is the proposal: a stochastic continuous ``Sampler`` (``ddpm_ancestral``, ``euler_maruyama``,
    ``dpmpp_2m_sde``) or a masked-diffusion ``DiscreteSampler`` (tilting only). If the continuous model is a
    ``Composition`` the corrector weights are carried; ``tilt`` adds reward potentials. Each step evaluates
    the model once per particle (the transition reuses that evaluation) and the end once more.
    ``final``: "sample" draws one output per group by weight, "best" keeps the particle with the highest
    final reward (or weight, without a tilt). The population, its normalised log-weights and (with a tilt)
    its rewards are returned too.
    """
    k = check_count("particles", particles)
    if x_T.shape[0] % k:
        raise ValueError(f"x_T has {x_T.shape[0]} rows, not a multiple of particles={k}")
    if final not in ("sample", "best"):
        raise ValueError(f"final must be 'sample' or 'best', got {final!r}")
    policy = policy or ResamplePolicy()
    engine = as_engine(sampler)
    composition = getattr(sampler, "model", None)
    composition = composition if isinstance(composition, Composition) and isinstance(sampler, Sampler) else None
    if composition is not None and composition.beta_sum != 1.0 and sampler.solver != "euler_maruyama":
        raise ValueError(
            f"Feynman-Kac correctors with sum(beta) = {composition.beta_sum:g} != 1 need solver='euler_maruyama': "
            f"{sampler.solver!r} holds D* = sum beta D + (1 - sum beta) x / alpha fixed over a step, which is "
            "biased at practical step counts"
        )
    scorer = Scorer.of(tilt.reward, tilt.decode) if tilt is not None else None
    groups = x_T.shape[0] // k
    dev = x_T.device
    with Timer() as timer:
        pop = Particles.start(engine.init(x_T, mask=mask, cond=cond), groups, engine.select)
        if composition is not None:
            pop.reweight(composition.initial_log_weight(x_T, sampler.schedule.prior_std, mask, sampler.space))
        if tilt is not None:
            start = float("-inf") if tilt.potential == "max" else 0.0
            pop.carry = {"stat": torch.full((x_T.shape[0],), start, dtype=torch.float64, device=dev),
                         "log_prod": torch.zeros(x_T.shape[0], dtype=torch.float64, device=dev)}
        ess_trace = []
        last = engine.n_steps - 1
        for i in range(last):
            pop.state, x0 = engine.estimate(pop.state, i)
            if composition is not None:
                pop.reweight(_corrector(composition, pop.state, i, sampler))
            if tilt is not None and (i + 1) % tilt.every == 0:
                r = (scorer(x0, engine.mask(pop.state)) if tilt.value is None
                     else tilt.value.estimate(engine, pop.state, i, scorer, generator))
                pop.reweight(potential_step(tilt.potential, tilt.lam, r, pop.carry))
            ess_trace.append(ess(pop.log_w))
            if policy.due(i):
                pop.resample(policy, generator)
            pop.state = engine.step(pop.state, i, generator)
        pop.state, _ = engine.estimate(pop.state, last)
        x0 = engine.finish(pop.state)
        if composition is not None:
            pop.reweight(_corrector(composition, pop.state, last, sampler))
        rewards = None
        if tilt is not None:
            rewards = scorer(x0, engine.mask(pop.state))
            if tilt.exact:
                pop.reweight(tilt.lam * rewards - pop.carry["log_prod"])
            else:
                pop.reweight(potential_step(tilt.potential, tilt.lam, rewards, pop.carry))
        log_w = normalise(pop.log_w)
        key = rewards.reshape(groups, k) if (final == "best" and rewards is not None) else log_w
        pick = gumbel_choice(log_w, generator) if final == "sample" else key.argmax(-1)
        index = pick + k * torch.arange(groups, device=dev)
        out_rewards = rewards[index] if rewards is not None else torch.full((groups,), float("nan"))
        mask_out = engine.mask(pop.state)
    info = {"resamples": int(pop.resamples.sum()), "groups": groups, "particles": k,
            **({"value": tilt.value.spec} if tilt is not None and tilt.value is not None else {}),
            "ess_mean": float(torch.stack(ess_trace).mean()) if ess_trace else float(k),
            "log_evidence_mean": float(pop.log_evidence().mean())}
    return GuidanceResult(
        samples=x0[index], rewards=out_rewards, model_calls=engine.rows, model_batches=engine.batches,
        reward_calls=scorer.calls if scorer else 0, seconds=timer.seconds,
        particles=x0, log_weights=log_w, particle_rewards=rewards, info=info,
        mask=None if mask_out is None else mask_out[index],
    )


def _corrector(composition: Composition, state: Any, i: int, sampler: Sampler) -> Tensor:
    """Trapezoid rule in lambda along the path: node i carries H(x_i) (lambda_{i+1} - lambda_{i-1}) / 2
    (one-sided at both ends), from the experts' estimates of the call just made at (x_i, t_i)."""
    t = state.times.double()
    lam = sampler.schedule.lam(t)
    n = t.shape[1]
    span = lam[:, min(i + 1, n - 1)] - lam[:, max(i - 1, 0)]
    x, outs = composition.last
    h = composition.rate(x, t[:, i].to(x.dtype).expand(x.shape[0]), outs, state.mask, sampler.space)
    return 0.5 * span * h
