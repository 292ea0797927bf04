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

from guidance.rewards import Reward, as_reward
from molgen.diffusion import Sampler

CACHE_SOLVERS = ("euler_maruyama", "ddpm_ancestral", "dpmpp_2m_sde")  # stochastic, reuse state.x0


class CallCounter:
    """Wraps a denoiser and counts calls (``batches``) and evaluated rows (``rows``)."""

    def __init__(self, model: Callable[..., Tensor]) -> None:
        self.model = model
        self.prediction = getattr(model, "prediction", None)
        self.rows = 0
        self.batches = 0

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        self.rows += x.shape[0]
        self.batches += 1
        return self.model(x, t, **cond)


def counted(sampler: Sampler) -> tuple[Sampler, CallCounter]:
    """A copy of ``sampler`` whose model is wrapped in a ``CallCounter`` (the plan is reused)."""
    counter = CallCounter(sampler.model)
    return dataclasses.replace(sampler, model=counter, prediction=sampler.prediction), counter


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
    """Reward of (decoded) samples, with the decoder applied first; counts what it scores."""

    reward: Reward
    decode: Callable[[Tensor], Any] | None = None
    calls: int = 0

    @classmethod
    def of(cls, reward: Callable | Reward, decode: Callable[[Tensor], Any] | None = None) -> Scorer:
        return cls(as_reward(reward), decode)

    def __call__(self, x0: Tensor) -> Tensor:
        self.calls += x0.shape[0]
        samples = self.decode(x0) if self.decode is not None else x0.detach()
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

