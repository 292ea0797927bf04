"""Guidance's view of a sampler: the sampler's own step protocol (``molgen.diffusion.plan.StepSampler``, which
the continuous and the masked-discrete samplers share), plus model-call accounting, times, the padding mask and
sampled completions, for SVDD and FK tilting.

    engine = as_engine(sampler)              # molgen.diffusion.Sampler or discrete.DiscreteSampler
    st = engine.init(x_T, mask, cond)
    st, x0 = engine.estimate(st, i)          # one model call per row; the estimate is cached in the state
    st = engine.step(st, i, generator)       # reuses the cached estimate: no model call
    st = engine.select(st, index)            # resampling / replication
    x = engine.finish(st)                    # the cached estimate at the last grid point (or one more call)
    engine.mask(st)                          # the padding mask (continuous states) or None
    x0 = engine.complete(st, i, copies, steps, generator)  # sampled completions of x_i to the end of the grid

``engine.rows`` counts model evaluations per sample row (``cached_ancestral`` evaluates only the rows that
changed since their last evaluation). For masked diffusion the denoised estimate is the
argmax of p(x0 | x_t) at masked positions (unmasked tokens kept), and the cache is ``log p(x0 | x_t)``.

Completions (``complete``) run the model's own transition from grid point i to the last one on ``steps``
transitions over a subset of the remaining grid points (``completion_points``), starting from the cached
estimate at i: a continuous completion costs ``steps`` model calls per copy (one at each later point, the
last included), a masked one ``steps - 1`` (its last point is t = 0, where every token is a letter). All are
counted in ``engine.rows``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from molgen.diffusion import Sampler, select
from molgen.diffusion.plan import StepSampler
from molgen.guidance.core import CACHE_SOLVERS, counted


def completion_points(i: int, n_steps: int, steps: int) -> list[int]:
    """Grid indices of a completion from point i to the last point n_steps - 1 with ``steps`` transitions,
    evenly spread over the remaining points (all of them when fewer remain)."""
    if not 0 <= i < n_steps:
        raise IndexError(f"grid point {i} outside 0..{n_steps - 1}")
    left = n_steps - 1 - i
    return sorted({i + round(left * k / steps) for k in range(steps + 1)}) if left else [i]


def _replicate(batch: int, copies: int, device: torch.device) -> Tensor:
    """Row p -> rows p * copies .. p * copies + copies - 1."""
    return torch.arange(batch, device=device).repeat_interleave(copies)


class Engine:
    """A sampler with its model calls counted per row (``rows``) and per batch (``batches``); ``init``,
    ``estimate``, ``step``, ``select`` and ``finish`` are the sampler's own."""

    def __init__(self, sampler: StepSampler) -> None:
        self.sampler = sampler
        self.run, self.counter = counted(sampler)

    @property
    def n_steps(self) -> int:
        return self.run.n_steps

    @property
    def rows(self) -> int:
        return self.counter.rows * getattr(self.sampler.model, "calls_per_row", 1)

    @property
    def batches(self) -> int:
        return self.counter.batches

    def init(self, x_T: Tensor, mask: Tensor | None = None, cond: Mapping[str, Tensor] | None = None) -> Any:
        return self.run.init(x_T, mask=mask, cond=cond)

    def estimate(self, st: Any, i: int) -> tuple[Any, Tensor]:
        return self.run.estimate(st, i)

    def step(self, st: Any, i: int, generator: torch.Generator | None) -> Any:
        return self.run.step(st, i, generator)

    def select(self, st: Any, index: Tensor) -> Any:
        return self.run.select(st, index)

    def finish(self, st: Any) -> Tensor:
        return self.run.finish(st)

    def mask(self, st: Any) -> Tensor | None:
        """The padding mask of continuous states (masked diffusion pads with a token: None)."""
        return getattr(st, "mask", None)


class ContinuousEngine(Engine):
    def __init__(self, sampler: Sampler) -> None:
        if sampler.solver not in CACHE_SOLVERS:
            raise ValueError(
                f"guidance needs a stochastic solver that reuses the cached denoiser output, one of "
                f"{CACHE_SOLVERS}; got {sampler.solver!r}"
            )
        super().__init__(sampler)
        self._completion_runs: dict[tuple[int, int], Sampler] = {}  # shared-grid completion samplers by (i, steps)

    @property
    def times(self) -> Tensor:
        """The time grid [n_steps] (the first row of a per-sample grid)."""
        return self.run.t_grid[0]

    def time(self, st: Any, i: int) -> Tensor:
        return st.times[:, i].expand(st.batch)

    def complete(self, st: Any, i: int, copies: int, steps: int, generator: torch.Generator | None) -> Tensor:
        """``copies`` sampled completions per row of ``st`` (at grid point i, estimate cached), rows grouped
        per source row: the solver's own steps on the remaining grid points ``completion_points``."""
        if st.x0 is None:
            raise ValueError("complete needs the denoised estimate at the state (call estimate first)")
        idx = completion_points(i, self.n_steps, steps)
        rep = select(st, _replicate(st.batch, copies, st.x.device))
        if len(idx) == 1:
            return rep.x0
        t = self.run.t_grid[:, idx]  # [1 or B, J + 1]
        if t.shape[0] == 1:  # the same sub-grid for every row: build its sampler (plan, tables) once
            if (i, steps) not in self._completion_runs:
                self._completion_runs[i, steps] = replace(self.run, grid=t[0], steps=None, nfe=None, warm_start=None)
            run = self._completion_runs[i, steps]
        else:
            run = replace(self.run, grid=t.repeat_interleave(copies, 0).T, steps=None, nfe=None, warm_start=None)
        sub = replace(run.init(rep.x, mask=rep.mask, cond=rep.cond), x0=rep.x0)
        return run.finish(run.run(sub, generator))


class DiscreteEngine(Engine):
    """Masked diffusion (``molgen.diffusion.discrete.DiscreteSampler``) on its time grid; the transition
    is the sampler's own (ancestral, cached_ancestral, tau_leaping, remdm), run from the cached log p(x0|x_t)."""

    def __init__(self, sampler: StepSampler) -> None:
        if sampler.solver == "first_hitting":
            raise ValueError("guidance supports the grid-based discrete samplers, not 'first_hitting'")
        super().__init__(sampler)

    @property
    def times(self) -> Tensor:
        """The time grid [n_steps], from 1 to 0."""
        return self.run.grid

    def time(self, st: Any, i: int) -> Tensor:
        return st.t

    def complete(self, st: Any, i: int, copies: int, steps: int, generator: torch.Generator | None) -> Tensor:
        """``copies`` sampled completions per row (grouped per row) by the sampler's own transition over the
        remaining grid points ``completion_points``; ``steps = 1`` draws every masked token at once from the
        cached p(x0 | x_t) (no model call)."""
        idx = completion_points(i, self.n_steps, steps)
        if len(idx) > 1 and st.at != i:
            raise ValueError("complete needs log p(x0 | x_t) at the state (call estimate first)")
        sub = self.select(st, _replicate(st.x.shape[0], copies, st.x.device))
        for j, k in enumerate(idx[1:]):
            sub, _ = self.estimate(sub, idx[j])
            sub = self.run.move(sub, torch.full_like(sub.t, float(self.run.grid[k])), generator)
        return self.finish(sub)


def as_engine(sampler: Any) -> ContinuousEngine | DiscreteEngine:
    if isinstance(sampler, Sampler):
        return ContinuousEngine(sampler)
    if isinstance(sampler, StepSampler) and hasattr(sampler, "process"):
        return DiscreteEngine(sampler)
    raise ValueError(f"not a sampler: {type(sampler).__name__} (expected a molgen Sampler or DiscreteSampler)")
