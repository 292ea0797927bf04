"""Shared pieces of the guidance methods: model-call accounting, reward scoring, results, the prior draw.

Accounting: ``model_calls`` counts denoiser evaluations per sample row (every particle and candidate), so
that methods are compared at equal compute; ``model_batches`` counts the batched calls.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from molgen.diffusion import Sampler
from molgen.guidance.rewards import Reward, as_reward

CACHE_SOLVERS = ("euler_maruyama", "ddpm_ancestral", "dpmpp_2m_sde")  # stochastic, reuse state.x0


class CallCounter:
    """Wraps a denoiser and counts calls (``batches``) and evaluated rows (``rows``)."""

    def __init__(self, model: Callable[..., Tensor]) -> None:
        self.model = model
        self.prediction = getattr(model, "prediction", None)
        self.self_conditioning = getattr(model, "self_conditioning", False)
        self.rows = 0
        self.batches = 0

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        self.rows += x.shape[0]
        self.batches += 1
        return self.model(x, t, **cond)


def counted(sampler: Any) -> tuple[Any, CallCounter]:
    """A copy of ``sampler`` (continuous or masked) whose model is wrapped in a ``CallCounter`` (the plan is
    reused)."""
    counter = CallCounter(sampler.model)
    keep = {"prediction": sampler.prediction} if isinstance(sampler, Sampler) else {}
    return dataclasses.replace(sampler, model=counter, **keep), counter


def check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def prior(sampler: Sampler, n: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
          dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """x_T = prior_std * z, z ~ N(0, I), for n samples of ``shape``."""
    z = torch.randn((n, *shape), generator=generator, dtype=dtype, device=device)
    return sampler.schedule.prior_std * z


@dataclass
class Scorer:
    """Reward of (decoded) samples, with the decoder applied first; counts what it scores.

    ``decode(x0)`` turns a batch of states into reward inputs; for states with a padding mask (molecules)
    the decoder is called as ``decode(x0, mask)``."""

    reward: Reward
    decode: Callable[[Tensor], Any] | None = None
    calls: int = 0

    @classmethod
    def of(cls, reward: Callable | Reward, decode: Callable[[Tensor], Any] | None = None) -> Scorer:
        return cls(as_reward(reward), decode)

    def __call__(self, x0: Tensor, mask: Tensor | None = None) -> Tensor:
        self.calls += x0.shape[0]
        if self.decode is None:
            samples = x0.detach()
        else:
            samples = self.decode(x0) if mask is None else self.decode(x0, mask)
        return self.reward(samples).to(x0.device)


@dataclass
class GuidanceResult:
    """Outputs of a guided run: one sample per group (``samples``, ``rewards``), the final population where
    the method has one, and the compute spent."""

    samples: Tensor
    rewards: Tensor
    model_calls: int
    model_batches: int
    reward_calls: int
    seconds: float
    particles: Tensor | None = None
    log_weights: Tensor | None = None
    particle_rewards: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    mask: Tensor | None = None  # padding mask of ``samples`` (molecules)

    def summary(self) -> dict[str, Any]:
        r = self.rewards.double().cpu()
        k = max(1, math.ceil(0.1 * r.numel()))
        return {
            "reward_mean": float(r.mean()),
            "reward_median": float(r.median()),
            "reward_top10": float(r.topk(k).values.mean()),
            "model_calls": self.model_calls,
            "reward_calls": self.reward_calls,
            "seconds": self.seconds,
            **{k_: v for k_, v in self.info.items() if isinstance(v, int | float | str)},
        }


def merge(results: list[GuidanceResult]) -> GuidanceResult:
    """One result from runs over disjoint chunks of outputs (samples padded to a common width; populations
    dropped): compute and time add up, integer counters in ``info`` add up, float entries are averaged
    weighted by the number of outputs, other entries come from the first chunk."""
    if not results:
        raise ValueError("nothing to merge")
    width = max(r.samples.shape[1] for r in results) if results[0].samples.ndim > 1 else None

    def pad(x: Tensor, value: float | bool) -> Tensor:
        if width is None or x.shape[1] == width:
            return x
        extra = torch.full((x.shape[0], width - x.shape[1], *x.shape[2:]), value, dtype=x.dtype, device=x.device)
        return torch.cat([x, extra], 1)

    masks = [r.mask for r in results]
    info = dict(results[0].info)
    for key, v in info.items():
        if isinstance(v, int) and not isinstance(v, bool) and key not in ("candidates", "particles"):
            info[key] = sum(int(r.info.get(key, 0)) for r in results)
        elif isinstance(v, float):
            info[key] = sum(float(r.info.get(key, 0.0)) * len(r.rewards) for r in results) / sum(
                len(r.rewards) for r in results)
    return GuidanceResult(
        samples=torch.cat([pad(r.samples, 0) for r in results]), rewards=torch.cat([r.rewards for r in results]),
        model_calls=sum(r.model_calls for r in results), model_batches=sum(r.model_batches for r in results),
        reward_calls=sum(r.reward_calls for r in results), seconds=sum(r.seconds for r in results),
        info=info, mask=None if any(m is None for m in masks) else torch.cat([pad(m, False) for m in masks]),
    )


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def gumbel_choice(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Categorical draws argmax(logits + G) over the last axis, float64 Gumbel noise."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return torch.argmax(logits.double() - torch.log(-torch.log(u.clamp_min(1e-300))), dim=-1)

