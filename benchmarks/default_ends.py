"""Fits the cold default grid ends and solver per number of model calls (``molgen.diffusion.defaults``).

The rule: the first model call at rho = sigma / alpha = c_first * n, the last at c_last * min(1, (5 / n)^1.5), for
each named grid its own (c_first, c_last); the default solver for n calls is the one with the lowest error there.
Chosen on development problems that are not targets of ``benchmarks/samplers.py`` (a 16-D 6-component and a
32-D 8-component Gaussian mixture, another 64-D 16-component mixture, a 6-component 2-D mixture on a circle, the
QM9-subset molecules with 17 atoms), by the geometric mean over problems and n of the RMS distance to the exact
ODE solution divided by diffusers' best at the same n (the score ``benchmarks/samplers.py`` reports); then
frozen in ``molgen.diffusion.defaults``.

    python benchmarks/default_ends.py --json benchmarks/results/default_ends.json
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import samplers as bench  # noqa: E402 - the shared targets, metrics and diffusers driver

from molgen.diffusion import SOLVERS, sample  # noqa: E402
from molgen.diffusion.analytic import EmpiricalDenoiser, GaussianMixtureDenoiser  # noqa: E402
from molgen.diffusion.defaults import ends_as_times, rule_ends  # noqa: E402

SCHEDULE = bench.SCHEDULE
NFES = (3, 4, 5, 6, 8, 10)
C_FIRST = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
C_LAST = (0.03, 0.05, 0.1, 0.2, 0.3, 0.5)
SOLVER_SET = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "dpm_solver_2", "dpm_solver_3", "heun")


def mixture(dim: int, k: int, lo: float, hi: float, seed: int, scale: float = 1.0) -> GaussianMixtureDenoiser:
    """k components in dim-D: means scale * N(0, 1), stds U(lo, hi), Dirichlet(1) weights."""
    g = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(k, dim, generator=g, dtype=torch.float64)
    stds = lo + (hi - lo) * torch.rand(k, generator=g, dtype=torch.float64)
    w = -torch.log(torch.rand(k, generator=g, dtype=torch.float64))
    return GaussianMixtureDenoiser(means, stds, w / w.sum(), SCHEDULE)


def circle(k: int, radius: float, std: float, seed: int) -> GaussianMixtureDenoiser:
    g = torch.Generator().manual_seed(seed)
    a = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    w = -torch.log(torch.rand(k, generator=g, dtype=torch.float64))
    return GaussianMixtureDenoiser(radius * torch.stack([a.cos(), a.sin()], 1), std, w / w.sum(), SCHEDULE)


def qm9_atoms(n_atoms: int) -> EmpiricalDenoiser:
    with gzip.open(bench.QM9_SUBSET, "rt") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["N_atoms"]) == n_atoms]
    x = torch.tensor(np.stack([np.array(ast.literal_eval(r["XYZ_Ang"].replace("*^", "e"))) for r in rows]))
    return EmpiricalDenoiser((x - x.mean(1, keepdim=True)).flatten(1), SCHEDULE)


PROBLEMS = {
    "mixture_16d_dev": lambda: mixture(16, 6, 0.05, 0.25, 101),
    "mixture_32d_dev": lambda: mixture(32, 8, 0.1, 0.4, 7, 0.8),
    "mixture_64d_dev": lambda: mixture(64, 16, 0.2, 0.6, 1),
    "circle_2d_dev": lambda: circle(6, 1.5, 0.1, 3),
    "qm9_17_atoms": lambda: qm9_atoms(17),
}


def sweep(name: str, denoiser, n: int) -> list[dict]:
    x_T = torch.randn(n, denoiser.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reference = bench.ode_references(denoiser, x_T)
    ref = reference(SCHEDULE.t_max)
    rows = []
    for nfe in NFES:
        best = min(run[-1] for run in bench.diffusers_runs(denoiser, x_T, nfe, reference))
        for solver, grid, c_first, c_last in itertools.product(SOLVER_SET, bench.GRIDS, C_FIRST, C_LAST):
            ends = ends_as_times(SCHEDULE, *rule_ends(c_first, c_last, nfe))
            x = sample(denoiser, SCHEDULE, x_T, solver=solver, grid=grid, grid_options=ends, nfe=nfe)
            rows.append({"problem": name, "nfe": nfe, "solver": solver, "grid": grid, "c_first": c_first,
                         "c_last": c_last, "ratio": bench.rms_distance(x, ref) / best})
    print(f"{name}: {len(rows)} runs", file=sys.stderr)
    return rows


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def choose(rows: list[dict]) -> dict:
    """Per grid the (c_first, c_last) with the lowest geometric-mean ratio (each problem and n at its best
    solver); then per n the multistep solver with the lowest geometric-mean ratio on the logsnr grid's ends."""
    best_of: dict[tuple, float] = {}
    for r in rows:
        key = (r["grid"], r["c_first"], r["c_last"], r["problem"], r["nfe"])
        best_of[key] = min(best_of.get(key, math.inf), r["ratio"])
    scores: dict[tuple, list[float]] = {}
    for (grid, cf, cl, _, _), v in best_of.items():
        scores.setdefault((grid, cf, cl), []).append(v)
    grids = {}
    for grid in bench.GRIDS:
        (cf, cl), score = min((((k[1], k[2]), geomean(v)) for k, v in scores.items() if k[0] == grid),
                              key=lambda kv: kv[1])
        grids[grid] = {"c_first": cf, "c_last": cl, "geomean_ratio": round(score, 3)}
    solvers = {}
    chosen = grids["logsnr"]
    for nfe in NFES:
        per = {}
        for r in rows:  # multistep only: the default takes steps=n as n calls
            if (r["nfe"] == nfe and r["grid"] == "logsnr" and r["c_first"] == chosen["c_first"]
                    and SOLVERS[r["solver"]].kind == "multistep"
                    and r["c_last"] == chosen["c_last"]):
                per.setdefault(r["solver"], []).append(r["ratio"])
        name, values = min(per.items(), key=lambda kv: geomean(kv[1]))
        solvers[nfe] = {"solver": name, "geomean_ratio": round(geomean(values), 3),
                        "all": {k: round(geomean(v), 3) for k, v in sorted(per.items())}}
    return {"grids": grids, "solvers": solvers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--n", type=int, default=256, help="samples per problem")
    parser.add_argument("--rows", type=Path, default=None, help="also write every run here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [r for name, make in PROBLEMS.items() for r in sweep(name, make(), args.n)]
    if args.rows:
        args.rows.write_text(json.dumps(rows))
    chosen = choose(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"chosen": chosen, "problems": list(PROBLEMS), "nfe": NFES,
                                     "c_first": C_FIRST, "c_last": C_LAST, "solvers": SOLVER_SET}, indent=1))
    print(json.dumps(chosen, indent=1))


if __name__ == "__main__":
    main()
