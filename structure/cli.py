"""``molgen sample|evaluate|train backbones`` hooks (discovered by ``molgen.cli``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from molgen.batching import batch_size_arg
from molgen.structure.sampling import DEFAULT_CHECKPOINT, SS_CHECKPOINT


def add_train(parser: argparse.ArgumentParser, modality: str) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/structure/egnn"), help="run folder (resumes)")
    parser.add_argument("--export", type=Path, default=DEFAULT_CHECKPOINT, help="EMA weights + card (.pt)")
    parser.add_argument("--data-path", type=Path, default=None, help="shared data root (default ../shared/data)")
    parser.add_argument("--max-steps", type=int, default=4000, help="total optimiser steps over all resumes")
    parser.add_argument("--max-minutes", type=float, default=80.0, help="wall-clock limit of this invocation")
    parser.add_argument("--max-length", type=int, default=128, help="longest training crop")
    parser.add_argument("--edge-budget", type=int, default=40_000, help="batch size ~ budget / length^2")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--decay-steps", type=int, default=0,
                        help="cosine cool-down of the learning rate to lr/10 over this many steps (0 = constant)")
    parser.add_argument("--decay-start", type=int, default=0, help="step at which the cool-down begins")
    parser.add_argument("--every", type=int, default=100, help="checkpoint and export every N steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu, gpu, auto)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision (32-true, bf16-mixed, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="new run: start from these exported weights")
    parser.add_argument("--fine-rbf", type=int, default=25, help="new run: narrow 2-8 A radial features (0 = off)")
    parser.add_argument("--local-coord", type=int, default=3, help="new run: neighbour coordinate head (0 = off)")
    parser.add_argument("--bond-feature", action="store_true",
                        help="new run: CA-CA bond deviation in noise units as a message feature")
    parser.add_argument("--ss-condition", action="store_true",
                        help="new run: secondary-structure conditioning (per-residue labels and composition)")
    parser.add_argument("--pair-dim", type=int, default=0,
                        help="new run: width of the pair track with triangle updates (0 = off)")
    parser.add_argument("--pair-blocks", type=int, default=2, help="new run: (outgoing, incoming) triangle pairs")
    parser.add_argument("--self-condition", action="store_true",
                        help="new run: self-conditioning on the previous denoised estimate (half the batches)")
    parser.add_argument("--scop", action=argparse.BooleanOptionalAction, default=True,
                        help="train on the SCOPe 40 %% CA traces too (default: yes)")
    parser.add_argument("--held-out", type=float, default=0.05,
                        help="fraction of chains held out by sequence cluster (listed in OUT/held_out.txt)")
    parser.add_argument("--p-mean", type=float, default=-1.2, help="ln sigma ~ N(ln sigma_data + p_mean, p_std^2)")
    parser.add_argument("--p-std", type=float, default=1.5)
    parser.add_argument("--contact-weight", type=float, default=0.0,
                        help="weight of the low-noise loss on non-local CA distances under 8 A (again on resume)")


def train_config(args: argparse.Namespace) -> dict:
    """Model config of a new run: the ``--init`` checkpoint's (or the defaults) with the extension options."""
    from molgen.structure.model import ModelConfig

    base = ModelConfig().to_dict()
    if args.init is not None:
        from molgen.checkpoints import load_checkpoint

        base.update({k: v for k, v in load_checkpoint(args.init)[1]["config"].items() if k in base})
    return {**base, "fine_rbf": args.fine_rbf, "local_coord": args.local_coord, "bond_feature": args.bond_feature,
            "ss_condition": args.ss_condition, "pair_dim": args.pair_dim, "pair_blocks": args.pair_blocks,
            "self_condition": args.self_condition}


def run_train(args: argparse.Namespace) -> int:
    import torch

    from molgen.structure.data import default_sources
    from molgen.structure.training import train

    torch.set_num_threads(args.threads)
    path = train(
        args.out,
        args.export,
        default_sources(args.data_path, scop=args.scop),
        args.max_steps,
        args.max_minutes,
        seed=args.seed,
        lr=args.lr,
        decay=(args.decay_start, args.decay_steps),
        max_length=args.max_length,
        edge_budget=args.edge_budget,
        every=args.every,
        init=args.init,
        config=train_config(args),
        p_mean=args.p_mean,
        p_std=args.p_std,
        held_out=args.held_out,
        accelerator=args.accelerator,
        precision=args.precision,
        contact_weight=args.contact_weight,
    )
    print(f"exported EMA weights to {path}")
    return 0


def add_sample(parser: argparse.ArgumentParser, modality: str) -> None:
    from molgen.modalities import get_modality

    presets = get_modality(modality).presets
    parser.add_argument("--n", type=int, default=8, help="number of backbones")
    parser.add_argument("--length", type=int, default=100, help="residues per backbone (model range 40-256)")
    parser.add_argument("--preset", default="default", choices=sorted(presets),
                        help="; ".join(f"{k}: {p.solver}, {p.steps} steps" for k, p in presets.items()))
    parser.add_argument("--solver", default=None, help="engine solver (any ODE solver, or af3); default: the preset's")
    parser.add_argument("--steps", type=int, default=None, help="grid points = model calls of multistep solvers")
    parser.add_argument("--grid", default=None, help="time grid (karras, logsnr, time_uniform, ...)")
    parser.add_argument("--sigma-last", type=float, default=None, help="noise level (A) of the last model call")
    parser.add_argument("--rho", type=float, default=None, help="Karras grid exponent")
    parser.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                        help="start at 5 A from the chain-shaped Gaussian prior")
    parser.add_argument(
        "--ideal-bonds", action="store_true", help="project CA traces onto CA-CA = 3.80 A (SHAKE) before writing"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--format", choices=("pdb", "cif"), default="pdb")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"model weights (default {DEFAULT_CHECKPOINT.name}, or {SS_CHECKPOINT.name} with --ss)")
    parser.add_argument("--batch-size", type=batch_size_arg, default=16,
                        help="backbones per model call, or auto: the largest that fits the device")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--motif-pdb", type=Path, default=None, help="PDB/mmCIF with the motif residues")
    parser.add_argument("--contig", default=None, help="motif scaffolding spec, e.g. A10-25,40-60,A40-52")
    for name, value in (("gamma-0", 0.8), ("gamma-min", 1.0), ("noise-scale", 1.003)):
        parser.add_argument(f"--{name}", type=float, default=None, help=f"af3 option (default {value})")
    parser.add_argument("--step-scale", type=float, default=None,
                        help="AF3's step scale eta, for af3 and every ODE solver (default 1.5; 1 = plain ODE)")
    parser.add_argument("--plan", type=Path, default=None,
                        help="a sampling plan from `molgen tune backbones` (replaces solver, steps, grid, step scale)")
    parser.add_argument("--ss", default=None,
                        help="secondary structure to ask for (needs an --ss-condition model): 'natural' (a "
                             "natural arrangement drawn per chain), a composition such as E:0.4,H:0.2 (the rest "
                             "coil) or a per-residue H/E/C string of --length letters")
    parser.add_argument("--ss-guidance", type=float, default=1.0,
                        help="classifier-free guidance weight of --ss (1: conditional model; >1 costs 2 calls/step)")


def sample_preset(args: argparse.Namespace):
    """The preset of ``--preset`` with the command line's solver, steps and grid options where given."""
    import dataclasses

    from molgen.modalities import get_modality

    preset = get_modality("backbones").preset(args.preset, args.solver, args.steps)
    given = {"grid": args.grid, "sigma_last": args.sigma_last, "rho": args.rho, "warm_start": args.warm_start,
             "step_scale": args.step_scale}
    return dataclasses.replace(preset, options={**preset.options, **{k: v for k, v in given.items() if v is not None}})


def _solver_options(args: argparse.Namespace, solver: str) -> dict | None:
    opts = {k: v for k in ("gamma_0", "gamma_min", "noise_scale") if (v := getattr(args, k)) is not None}
    if opts and solver != "af3":
        raise ValueError(f"--gamma-0/--gamma-min/--noise-scale apply to --solver af3, not {solver}")
    return opts or None


def run_sample(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from molgen.batching import largest_batch
    from molgen.diffusion.tune import TunedPlan
    from molgen.modalities.backbones import sampler_keywords
    from molgen.progress import progress
    from molgen.structure.io import backbone_from_ca, write_backbone
    from molgen.structure.sampling import default_step_scale, load_model, sample_ca, scaffold_from_file
    from molgen.structure.ss_prior import parse_ss

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if (args.motif_pdb is None) != (args.contig is None):
        raise ValueError("motif scaffolding needs both --motif-pdb and --contig")
    if args.contig and args.ideal_bonds:
        raise ValueError("--ideal-bonds is not applied to motif scaffolding (it would move the fixed motif)")
    preset = sample_preset(args)
    ss = parse_ss(args.ss) if args.ss else None
    if ss and args.contig:
        raise ValueError("--ss is not applied to motif scaffolding")
    keywords = sampler_keywords(preset)
    keywords.setdefault("step_scale", default_step_scale(preset.solver))
    opts = _solver_options(args, preset.solver)
    args.checkpoint = args.checkpoint or (SS_CHECKPOINT if ss else DEFAULT_CHECKPOINT)
    model = load_model(args.checkpoint).to(args.device)
    plan = TunedPlan.load(args.plan) if args.plan else None
    if plan and args.contig:
        raise ValueError("--plan is not applied to motif scaffolding (its replacement steps are the preset's)")
    t0 = time.time()
    if args.contig:
        bbs, res = scaffold_from_file(model, args.motif_pdb, args.contig, args.n, seed=args.seed,
                                      solver=preset.solver, steps=preset.steps, solver_options=opts, **keywords)
        extra = {
            "contig": args.contig,
            "motif_positions": res.motif_positions,
            "motif_rmsd": [round(float(v), 3) for v in res.motif_rmsd],
        }
    else:
        batch = args.batch_size
        if batch == "auto":
            batch = largest_batch(lambda b: model(torch.zeros(b, args.length, 3, device=args.device),
                                                  torch.full((b,), 0.5, device=args.device)), args.device)
        g = torch.Generator().manual_seed(args.seed)  # one stream over all batches
        bbs = []
        for start in progress(range(0, args.n, batch), "sampling batches"):
            k = min(batch, args.n - start)
            ca = sample_ca(model, k, args.length, preset.solver, preset.steps, generator=g, solver_options=opts,
                           ideal_bonds=args.ideal_bonds, plan=plan, ss=ss, ss_guidance=args.ss_guidance, **keywords)
            bbs += [backbone_from_ca(c.numpy(), name=f"sample_{start + j:04d}") for j, c in enumerate(ca)]
        extra = {}
    wall = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    for bb in bbs:
        write_backbone(bb, args.out / f"{bb.name}.{args.format}", args.format)
    meta = {
        "n": len(bbs),
        **preset.as_dict(),
        "seed": args.seed,
        "solver_options": opts,
        "step_scale": keywords["step_scale"],
        "ideal_bonds": args.ideal_bonds,
        "checkpoint": str(args.checkpoint),
        "seconds_per_backbone": wall / len(bbs),
        "plan": plan and plan.record(),
        "ss": ss and {"request": ss.describe(), "guidance": args.ss_guidance},
        **extra,
    }
    (args.out / "sampling.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))
    return 0


def add_tune(parser: argparse.ArgumentParser, modality: str) -> None:
    parser.add_argument("--nfe", type=int, required=True, help="model calls of the plan")
    parser.add_argument("--length", type=int, default=100, help="residues per backbone the plan is fitted for")
    parser.add_argument("--out", type=Path, required=True, help="the plan file (JSON), for `molgen sample --plan`")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--batch", type=int, default=32, help="noise draws (half fitted on, half scoring)")
    parser.add_argument("--seconds", type=float, default=120.0, help="tuning budget")
    parser.add_argument("--seed", type=int, default=0)


def run_tune(args: argparse.Namespace) -> int:
    import sys

    from molgen.structure.sampling import load_model, tune_plan

    plan = tune_plan(load_model(args.checkpoint), args.length, args.nfe, batch=args.batch, budget_s=args.seconds,
                     seed=args.seed, progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote {plan.save(args.out)} ({args.length} residues, distances in A): {plan.summary()}")
    return 0


def add_evaluate(parser: argparse.ArgumentParser, modality: str) -> None:
    parser.add_argument("folder", type=Path, help="folder of PDB/mmCIF backbones")
    parser.add_argument("--json", type=Path, default=None, help="write the metrics here")
    parser.add_argument(
        "--reference",
        type=Path,
        nargs="*",
        default=None,
        help="folders of reference chains for novelty (default: the training chains)",
    )
    parser.add_argument("--data-path", type=Path, default=None, help="shared data root (default ../shared/data)")
    parser.add_argument("--no-tm", action="store_true", help="skip TM-score diversity and novelty")
    parser.add_argument("--no-mpnn", action="store_true", help="skip the optional ProteinMPNN score")


def run_evaluate(args: argparse.Namespace) -> int:
    import json
    import sys

    from molgen.errors import InputError, skipped_summary
    from molgen.progress import progress
    from molgen.structure.data import default_sources
    from molgen.structure.io import list_structure_files, read_backbones
    from molgen.structure.metrics import evaluate

    files = list_structure_files(args.folder)
    if not files:
        raise InputError("no PDB/mmCIF files", str(args.folder))
    bbs, skipped = read_backbones(progress(files, "reading backbones"))
    if not bbs:
        raise InputError(f"no readable backbones in {len(files)} files; {skipped[0]}", str(args.folder))
    reference = None
    if not args.no_tm:
        folders = args.reference if args.reference is not None else default_sources(args.data_path)
        chains, skipped_reference = read_backbones([p for f in folders for p in list_structure_files(f)])
        reference = [bb.ca for bb in chains]
        skipped += [s for s in skipped_reference if s.record is None]  # unreadable reference files
    metrics = evaluate(bbs, reference, tm=not args.no_tm, mpnn=not args.no_mpnn)
    metrics["skipped"] = [s.as_dict() for s in skipped]
    print(skipped_summary(skipped, len(bbs), "backbones"), file=sys.stderr)
    text = json.dumps(metrics, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0
