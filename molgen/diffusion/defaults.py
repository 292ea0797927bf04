"""Default grid ends and solver by the number of model calls, for runs the user gives only a call count.

Few calls need a short path: a cold run's first call sits far below the schedule's ``t_max`` (x_T is carried
there along the flow of unit-variance Gaussian data, the identity on a variance-preserving schedule) and its last
call stops early, the final denoising doing the rest. With n calls, in rho = sigma / alpha (for data of about unit
variance):

    first = c_first n,    last = c_last min(1, (5 / n)^1.5),

clipped to the schedule's range, so that many-call runs span all of it. (c_first, c_last) per named grid and the
solver per n were chosen once on development problems that are not benchmark targets
(``benchmarks/default_ends.py``, results in ``benchmarks/results/default_ends.json``) and are frozen here.
Warm-started runs use ``warm_start_ends`` instead, in units of the data's own standard deviation.
"""

from __future__ import annotations

import math

from molgen.diffusion.schedules import Schedule

# grid -> (c_first, c_last), from benchmarks/default_ends.py
COLD_ENDS: dict[str, tuple[float, float]] = {
    "logsnr": (6.0, 0.3),
    "time_uniform": (6.0, 0.3),
    "time_quadratic": (6.0, 0.3),
    "karras": (6.0, 0.5),
    "sigmoid": (4.0, 0.3),
}
# the default (multistep) solver up to each number of calls, the last entry beyond, from the same fit (UniPC won
# at 4, 5, 8 and 10 calls; DPM-Solver++(3M) at 6 by 2 %, kept under UniPC for one switch point)
DEFAULT_SOLVERS: tuple[tuple[float, str], ...] = ((3, "dpmpp_2m"), (math.inf, "unipc"))


def _check_nfe(nfe: int) -> None:
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")


def rule_ends(c_first: float, c_last: float, nfe: int) -> tuple[float, float]:
    """(first, last) = (c_first n, c_last min(1, (5 / n)^1.5)), the form of both default rules."""
    _check_nfe(nfe)
    return c_first * nfe, c_last * min(1.0, (5.0 / nfe) ** 1.5)


def cold_ends(nfe: int, grid: str = "logsnr") -> tuple[float, float]:
    """(first, last) model evaluation of a cold run of ``nfe`` calls on ``grid``, as rho = sigma / alpha."""
    if grid not in COLD_ENDS:
        raise ValueError(f"unknown time grid {grid!r}; choose one of {sorted(COLD_ENDS)}")
    return rule_ends(*COLD_ENDS[grid], nfe)


def warm_start_ends(nfe: int) -> tuple[float, float]:
    """(first, last) model evaluation of a warm-started run of ``nfe`` calls, as rho = sigma / alpha in units of
    the data's standard deviation: first = 5 n / 4 (the Gaussian approximation is good to O(sigma_data^2 / rho^2)
    there, and more calls afford a longer path), last = 0.3 min(1, (5 / n)^1.5) (few calls stop early and
    denoise, many go close to the data). The rule was fitted once on development problems that are not
    benchmark targets (two other 64-D Gaussian mixtures, the QM9 molecules with 17 and 18 atoms, a 6-component
    2-D mixture): there the best first point lay at 3-4, 4-15 (flat), 10, 10-15 and 15-25 sigma_data for 3, 5,
    8, 10 and 20 calls. ``benchmarks/samplers.py`` measures on other problems."""
    return rule_ends(1.25, 0.3, nfe)


def ends_as_times(schedule: Schedule, first: float, last: float) -> dict[str, float]:
    """Grid options {t_max, t_min} for first / last evaluations at rho = ``first`` / ``last``, inside the
    schedule's range."""
    t_first, t_last = (float(schedule.t_of_rho(r)) for r in (first, last))
    return {"t_max": min(t_first, schedule.t_max), "t_min": max(t_last, schedule.t_min)}


def default_solver(nfe: int) -> str:
    """The solver ``sample(..., steps=n)`` uses when none is named (a multistep one: n calls = n grid points)."""
    _check_nfe(nfe)
    return next(name for below, name in DEFAULT_SOLVERS if nfe <= below)
