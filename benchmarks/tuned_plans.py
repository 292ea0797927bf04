"""Tuned sampling plans on the shipped molecule and backbone models: each modality's own metrics for the plan
``molgen tune`` fits against the preset default at the same number of model calls, with the tuning cost.

Per call budget (``--nfe``) and modality, the plan is fitted (``tune_plan``: ``--batch`` noise draws, ``--seconds``
budget, seed 1) against the model's own 64-step ODE solution; then the same noise seed (0) is sampled with the
preset default and with the plan. Molecules (``--n`` of them, EDM metrics): the preset is dpmpp_2m on the
logSNR grid from 4 A with AF3's step scale 1.5 below 3 A. Backbones (``--n-backbones`` chains of ``--length``
residues; CA-CA validity, clashes, DSSP secondary structure): the preset is UniPC on the Karras grid (rho -4, to
0.1 A), warm-started at 5 A, step scale 1.5.

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
from molgen.structure import sampling as backbone_sampling  # noqa: E402
from molgen.structure.io import backbone_from_ca  # noqa: E402
from molgen.structure.metrics import evaluate as backbone_metrics  # noqa: E402

BACKBONE_KEYS = ("ca_ca_valid", "ca_ca_dev", "clash_rate", "helix", "strand", "coil")


def tuned(plan) -> dict:
    return {"solver": plan.solver, "compensation": plan.compensation, "tune_seconds": plan.fit["seconds"],
            "tune_model_calls": plan.fit["model_calls"], "fit": plan.fit}


def molecule_rows(args: argparse.Namespace) -> list[dict]:
    model, config = load_model(args.checkpoint)
    _, ref = reference_smiles("auto")
    rows = []
    for nfe in args.nfe:
        plan = tune_plan(model, config, nfe, batch=args.batch, budget_s=args.seconds, seed=1,
                         progress=lambda line: print(line, file=sys.stderr))
        for name, sampler in (("preset default", {"solver": "dpmpp_2m", "steps": nfe}), ("tuned plan", {"plan": plan})):
            row = quality(model, config, ref, args.n, sampler, 0, 256, "cpu")
            row.pop("plan", None)
            rows.append({"modality": "molecules", "nfe": nfe, "sampler": name, **row,
                         **(tuned(plan) if name == "tuned plan" else {})})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def backbone_rows(args: argparse.Namespace) -> list[dict]:
    model = backbone_sampling.load_model(backbone_sampling.DEFAULT_CHECKPOINT)
    rows = []
    for nfe in args.nfe:
        plan = backbone_sampling.tune_plan(model, args.length, nfe, batch=args.batch_backbones,
                                           budget_s=args.seconds, seed=1,
                                           progress=lambda line: print(line, file=sys.stderr))
        for name, kw in (("preset default", {}), ("tuned plan", {"plan": plan})):
            ca = backbone_sampling.sample_ca(model, args.n_backbones, args.length, "unipc", nfe, seed=0, **kw)
            metrics = backbone_metrics([backbone_from_ca(c.numpy()) for c in ca], tm=False, mpnn=False)
            rows.append({"modality": "backbones", "nfe": nfe, "sampler": name, "n": args.n_backbones,
                         **{k: metrics[k] for k in BACKBONE_KEYS}, **(tuned(plan) if name == "tuned plan" else {})})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="the molecule model")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--n", type=int, default=200, help="molecules per row")
    parser.add_argument("--n-backbones", type=int, default=32, help="backbones per row")
    parser.add_argument("--length", type=int, default=80, help="backbone length")
    parser.add_argument("--batch", type=int, default=128, help="tuning noise draws, molecules")
    parser.add_argument("--batch-backbones", type=int, default=32, help="tuning noise draws, backbones")
    parser.add_argument("--seconds", type=float, default=120.0, help="tuning budget per plan")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = molecule_rows(args) + backbone_rows(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "n": args.n, "n_backbones": args.n_backbones,
                                     "length": args.length, "seconds": args.seconds}, indent=1))


if __name__ == "__main__":
    main()
