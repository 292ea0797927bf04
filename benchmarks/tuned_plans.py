"""Tuned sampling plans on the shipped molecule model: EDM metrics of the plan ``molgen tune molecules`` fits
against the preset default at the same number of model calls, with the tuning cost.

Per call budget (``--nfe``): the plan is fitted (``molgen.molecules.sampling.tune_plan``: ``--batch`` noise draws,
``--seconds`` budget, seed 1) against the model's own 64-step ODE solution, then ``--n`` molecules (seed 0, the
same atom counts for every row) are sampled with the preset default (dpmpp_2m on the logSNR grid from 4 A,
AF3's step scale 1.5 below 3 A) and with the plan.

    python benchmarks/tuned_plans.py --json OUT.json [--nfe 5 10] [--n 200] [--seconds 120]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from molecules import quality  # noqa: E402 - the shared EDM-metric runner

from molgen.molecules.reference import reference_smiles  # noqa: E402
from molgen.molecules.sampling import DEFAULT_CHECKPOINT, load_model, tune_plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128, help="tuning noise draws")
    parser.add_argument("--seconds", type=float, default=120.0, help="tuning budget per plan")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, config = load_model(args.checkpoint)
    _, ref = reference_smiles("auto")
    rows = []
    for nfe in args.nfe:
        plan = tune_plan(model, config, nfe, batch=args.batch, budget_s=args.seconds, seed=1,
                         progress=lambda line: print(line, file=sys.stderr))
        runs = {"preset default": {"solver": "dpmpp_2m", "steps": nfe}, "tuned plan": {"plan": plan}}
        for name, sampler in runs.items():
            row = quality(model, config, ref, args.n, sampler, 0, 256, "cpu")
            row.pop("plan", None)
            if name == "tuned plan":
                row.update({"solver": plan.solver, "compensation": plan.compensation,
                            "tune_seconds": plan.fit["seconds"], "tune_model_calls": plan.fit["model_calls"],
                            "fit": plan.fit})
            rows.append({"nfe": nfe, "sampler": name, **row})
            print(json.dumps(rows[-1]), file=sys.stderr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "checkpoint": args.checkpoint, "n": args.n}, indent=1))


if __name__ == "__main__":
    main()
