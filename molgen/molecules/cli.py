"""``molgen sample|evaluate|train molecules`` hooks (discovered by ``molgen.cli``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from molgen.batching import batch_size_arg
from molgen.molecules.data import MAX_ATOMS


def add_sample(parser: argparse.ArgumentParser, modality: str) -> None:
    from molgen.modalities import get_modality

    presets = get_modality(modality).presets
    parser.add_argument("--n", type=int, default=100, help="number of molecules")
    parser.add_argument("--preset", default="default", choices=sorted(presets),
                        help="; ".join(f"{k}: {p.solver}, {p.steps} steps" for k, p in presets.items()))
    parser.add_argument("--solver", default=None, help="any engine solver (molgen.diffusion.SOLVERS); default: the "
                                                       "preset's")
    parser.add_argument("--steps", type=int, default=None, help="grid points = model calls for multistep solvers")
    parser.add_argument("--grid", default=None, help="time grid (molgen.diffusion.GRIDS); default: the preset's")
    parser.add_argument("--plan", default=None,
                        help="a sampling plan from `molgen tune molecules` (replaces solver, steps, grid, step scale)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output .sdf or .xyz")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped data/molecules/qm9_egnn.pt")
    parser.add_argument(
        "--atoms",
        type=int,
        default=None,
        help=f"atoms per molecule (1-{MAX_ATOMS}); default: drawn from the training histogram",
    )
    parser.add_argument(
        "--condition",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="property condition, e.g. gap=0.25 (Hartree); repeatable",
    )
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--step-scale", type=float, default=None,
                        help="AF3's step scale for ODE solvers (default 1.5; 1 = the plain ODE)")
    parser.add_argument("--step-scale-below", type=float, default=None,
                        help="sigma/alpha below which the step scale applies (default 3)")
    parser.add_argument("--first-noise", type=float, default=None,
                        help="sigma/alpha (Angstrom) of the first model call (default 4 for ODE solvers; inf, "
                             "the schedule's start, for stochastic ones as in EDM's 1000-step protocol)")
    parser.add_argument("--last-noise", type=float, default=None,
                        help="sigma/alpha (Angstrom) of the last model call (default: the schedule's end); "
                             "0.05 with dpmpp_3m favours stable atoms over validity at 10 calls")
    parser.add_argument("--batch-size", type=batch_size_arg, default=256,
                        help="molecules per model call, or auto: the largest that fits the device")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def parse_conditions(items: list[str]) -> dict[str, float]:
    """["gap=0.25"] -> {"gap": 0.25}."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--condition {item!r}: expected NAME=VALUE, e.g. gap=0.25")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--condition {item!r}: {value!r} is not a number") from None
    return out


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from molgen.diffusion.tune import TunedPlan
    from molgen.molecules.io import write_molecules
    from molgen.molecules.sampling import load_model, sample_molecules, sampler_settings

    if Path(args.out).suffix.lower() not in (".sdf", ".xyz"):
        raise ValueError(f"--out {args.out}: use a .sdf or .xyz file name")
    from molgen.modalities import get_modality
    from molgen.modalities.base import write_sampling_record

    torch.set_num_threads(args.threads)
    preset = get_modality("molecules").preset(args.preset, args.solver, args.steps)
    given = {"grid": args.grid, "step_scale": args.step_scale, "step_scale_below": args.step_scale_below,
             "first_noise": args.first_noise, "last_noise": args.last_noise}
    options = {**preset.options, **{k: v for k, v in given.items() if v is not None}}
    model, config = load_model(args.checkpoint)
    plan = TunedPlan.load(args.plan) if args.plan else None
    start = time.perf_counter()
    mols = sample_molecules(
        model,
        config,
        args.n,
        solver=preset.solver,
        steps=preset.steps,
        seed=args.seed,
        atoms=args.atoms,
        condition=parse_conditions(args.condition),
        guidance=args.guidance,
        batch_size=args.batch_size,
        device=args.device,
        plan=plan,
        **options,
    )
    elapsed = time.perf_counter() - start
    write_molecules(args.out, mols)
    write_sampling_record(args.out, dataclasses.replace(preset, options=options), n=len(mols), seed=args.seed,
                          atoms=args.atoms, condition=args.condition, guidance=args.guidance,
                          checkpoint=args.checkpoint or "shipped", plan=plan and plan.record(),
                          resolved=sampler_settings(preset.solver, options.get("step_scale"),
                                                    options.get("step_scale_below"), options.get("first_noise")))
    print(f"wrote {len(mols)} molecules to {args.out} ({elapsed:.1f} s, {len(mols) / elapsed:.1f} molecules/s)")
    return 0


def add_tune(parser: argparse.ArgumentParser, modality: str) -> None:
    parser.add_argument("--nfe", type=int, required=True, help="model calls of the plan")
    parser.add_argument("--out", required=True, help="the plan file (JSON), for `molgen sample molecules --plan`")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped data/molecules/qm9_egnn.pt")
    parser.add_argument("--batch", type=int, default=128, help="noise draws (half fitted on, half scoring)")
    parser.add_argument("--seconds", type=float, default=120.0, help="tuning budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def run_tune(args: argparse.Namespace) -> int:
    import torch

    from molgen.molecules.sampling import load_model, tune_plan

    torch.set_num_threads(args.threads)
    model, config = load_model(args.checkpoint)
    plan = tune_plan(model, config, args.nfe, batch=args.batch, budget_s=args.seconds, seed=args.seed,
                     progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote {plan.save(args.out)}: {plan.summary()}")
    return 0


def add_evaluate(parser: argparse.ArgumentParser, modality: str) -> None:
    parser.add_argument("file", help="SDF or multi-XYZ file (optionally .gz)")
    parser.add_argument("--json", default=None, help="write the metrics here")
    parser.add_argument(
        "--reference",
        default="auto",
        choices=["auto", "qm9", "subset", "none"],
        help="training SMILES for novelty: qm9 train split (shipped list), the 5k subset, or none",
    )


def run_evaluate(args: argparse.Namespace) -> int:
    from molgen.errors import InputError, skipped_summary
    from molgen.molecules.io import read_molecules
    from molgen.molecules.metrics import evaluate, file_bond_metrics, hydrogen_warnings
    from molgen.molecules.reference import reference_smiles

    mols, skipped = read_molecules(args.file)
    if not mols:
        first = f": {skipped[0]}" if skipped else ""
        raise InputError(f"no usable molecules ({len(skipped)} records skipped{first})", str(args.file))
    ref_name, ref = reference_smiles(args.reference)
    metrics = evaluate(((m.symbols, m.positions) for m in mols), reference_smiles=ref)
    bonded = [m.bonded for m in mols if m.bonded is not None]
    file_bonds = file_bond_metrics(bonded) if bonded else None
    warnings = hydrogen_warnings((m.symbols for m in mols), file_bonds)
    result = {
        **metrics.as_dict(),
        "metric": "EDM: bonds inferred from interatomic distances (the metric for generated structures)",
        "file_bonds": None if file_bonds is None else {
            **file_bonds.as_dict(), "metric": "RDKit: the file's own bonds, formal charges and aromatic flags"},
        "warnings": warnings,
        "n_skipped": len(skipped),
        "skipped": [s.as_dict() for s in skipped],
        "file": str(args.file),
        "novelty_reference": ref_name,
    }
    print("EDM metrics (bonds inferred from distances, as for generated structures):")
    for key in ("atom_stability", "mol_stability", "validity", "uniqueness", "novelty"):
        value = result[key]
        print(f"  {key:15s} {'n/a' if value is None else f'{100 * value:.2f} %'}")
    if file_bonds is not None:
        print("by the file's own bonds, charges and aromaticity (RDKit):")
        for key in ("atom_stability", "mol_stability", "validity"):
            print(f"  {key:15s} {100 * getattr(file_bonds, key):.2f} %")
    print(f"{'n':17s} {result['n']}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(skipped_summary(skipped, len(mols), "molecules"), file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_train(parser: argparse.ArgumentParser, modality: str) -> None:
    from molgen.molecules.train import build_parser

    build_parser(parser)


def run_train(args: argparse.Namespace) -> int:
    from molgen.molecules.train import train

    args.prog = "molgen"
    train(args)
    return 0
