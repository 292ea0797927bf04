"""The sampling loop: a ``Sampler`` (plan + step-level interface) and ``sample`` (the one-call form).

A sampler evaluates the model at ``n_steps`` grid times t_0 > ... > t_{n-1} and returns the denoised estimate
at the last one, so the step into sigma = 0 is always first order. Everything the loop needs per sample
(state, multistep history, mask, conditioning, its copy of the plan) lives in a ``State`` with a leading batch
dimension: guidance can resample or replicate particles with ``select(state, index)`` between steps.
The plan (``molgen.diffusion.plan``: grid points and the solver family's coefficients) is float64, computed
before the loop and memoised, and so are its copies in a state's device, dtype and rank. The loop itself never
synchronises with the host (non-finite model outputs are recorded per sample and reported once, after the loop).
The solver steps are pure functions of their plan row; the sampler binds the model to the state
(``BoundModel``), projects and masks, and keeps the finiteness record. On plain R^d without a mask the steps take
an affine fast path: a few fused multiply-adds of the state, the raw model output and the history.

The model the loop calls is the user's model composed with optional wrappers (``Sampler.net``):
``torch.compile``, the step-scaled ODE (``molgen.diffusion.step_scale.StepScaled``) and autocast, in that order.
A ``corrector`` (``molgen.diffusion.corrector``) adds Langevin steps after every transition (predictor-corrector
sampling); without one every output is the predictor's alone.

Self-conditioning (Chen et al. 2022, as in FrameFlow and Proteina): a model with ``self_conditioning = True`` is
called with ``self_cond=`` its own latest denoised estimate (absent at the first call), carried in the state's
``cond`` so that resampled and replicated particles keep their own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from molgen.diffusion.corrector import get_corrector, langevin
from molgen.diffusion.defaults import cold_ends, default_solver, ends_as_times
from molgen.diffusion.grids import get_grid
from molgen.diffusion.linear_part import gaussian, step_for
from molgen.diffusion.parameterization import check_prediction
from molgen.diffusion.plan import Plan, Points, State, column, points
from molgen.diffusion.schedules import Schedule, get_schedule
from molgen.diffusion.solvers import SOLVERS, compensate, get_solver
from molgen.diffusion.spaces import Euclidean, expand_mask
from molgen.diffusion.step_scale import StepScaled, anchor, scaled_times

SELF_COND = "self_cond"  # the keyword a self-conditioned model reads its previous denoised estimate from


def unit_scale(at: Points) -> Tensor:
    """s = sqrt(alpha^2 + sigma^2) at grid points ``at``: the standard deviation of x_t for unit-variance data,
    so that x_T / s(t_max) * s(t_0) carries noise from t_max to t_0 along the flow of unit-variance Gaussian data."""
    return (at.alpha**2 + at.sigma**2).sqrt()


def select(state: State, index: Tensor) -> State:
    """Particles ``index`` of ``state`` (resampling, replication); shared tables stay shared."""
    batch = state.batch

    def pick(t: Any) -> Any:
        if not isinstance(t, Tensor) or (t.shape[0] == 1 and batch > 1):
            return t
        return t.index_select(0, index.to(t.device))

    fields = {f: tree_map(pick, getattr(state, f)) for f in State.__dataclass_fields__ if f != "plan"}
    return State(**fields, plan=state.plan.pick(index, batch))


def first_nan_step(state: State) -> Tensor:
    """[B] long: the first step whose model output was not finite, per sample, -1 if none."""
    if not state.nan_step:
        return torch.full((state.batch,), -1, dtype=torch.long, device=state.x.device)
    steps = torch.tensor([s for s, _ in state.nan_step], dtype=torch.long, device=state.x.device)
    bad = ~torch.isfinite(torch.stack([v for _, v in state.nan_step]))  # [calls, B]
    first = torch.where(bad, steps[:, None], torch.iinfo(torch.long).max).amin(0)
    return torch.where(bad.any(0), first, -1)


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """[B] or [1] coefficient -> broadcastable against x, in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def plan_orders(kind: str, order: int, steps: int | None, nfe: int | None) -> tuple[int, list[int]]:
    """Number of grid points and the order of each of the ``n - 1`` transitions.

    Multistep solvers spend one model call per grid point. A singlestep transition of order k spends k calls
    (one at its start, k - 1 inside); with an ``nfe`` budget the calls are spread over as few transitions of
    order <= k as the budget allows, higher orders first (the last call is always the final denoising)."""
    if (steps is None) == (nfe is None):
        raise ValueError("give exactly one of steps= and nfe=")
    budget = steps if steps is not None else nfe
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{'steps' if steps is not None else 'nfe'} must be an integer >= 1, got {budget!r}")
    if kind == "multistep" or steps is not None:
        return budget, [order] * (budget - 1)
    transitions = math.ceil((budget - 1) / order)
    extra = budget - 1 - transitions
    base, rem = divmod(extra, transitions) if transitions else (0, 0)
    return transitions + 1, [base + 2] * rem + [base + 1] * (transitions - rem)


def model_calls(kind: str, orders: list[int]) -> int:
    """Model evaluations of a plan: one per grid point, plus the inner ones of singlestep transitions."""
    return len(orders) + 1 + (sum(o - 1 for o in orders) if kind == "singlestep" else 0)


@dataclass(frozen=True)
class Autocast:
    """``model`` run under autocast to ``dtype`` (the state stays in its own dtype)."""

    model: Callable[..., Tensor]
    dtype: torch.dtype

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x, t, **cond)


@dataclass
class Sampler:
    """A planned sampler: model, schedule, solver and time grid, with a step-level interface.

    ``init(x_T)`` -> state at t_0; ``estimate(state, i)`` -> (state, x0 at t_i), cached for the next step;
    ``step(state, i)`` moves from t_i to t_{i+1} (i < n_steps - 1); ``select(state, index)`` picks particles;
    ``finish(state)`` returns the denoised estimate at t_{n-1}. ``sample`` runs them all. The model is called
    as ``model(x_t, t, **cond)`` with per-sample times t [B] and returns its ``prediction``.
    """

    model: Callable[..., Tensor]
    schedule: Schedule | str
    solver: str | None = None  # None: defaults.default_solver for the call count
    steps: int | None = None
    nfe: int | None = None
    grid: str | Tensor = "logsnr"
    space: Any = None
    prediction: str | None = None
    solver_options: Mapping[str, Any] | None = None
    grid_options: Mapping[str, Any] | None = None
    clip_x0: float | None = None
    dynamic_threshold: float | None = None
    autocast: torch.dtype | None = None  # e.g. torch.bfloat16: the model runs under autocast, the state does not
    compile: bool | str = False  # torch.compile the model (True: inductor, or a backend name); the loop stays eager
    warm_start: Any = None  # GaussianMoments of the data: x_T is carried to the first grid point in closed form
    linear_part: Any = None  # GaussianMoments: every step integrates their flow exactly, extrapolates the residual
    step_scale: float = 1.0  # AF3's eta for any solver: dy/drho = eta (y - D) / rho (molgen.diffusion.step_scale)
    step_scale_below: float | None = None  # rho = sigma / alpha below which it applies (None: the whole grid)
    corrector: str | None = None  # "langevin": predictor-corrector sampling (molgen.diffusion.corrector)
    corrector_options: Mapping[str, Any] | None = None  # langevin: snr (0.16), steps (1) after every transition
    compensation: Any = None  # per-transition ratios on the higher-order term (solvers.compensate; diffusion.tune)
    noise_at_t_max: bool | None = None  # x_T drawn at t_max, carried to a lower first point; None: where the rule is
    n_steps: int = field(init=False)
    orders: list[int] = field(init=False)

    def __post_init__(self) -> None:
        """Validates and normalises the fields, then plans (memoised: plans are pure functions of the fields)."""
        self._check()
        t_grid, grid_options, grid_key = self._grid()
        key = None if grid_key is None else (
            self.spec.name, self.schedule, grid_key, tuple(self.orders), tuple(sorted(self.options.items())),
            self.prediction, self.linear_part, self.step_scale, self.step_scale_below, self.compensation,
        )
        try:
            hash(key)
        except TypeError:  # unhashable grid options: plan without memoising
            key = None
        self.plan = _memoised_plan(key, self, t_grid, grid_options)
        carry = self.noise_at_t_max if self.noise_at_t_max is not None else self._rule_start
        t_max = torch.tensor([self.schedule.t_max], dtype=torch.float64)
        self.noise_scale = float(unit_scale(points(self.schedule, t_max, self.net_prediction)))
        first = unit_scale(column(self.plan.grid, 0))
        self.carries = bool(carry and self.warm_start is None and ((first / self.noise_scale - 1).abs() > 1e-12).any())
        self._step = self.spec.step if self.linear_part is None else step_for(self.spec.linear_part)

    def _check(self) -> None:
        self.schedule = get_schedule(self.schedule)
        if self.solver is None:  # the default for the call count (an explicit grid's length when none is given)
            budget = self.steps if self.steps is not None else self.nfe
            if budget is None and isinstance(self.grid, Tensor):
                budget = self.grid.shape[0]
            if budget is None:
                raise ValueError("give steps= or nfe= (the default solver depends on the number of calls)")
            self.solver = default_solver(budget)
        self.spec = get_solver(self.solver)
        self.options = self.spec.check_options(self.solver_options or {})
        self.space = self.space if self.space is not None else Euclidean()
        pred = self.prediction or getattr(self.model, "prediction", None)
        if pred is None:
            raise ValueError("the model declares no prediction (x0, eps, v, velocity): pass prediction=")
        self.prediction = check_prediction(pred)
        if self.step_scale != 1.0:
            if not self.step_scale > 0:
                raise ValueError(f"step_scale must be > 0, got {self.step_scale}")
            if self.step_scale_below is not None and not self.step_scale_below > 0:
                raise ValueError(f"step_scale_below must be > 0, got {self.step_scale_below}")
            if self.spec.stochastic or self.linear_part is not None:
                raise ValueError("step_scale applies to the ODE solvers, without linear_part (af3 takes its own: "
                                 "solver_options={'step_scale': ...})")
        if self.clip_x0 is not None and self.dynamic_threshold is not None:
            raise ValueError("choose one of clip_x0 and dynamic_threshold")
        self.correction = None if self.corrector is None else get_corrector(self.corrector, self.corrector_options)
        if self.correction is not None and self.step_scale != 1.0:
            raise ValueError("a corrector samples the true marginals; the step-scaled ODE has none (step_scale=1)")
        if self.compensation is not None:
            if not self.spec.compensable or self.linear_part is not None:
                raise ValueError(f"compensation applies to the linear multistep solvers "
                                 f"{sorted(n for n, s in SOLVERS.items() if s.compensable)}, without linear_part")
            self.compensation = tuple(float(r) for r in self.compensation)
        if self.linear_part is not None and self.spec.linear_part is None:
            raise ValueError(
                f"solver {self.spec.name!r} has no exact-linear-part form; linear_part works with "
                f"{sorted(n for n, s in SOLVERS.items() if s.linear_part)}"
            )

    def _grid(self) -> tuple[Tensor | None, dict[str, Any], tuple | None]:
        """(explicit grid [1 or B, n] or None, named grid's options, grid key); sets n_steps and orders."""
        grid_options = dict(self.grid_options or {})
        self._rule_start = False
        if not isinstance(self.grid, Tensor):
            self.n_steps, self.orders = plan_orders(self.spec.kind, self.options["order"], self.steps, self.nfe)
            if not {"t_max", "t_min"} <= grid_options.keys():
                ends = (self.warm_start.grid_ends(self.schedule, self.model_calls) if self.warm_start is not None
                        else ends_as_times(self.schedule, *cold_ends(self.model_calls, self.grid)))
                self._rule_start = "t_max" not in grid_options
                grid_options = {**ends, **grid_options}
            return None, grid_options, (self.grid, tuple(sorted(grid_options.items())))
        grid = self.grid.to(torch.float64)
        t_grid = grid.reshape(grid.shape[0], -1).T.contiguous()  # [n] or [n, B] -> [1 or B, n]
        n = t_grid.shape[1]
        if (self.steps is None and self.nfe is None) or self.steps == n:
            self.steps, self.nfe = n, None
        self.n_steps, self.orders = plan_orders(self.spec.kind, self.options["order"], self.steps, self.nfe)
        if self.n_steps != n:
            raise ValueError(f"the explicit time grid has {n} points but the plan needs {self.n_steps}")
        if not bool((t_grid[:, 1:] < t_grid[:, :-1]).all()):
            raise ValueError("an explicit time grid must be strictly decreasing (noise first)")
        grid_key = (t_grid.shape, tuple(t_grid.flatten().tolist())) if t_grid.numel() <= 2048 else None
        return t_grid, grid_options, grid_key

    @functools.cached_property
    def net(self) -> Callable[..., Tensor]:
        """The model as the loop calls it: compiled, step-scaled (returning x0), under autocast (each optional)."""
        net = self.model
        if self.compile:
            net = torch.compile(net, backend=self.compile if isinstance(self.compile, str) else "inductor")
        if self.step_scale != 1.0:
            rho_0 = anchor(self.schedule, self.t_grid, self.step_scale_below)
            net = StepScaled(net, self.schedule, self.step_scale, rho_0, self.prediction)
        return net if self.autocast is None else Autocast(net, self.autocast)

    @property
    def self_conditioned(self) -> bool:
        """The model reads its previous denoised estimate (``SELF_COND``)."""
        return bool(getattr(self.model, "self_conditioning", False))

    @property
    def grid_times(self) -> Tensor:
        """The grid as given [B or 1, n], float64: the noise levels the denoiser is told (``t_grid`` holds a
        step-scaled run's state times)."""
        return self.plan.told if self.plan.told is not None else self.plan.grid.t

    @property
    def net_prediction(self) -> str:
        """What ``net`` returns: the model's prediction, or x0 from a step-scaled model."""
        return self.prediction if self.step_scale == 1.0 else "x0"

    @property
    def t_grid(self) -> Tensor:
        """The grid times [B or 1, n], float64 (a step-scaled run's state times)."""
        return self.plan.grid.t

    @property
    def tables(self) -> dict[str, Tensor]:
        """The plan's float64 tensors by name: the grid points' [B or 1, n], the solver's [B or 1, n - 1, ...]."""
        parts = [p for p in (self.plan.grid, self.plan.coef) if p is not None]
        return {k: v for p in parts for k, v in vars(p).items() if isinstance(v, Tensor)}

    @property
    def model_calls(self) -> int:
        """Model evaluations of a run: the plan's, plus the corrector's steps after every transition."""
        extra = 0 if self.correction is None else self.correction.steps * len(self.orders)
        return model_calls(self.spec.kind, self.orders) + extra

    @property
    def affine(self) -> bool:
        """Plain R^d without thresholding: states without a mask may take the affine fast path."""
        return type(self.space) is Euclidean and self.clip_x0 is None and self.dynamic_threshold is None

    # ---- the step-level interface -------------------------------------------------------------------------
    def init(self, x_T: Tensor, mask: Tensor | None = None, cond: Mapping[str, Tensor] | None = None) -> State:
        if not torch.is_floating_point(x_T):
            raise ValueError(f"x_T must be a floating-point tensor, got {x_T.dtype}")
        expand_mask(mask, x_T)  # validates the shape
        batch = x_T.shape[0]
        if self.t_grid.shape[0] not in (1, batch):
            raise ValueError(f"per-sample time grid has {self.t_grid.shape[0]} rows for a batch of {batch}")
        if self.linear_part is not None:
            if mask is not None:
                raise ValueError("linear_part needs fixed-size states (no padding mask)")
            if x_T.shape[1:] != self.linear_part.mean.shape:
                raise ValueError(f"linear_part moments are for states of shape {tuple(self.linear_part.mean.shape)}, "
                                 f"got {tuple(x_T.shape[1:])}")
        x = self.space.project(x_T, mask)
        if self.carries:  # x_T at t_max -> the first grid point, on the plan's device copy (no host transfer)
            x = x * (unit_scale(self.plan.on(x_T).at(0)) / self.noise_scale)
        if self.warm_start is not None:
            if mask is not None:
                raise ValueError("warm_start needs fixed-size states (no padding mask)")
            x = self.space.project(self.warm_start.flow(x, self.schedule, self.schedule.t_max, self.t_grid[:, 0]), mask)
        return State(
            x=self._keep(x, mask, x_T), x0=None, hist=(), extra=(), mask=mask, keep=x_T, cond=dict(cond or {}),
            plan=self.plan.on(x_T), nan_step=(),
        )

    def estimate(self, state: State, i: int) -> tuple[State, Tensor]:
        """The denoised estimate at grid point i (one model call), cached in the state for the next step."""
        model = BoundModel(self, state, i)
        x0 = model.denoise(state.x, state.plan.at(i))
        return replace(state, x0=x0, cond=model.cond, nan_step=model.record), x0

    def step(self, state: State, i: int, generator: torch.Generator | None = None) -> State:
        """From t_i to t_{i+1}: the solver's step on its plan row, then projection and padding (and the
        corrector's steps at t_{i+1}, when there is one)."""
        if not 0 <= i < self.n_steps - 1:
            raise IndexError(f"step {i} outside 0..{self.n_steps - 2}")
        model = BoundModel(self, state, i)
        noise = functools.partial(self.space.noise_like, state.x, state.mask, generator)
        row = state.plan.row(i)
        move = self._step(row, state, model, noise)
        x = move.x if model.affine else self._keep(self.space.project(move.x, state.mask), state.mask, state.keep)
        x0 = move.x0
        if self.correction is not None:
            x, x0 = langevin(self.correction, row, x, x0, state.mask, model, noise), None
        return replace(state, x=x, x0=x0, hist=move.hist, extra=move.extra, cond=model.cond, nan_step=model.record)

    @staticmethod
    def select(state: State, index: Tensor) -> State:
        return select(state, index)

    def final(self, state: State) -> State:
        """``state`` with ``x0`` = the denoised estimate at t_{n-1}, padded entries as they came in. No host
        synchronisation: a CUDA graph can hold ``init``, ``run`` and ``final`` (``molgen.diffusion.cuda_graph``)."""
        if state.x0 is None:
            state, _ = self.estimate(state, self.n_steps - 1)
        return replace(state, x0=self._keep(state.x0, state.mask, state.keep))

    def check_finite(self, state: State) -> None:
        """Raise if any model call returned NaN/inf: the one host synchronisation, after the loop."""
        sums = torch.cat([v for _, v in state.nan_step]) if state.nan_step else state.x.new_zeros(1)
        if not bool(torch.isfinite(sums).all()):
            nan_step = first_nan_step(state)
            bad = nan_step >= 0
            first = int(nan_step[bad].min())
            raise FloatingPointError(
                f"the model returned NaN/inf for {int(bad.sum())} of {state.batch} samples "
                f"(first at step {first} of {self.n_steps}, t={float(self.t_grid[0, first]):.4g})"
            )

    def finish(self, state: State) -> Tensor:
        state = self.final(state)
        self.check_finite(state)
        return state.x0

    def run(
        self, state: State, generator: torch.Generator | None = None, callback: Callable | None = None
    ) -> State:
        """All transitions; ``callback(i, state)`` after each."""
        for i in range(self.n_steps - 1):
            state = self.step(state, i, generator)
            if callback is not None:
                callback(i, state)
        return state

    # ---- masking and projection ---------------------------------------------------------------------------
    @staticmethod
    def _keep(x: Tensor, mask: Tensor | None, keep: Tensor) -> Tensor:
        m = expand_mask(mask, x)
        return x if m is None else torch.where(m, x, keep)

    def _clean(self, x0: Tensor, mask: Tensor | None) -> Tensor:
        """A denoised estimate thresholded, zero at padding and projected."""
        x0 = self._threshold(x0)
        m = expand_mask(mask, x0)
        if m is not None:
            x0 = torch.where(m, x0, torch.zeros_like(x0))
        return self.space.project(x0, mask)

    def _threshold(self, x0: Tensor) -> Tensor:
        if self.clip_x0 is not None:
            return x0.clamp(-self.clip_x0, self.clip_x0)
        if self.dynamic_threshold is not None:  # Imagen: s = max(1, quantile_p |x0|), x0 <- clip(x0, s) / s
            s = torch.quantile(x0.flatten(1).abs().float(), self.dynamic_threshold, dim=1).clamp_min(1.0)
            s = bcast(s, x0)
            return torch.maximum(torch.minimum(x0, s), -s) / s
        return x0


class BoundModel:
    """The sampler's model as a solver step sees it (``molgen.diffusion.plan.Model``): bound to one state's
    conditioning and mask at transition ``step``; every call appends its [B] row sums to ``record`` (one
    reduction, no host synchronisation) and, for a self-conditioned model, puts its denoised estimate into
    ``cond`` for the next call."""

    def __init__(self, sampler: Sampler, state: State, step: int) -> None:
        self.sampler, self.state, self.step = sampler, state, step
        self.affine = sampler.affine and state.mask is None
        self.record = state.nan_step
        self.cond = state.cond

    def _call(self, x: Tensor, at: Points) -> Tensor:
        t = at.t.reshape(-1).expand(x.shape[0])
        return self.sampler.net(x, t, **self.cond).to(x.dtype)

    def _note(self, values: Tensor, carried: bool = False) -> None:
        self.record = (*self.record, (self.step + carried, values.flatten(1).sum(1)))

    def _x0(self, x: Tensor, out: Tensor, at: Points) -> Tensor:
        """x0 = c_x x + c_out out, thresholded, masked and projected where the state needs it."""
        if at.prediction == "x0":
            x0 = out * at.c_out
        else:
            x0 = torch.mul(x, at.c_x)
            x0.addcmul_(at.c_out, out)
        if not self.affine:
            x0 = self.sampler._clean(x0, self.state.mask)
        if self.sampler.self_conditioned:
            self.cond = {**self.cond, SELF_COND: x0.detach()}
        return x0

    def output(self, x: Tensor, at: Points) -> Tensor:
        out = self._call(x, at)
        self._note(out)
        if self.sampler.self_conditioned:
            self._x0(x, out, at)
        return out

    def denoise(self, x: Tensor, at: Points, carried: bool = False) -> Tensor:
        x0 = self._x0(x, self._call(x, at), at)
        self._note(x0, carried)
        return x0

    def point(self, x: Tensor) -> Tensor:
        mask = self.state.mask
        return self.sampler._keep(self.sampler.space.project(x, mask), mask, self.state.keep)


_PLANS: dict[tuple, Plan] = {}


def make_plan(sampler: Sampler, t_grid: Tensor | None, grid_options: Mapping[str, Any]) -> Plan:
    """The plan of ``sampler``: its grid (step-scaled to the state times), the grid points for the prediction
    the steps receive, and the solver family's coefficients (or the exact-linear-part ones)."""
    if t_grid is None:
        t_grid = get_grid(sampler.grid, sampler.schedule, sampler.n_steps, **grid_options)[None]
    told = t_grid
    if sampler.step_scale != 1.0:
        t_grid = scaled_times(sampler.schedule, t_grid, sampler.step_scale, sampler.step_scale_below)
    grid, orders = points(sampler.schedule, t_grid, sampler.net_prediction), list(sampler.orders)
    if not orders:
        coef = None
    elif sampler.linear_part is not None:
        coef = gaussian(sampler.schedule, grid, orders, sampler.linear_part, sampler.spec.linear_part)
    else:
        coef = sampler.spec.plan(sampler.schedule, grid, orders, sampler.options)
    if sampler.compensation is not None:
        if len(sampler.compensation) != len(orders):
            raise ValueError(f"compensation has {len(sampler.compensation)} ratios for {len(orders)} transitions")
        coef = compensate(coef, grid, torch.tensor(sampler.compensation, dtype=torch.float64)[None])
    return Plan(grid, coef, tuple(orders), told=told if sampler.step_scale != 1.0 else None)


def _memoised_plan(key: tuple | None, sampler: Sampler, t_grid: Tensor | None,
                   grid_options: Mapping[str, Any]) -> Plan:
    """``make_plan``, memoised under ``key`` (plans are pure functions of their inputs)."""
    if key is not None and key in _PLANS:
        return _PLANS[key]
    plan = make_plan(sampler, t_grid, grid_options)
    if key is not None:
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def sample(
    model: Callable[..., Tensor],
    schedule: Schedule | str,
    x_T: Tensor,
    *,
    solver: str | None = None,
    steps: int | None = None,
    nfe: int | None = None,
    grid: str | Tensor = "logsnr",
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    cond: Mapping[str, Tensor] | None = None,
    space: Any = None,
    prediction: str | None = None,
    callback: Callable[[int, State], None] | None = None,
    solver_options: Mapping[str, Any] | None = None,
    grid_options: Mapping[str, Any] | None = None,
    clip_x0: float | None = None,
    dynamic_threshold: float | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | str = False,
    warm_start: Any = None,
    linear_part: Any = None,
    step_scale: float = 1.0,
    step_scale_below: float | None = None,
    corrector: str | None = None,
    corrector_options: Mapping[str, Any] | None = None,
    compensation: Any = None,
    noise_at_t_max: bool | None = None,
) -> Tensor:
    """Denoise ``x_T`` (drawn at the schedule's ``t_max``) with ``solver`` on a time ``grid``.

    Without a ``solver``, the default one for the number of calls (``molgen.diffusion.defaults``); a named grid's
    ends not given in ``grid_options`` follow the default rule for that number of calls (the first call below
    ``t_max`` for few calls: x_T is carried there along the flow of unit-variance Gaussian data, the identity on
    variance-preserving schedules). ``noise_at_t_max`` says whether x_T is noise at ``t_max`` to carry to a lower
    first point of any grid (True; tuned plans) or already a state there (False); None: only where the rule put it.

    ``steps`` is the number of grid points (= model calls for multistep solvers); ``nfe`` instead gives a model
    call budget that singlestep solvers spread over mixed orders. ``grid`` is a name or an explicit
    decreasing tensor of times, [n] or [n, B] for per-sample times. ``warm_start`` (``GaussianMoments`` of the
    data) carries x_T from ``t_max`` to the first grid point along the exact flow of the data's Gaussian
    approximation, with no model call; named grids then default to the ends of ``GaussianMoments.grid_ends``.
    ``linear_part`` (the same kind of moments, for ddim, dpmpp_2m/3m, unipc, euler, deis) changes the steps:
    each integrates the flow of N(m, C) exactly and extrapolates only the residual D - D_G. The two are
    independent; with both (the same moments) the whole run, start included, follows the Gaussian flow exactly
    where the model adds nothing. ``step_scale`` eta != 1 integrates AF3's step-scaled ODE
    dy/drho = eta (y - D) / rho with any ODE solver (``molgen.diffusion.step_scale``), below
    ``step_scale_below`` when given: the grid gives the noise levels the denoiser is told. ``corrector="langevin"``
    follows every transition with Langevin steps at the new grid point (predictor-corrector sampling,
    ``molgen.diffusion.corrector``; ``corrector_options``: snr, steps). ``compensation``: per-transition ratios on
    the higher-order term of dpmpp_2m/3m and deis (``solvers.compensate``; fitted by ``molgen.diffusion.tune``).
    Returns the x0 estimate at the last point.
    """
    sampler = Sampler(
        model, schedule, solver, steps=steps, nfe=nfe, grid=grid, space=space, prediction=prediction,
        solver_options=solver_options, grid_options=grid_options, clip_x0=clip_x0,
        dynamic_threshold=dynamic_threshold, autocast=autocast, compile=compile, warm_start=warm_start,
        linear_part=linear_part, step_scale=step_scale, step_scale_below=step_scale_below, corrector=corrector,
        corrector_options=corrector_options, compensation=compensation, noise_at_t_max=noise_at_t_max,
    )
    state = sampler.run(sampler.init(x_T, mask=mask, cond=cond), generator, callback)
    return sampler.finish(state)
