"""Which few-step molecule sampler: a sweep over solver x where the grid starts x where it ends (at the default
step scale), chosen on one seed and re-measured on another.

    python benchmarks/molecule_samplers.py --out results/molecule_samplers.jsonl --device cuda

Every sampler draws ``--n-dev`` molecules of development seed 1 at ``--steps`` model calls (EDM metrics, RDKit
evaluation in a process pool); the ``--top`` best by molecule stability (then atom stability) and the shipped
default are re-measured on ``--n-report`` molecules of seed 0 at ``--steps`` and twice as many calls. One JSON
line per measurement, written as it comes. Samplers that break (the step-scaled state reaching sigma = 0 before
the last call) are recorded with their error. ``first_noise`` / ``last_noise``: sigma/alpha (Angstrom) of the first
and last model calls, null for the schedule's start / end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from multiprocessing import Pool
from pathlib import Path
from typing import IO

from molgen.molecules.metrics import evaluate
from molgen.molecules.sampling import FIRST_NOISE, STEP_SCALE, load_model, sample_molecules

SOLVERS = ("dpmpp_2m", "unipc", "dpmpp_3m", "deis")
FIRST_NOISE_OPTIONS = (None, 8.0, 4.0)  # None = the schedule's start (119 A)
LAST_NOISE = (None, 0.013, 0.05)  # None = the schedule's end (0.006 A)
DEFAULT = ("dpmpp_2m", STEP_SCALE, FIRST_NOISE, None)


def metrics(molecules: list) -> dict:
    return evaluate(molecules).as_dict()


def measure(model, config, samplers: list[tuple], steps: int, n: int, seed: int, tag: str, device: str,
            pool: Pool, log: IO[str]) -> list[dict]:
    """Sample on ``device`` one sampler after the other; evaluate in ``pool``; one JSON line each."""
    pending = []
    for solver, eta, first, last in samplers:
        row = {"tag": tag, "seed": seed, "n": n, "steps": steps, "solver": solver, "step_scale": eta,
               "first_noise": first, "last_noise": last}
        try:
            mols = sample_molecules(model, config, n, solver=solver, steps=steps, seed=seed, step_scale=eta,
                                    first_noise=math.inf if first is None else first, last_noise=last,
                                    batch_size=1000, device=device)
        except FloatingPointError as err:
            log.write(json.dumps({**row, "error": str(err)}) + "\n")
            continue
        pending.append((row, pool.apply_async(metrics, ([(m.symbols, m.positions) for m in mols],))))
    rows = []
    for row, result in pending:
        rows.append({**row, **result.get()})
        log.write(json.dumps(rows[-1]) + "\n")
        log.flush()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="JSON lines, appended")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--n-dev", type=int, default=1000)
    p.add_argument("--n-report", type=int, default=2000)
    p.add_argument("--top", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=8, help="RDKit evaluation processes")
    args = p.parse_args()
    model, config = load_model()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with Pool(args.workers) as pool, args.out.open("a") as log:
        grid = list(itertools.product(SOLVERS, [STEP_SCALE], FIRST_NOISE_OPTIONS, LAST_NOISE))
        dev = measure(model, config, grid, args.steps, args.n_dev, 1, "dev", args.device, pool, log)
        dev.sort(key=lambda r: (r["mol_stability"], r["atom_stability"]), reverse=True)
        best = [(r["solver"], r["step_scale"], r["first_noise"], r["last_noise"]) for r in dev[: args.top]]
        chosen = [DEFAULT, *(b for b in best if b != DEFAULT)]
        for steps in (args.steps, 2 * args.steps):
            measure(model, config, chosen, steps, args.n_report, 0, "report", args.device, pool, log)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
