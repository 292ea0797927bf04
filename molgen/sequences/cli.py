"""``molgen train|sample|evaluate rna|dna`` hooks (the same module serves both modalities)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from molgen.batching import batch_size_arg
from molgen.sequences.io import write_fasta

MAX_LENGTH = {"rna": 128, "dna": 200}
DATA_NOTE = {
    "rna": "Rfam 14.2 seed sequences (rna/rfam14.2_seed_sequences.fasta.gz), <= 128 nt, A/C/G/U only; "
    "5% held out by a hash of the record name",
    "dna": "iEnhancer-2L layer 1 (dna/iEnhancer_layer1_{enhancer,non}.cv.txt) 200 bp, labels enhancer / "
    "non-enhancer; held-out = the independent set minus sequences also in the cv set",
}


# --------------------------------------------------------------------------------------------- train
def add_train(parser: argparse.ArgumentParser, modality: str) -> None:
    if modality == "sequences":
        parser.add_argument("--fasta", required=True, help="training sequences (FASTA or one per line, gzip or not)")
        parser.add_argument("--alphabet", default=None,
                            help="the letters (e.g. ACDEFGHIKLMNPQRSTVWY), or dna / rna / protein; default: "
                            "inferred from the file")
        parser.add_argument("--max-length", type=int, default=None, help="longest sequence (default: the file's)")
    else:
        parser.add_argument(
            "--data", default=None, help="data path holding rna/ and dna/ (default ../shared/data)"
        )
    parser.add_argument(
        "--out", default=None, help=f"run folder, resumed from its last.ckpt (default runs/sequences/{modality}, "
        "--design: runs/sequences/rna_design)"
    )
    parser.add_argument("--export", default=None, help="checkpoint path (default data/sequences/..., sequences: "
                        "OUT/model.pt)")
    parser.add_argument(
        "--max-minutes", type=float, default=30.0, help="training time budget over all resumes"
    )
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--lr-decay-steps", type=int, default=0, help="cosine decay of the lr to lr/10 at this step (0: constant)"
    )
    parser.add_argument("--d-model", type=int, default=None, help="default 96")
    parser.add_argument("--layers", type=int, default=None, help="attention layers after the convs (1; --design: 2)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=None, help="default 192")
    parser.add_argument("--conv-dilations", default="1,2,4,8", help="dilated conv blocks before attention")
    parser.add_argument("--schedule", default="loglinear", choices=["loglinear", "cosine"])
    parser.add_argument("--unconditional", action="store_true", help="DNA: ignore the enhancer labels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--val-every", type=int, default=500)
    if modality == "rna":
        parser.add_argument("--design", action="store_true",
                            help="train the structure-conditioned design model p(sequence | dot-bracket)")
        parser.add_argument("--synthetic", type=int, default=40_000,
                            help="--design: synthetic sequence/MFE-structure pairs folded by ViennaRNA")
        parser.add_argument("--init", default=None,
                            help="--design: start a new run from a design checkpoint's weights (e.g. the shipped one)")
    parser.add_argument("--seed", type=int, default=0)


SIZES = {"plain": {"d_model": 96, "layers": 1, "d_ff": 192}, "design": {"d_model": 96, "layers": 2, "d_ff": 192}}


def run_train(args: argparse.Namespace) -> int:
    design = getattr(args, "design", False)
    for key, value in SIZES["design" if design else "plain"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or f"runs/sequences/{args.modality}{'_design' if design else ''}"
    if design:
        from molgen.sequences.design_training import run_train_design

        return run_train_design(args)
    return run_train_plain(args)


def run_train_plain(args: argparse.Namespace) -> int:
    from molgen.checkpoints import hardware, save_checkpoint
    from molgen.sequences.alphabets import alphabet_card
    from molgen.sequences.data import HOLDOUT, LengthDistribution
    from molgen.sequences.model import DenoiserConfig, n_parameters
    from molgen.sequences.pretrained import default_checkpoint, load_pretrained
    from molgen.sequences.training import (
        NELBO_TIMES,
        MaskedDiffusionModule,
        fit,
        heldout_bits_per_token,
        loaders,
        train_command,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    modality = args.modality
    train, test = training_sets(args)
    alphabet = train.alphabet
    max_len = MAX_LENGTH.get(modality) or args.max_length or max(train.lengths + test.lengths)
    args.batch_size = min(args.batch_size, len(train))
    conditional = train.labels is not None and not args.unconditional
    labels = (torch.tensor(train.labels), torch.tensor(test.labels)) if conditional else (None, None)
    cfg = DenoiserConfig(
        n_tokens=alphabet.size,
        vocab_size=alphabet.vocab_size,
        pad_id=alphabet.pad_id,
        max_length=max_len,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        d_ff=args.d_ff,
        n_classes=len(train.label_names) if conditional else 0,
        conv_dilations=tuple(int(d) for d in args.conv_dilations.split(",") if d),
    )
    module = MaskedDiffusionModule(
        cfg.to_dict(), alphabet.mask_id, args.schedule, lr=args.lr, decay_steps=args.lr_decay_steps
    )
    print(
        f"{modality}: {len(train)} train / {len(test)} held-out sequences; "
        f"{n_parameters(module.net)} parameters",
        flush=True,
    )
    train_dl, val_dl = loaders(
        train.tokens(max_len), labels[0], test.tokens(max_len), labels[1], args.batch_size, args.seed
    )
    stats = fit(module, train_dl, val_dl, Path(args.out), args.max_minutes, args.max_steps, args.val_every)

    export = Path(args.export) if args.export else (
        Path(args.out) / "model.pt" if modality == "sequences" else default_checkpoint(modality))
    config = {
        "modality": modality,
        "alphabet": alphabet_card(alphabet),
        "denoiser": cfg.to_dict(),
        "schedule": args.schedule,
        "length_distribution": LengthDistribution.from_lengths(train.lengths).to_dict(),
        "label_names": list(train.label_names) if conditional else [],
        "p_uncond": 0.1,
    }
    provenance = {
        "command": train_command(modality),
        "data": DATA_NOTE.get(modality) or f"{args.fasta} ({len(train) + len(test)} sequences over "
        f"{alphabet.letters!r}; {HOLDOUT:.0%} held out by a hash of the record name)",
        "n_train": len(train),
        "n_heldout": len(test),
        "hardware": hardware(),
        "threads": args.threads,
        "parameters": n_parameters(module.net),
        **stats,
    }
    x0 = test.tokens(max_len)
    cond = {"labels": torch.tensor(test.labels)} if conditional else {}
    # The EMA weights are shipped. The raw weights' NELBO can be a little lower, but under a constant lr their
    # output biases drift step to step: the RNA model's raw weights at step 3,400 sampled 3-mers at r = 0.73
    # against 0.95 for its EMA (512 sequences), from a marginal that is off by 2-3 points per letter.
    bits = {
        name: heldout_bits_per_token(net.eval(), module.process, x0, cond)
        for name, net in (("ema", module.ema), ("raw", module.net))
    }
    provenance["weights"] = f"EMA (molgen.ema: decay {module.hparams.ema_decay} after warm-up)"
    provenance["metrics"] = {
        "heldout_bits_per_token": round(bits["ema"], 4),
        "heldout_nelbo_n_t": NELBO_TIMES,
        "heldout_bits_per_token_ema_vs_raw": {k: round(v, 4) for k, v in bits.items()},
    }
    weights = module.ema.state_dict()
    save_checkpoint(export, weights, config, provenance=provenance)
    load_pretrained(export)  # the shipped file loads
    print(json.dumps({"export": str(export), **provenance}, indent=1), flush=True)
    return 0


def training_sets(args: argparse.Namespace) -> tuple[Any, Any]:
    """Train and held-out ``SequenceSet``s: the modality's corpus, or (``sequences``) the user's FASTA, with one
    record held out when the hash split (``HOLDOUT``) holds none."""
    from molgen.sequences.alphabets import custom_alphabet
    from molgen.sequences.data import HOLDOUT, SequenceSet, holdout, load_dataset, load_fasta, resolve_data_root

    if args.modality != "sequences":
        root = resolve_data_root(args.data)
        return load_dataset(args.modality, root, "train"), load_dataset(args.modality, root, "test")
    alphabet = custom_alphabet(args.alphabet) if args.alphabet else None
    every = load_fasta(args.fasta, alphabet, max_length=args.max_length)
    if len(every) < 2:
        raise ValueError(f"{args.fasta}: a prior needs at least 2 sequences, got {len(every)}")
    test = [r for r in every.records if holdout(r.name, HOLDOUT)] or every.records[-1:]
    held = {id(r) for r in test}
    train = [r for r in every.records if id(r) not in held]
    return SequenceSet(every.alphabet, train), SequenceSet(every.alphabet, test)


# --------------------------------------------------------------------------------------------- sample
def add_sample(parser: argparse.ArgumentParser, modality: str) -> None:
    from molgen.diffusion.discrete import DISCRETE_SAMPLERS
    from molgen.modalities import get_modality

    presets = get_modality(modality).presets
    parser.add_argument("--n", type=int, default=16, help="number of sequences")
    parser.add_argument("--length", type=int, default=None, help="fixed length (default: data length law)")
    parser.add_argument("--preset", default="default", choices=sorted(presets),
                        help="; ".join(f"{k}: {p.solver}, {p.steps} steps" for k, p in presets.items()))
    parser.add_argument("--solver", default=None, choices=sorted(DISCRETE_SAMPLERS), help="default: the preset's")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (model calls at most)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output FASTA")
    parser.add_argument("--condition", default=None, help="label, e.g. enhancer / non-enhancer (DNA model)")
    parser.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance weight w")
    parser.add_argument("--eta", type=float, default=0.02, help="ReMDM remasking strength")
    parser.add_argument("--plan", type=Path, default=None,
                        help=f"a sampling plan from `molgen tune {modality}` (replaces solver, steps and grid)")
    add_checkpoint(parser, modality)
    parser.add_argument("--batch-size", type=batch_size_arg, default=256,
                        help="sequences per model call, or auto: the largest that fits the device")
    parser.add_argument("--device", default="cpu")


def add_checkpoint(parser: argparse.ArgumentParser, modality: str) -> None:
    if modality == "sequences":
        parser.add_argument("--checkpoint", required=True, help="a model of `molgen train sequences`")
    else:
        parser.add_argument("--checkpoint", default=None, help=f"default data/sequences/{modality}_default.pt")


def run_sample(args: argparse.Namespace) -> int:
    from molgen.diffusion.tune import MaskedPlan
    from molgen.modalities import get_modality
    from molgen.modalities.base import write_sampling_record
    from molgen.sequences.sampling import generate

    mod = get_modality(args.modality)
    plan = MaskedPlan.load(args.plan) if args.plan else None
    preset = mod.preset(args.preset, plan.solver if plan else args.solver, plan.nfe if plan else args.steps)
    pre = mod.load(args.checkpoint, args.device)
    if plan:
        plan.check(pre.model, pre.process)
    start = time.perf_counter()
    records = generate(
        pre,
        args.n,
        preset.solver,
        preset.steps,
        args.seed,
        length=args.length,
        condition=args.condition,
        guidance_scale=args.guidance_scale,
        options={**preset.options, "eta": args.eta},
        batch_size=args.batch_size,
        device=args.device,
        grid=plan.kwargs["grid"] if plan else "time_uniform",
    )
    write_fasta(args.out, records)
    write_sampling_record(args.out, preset, eta=args.eta, n=len(records), seed=args.seed, length=args.length,
                          condition=args.condition, guidance_scale=args.guidance_scale,
                          checkpoint=args.checkpoint or "shipped", plan=plan and plan.record())
    wall = time.perf_counter() - start
    print(f"wrote {len(records)} sequences to {args.out} ({preset.solver}, {preset.steps} steps, {wall:.1f} s)")
    return 0


def add_tune(parser: argparse.ArgumentParser, modality: str) -> None:
    parser.add_argument("--nfe", type=int, required=True, help="model calls of the plan")
    parser.add_argument("--out", type=Path, required=True, help=f"the plan file (JSON), for `molgen sample {modality} "
                        "--plan`")
    add_checkpoint(parser, modality)
    parser.add_argument("--solver", default="cached_ancestral", help="the masked sampler whose grid is fitted")
    parser.add_argument("--length", type=int, default=None, help="fixed length (default: data length law)")
    parser.add_argument("--batch", type=int, default=128, help="prior draws (half fitted on, half scoring)")
    parser.add_argument("--seconds", type=float, default=120.0, help="tuning budget")
    parser.add_argument("--seed", type=int, default=0)


def run_tune(args: argparse.Namespace) -> int:
    from molgen.diffusion.tune import tune_masked
    from molgen.modalities import get_modality

    pre = get_modality(args.modality).load(args.checkpoint, "cpu")
    lengths = (torch.full((args.batch,), args.length) if args.length is not None
               else pre.lengths.sample(args.batch, torch.Generator().manual_seed(args.seed)))
    x_T = pre.process.prior(lengths, int(lengths.max()))
    plan = tune_masked(pre.model, pre.process, x_T, nfe=args.nfe, solver=args.solver, budget_s=args.seconds,
                       seed=args.seed, progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote {plan.save(args.out)}: {plan.summary()}")
    return 0


# --------------------------------------------------------------------------------------------- evaluate
def add_evaluate(parser: argparse.ArgumentParser, modality: str) -> None:
    parser.add_argument("file", help="FASTA or plain sequences to evaluate")
    reference = {"required": True} if modality == "sequences" else {"default": modality}
    parser.add_argument("--reference", **reference, help="rna, dna or a FASTA of natural sequences")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--no-nll", action="store_true", help="skip the model NLL of the samples")


def run_evaluate(args: argparse.Namespace) -> int:
    from molgen.errors import Skipped, skipped_summary
    from molgen.sequences.evaluate import evaluate_fasta

    torch.set_num_threads(1)
    result = evaluate_fasta(args.file, args.reference, nll=not args.no_nll)
    skipped = [Skipped(**s) for s in result["skipped"]]
    print(skipped_summary(skipped, result["n"], "sequences"), file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


# --------------------------------------------------------------------------------------------- design
def add_design(parser: argparse.ArgumentParser, modality: str) -> None:
    from molgen.sequences.design import DEFAULT_METHOD, METHODS, Budget

    parser.add_argument("--target", required=True,
                        help="dot-bracket structure, or a file of them (>name lines, then one structure each)")
    parser.add_argument("--n", type=int, default=1, help="designs per target (solved ones end a target early)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=None,
                        help=f"wall-clock budget per target (default {Budget.seconds:g})")
    budget.add_argument("--calls", type=int, default=None, help="model-call budget per target (sequences evaluated)")
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    parser.add_argument("--plain-tokens", action="store_true", help="draw letters one by one, not as base pairs")
    parser.add_argument("--checkpoint", default=None, help="default data/sequences/rna_design.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="FASTA of the designs")
    parser.add_argument("--json", default=None, help="per-target summary JSON")


def run_design(args: argparse.Namespace) -> int:
    from molgen.errors import InputError
    from molgen.sequences.design import Budget, design_rna, load_design_model, read_targets
    from molgen.sequences.io import Record

    torch.set_num_threads(1)
    targets = read_targets(args.target)
    budget = Budget(args.seconds, args.calls) if args.seconds or args.calls else Budget()
    if len(targets) == 1 and isinstance(targets[0], InputError):
        raise targets[0]
    model = None if args.method == "inverse_fold" else load_design_model(args.checkpoint)
    summaries, records = [], []
    for target in targets:
        if isinstance(target, InputError):
            print(f"skipped: {target}", file=sys.stderr)
            summaries.append({"name": target.record, "error": str(target)})
            continue
        try:
            result = design_rna(target, args.n, budget, args.method, model, args.seed, pair_aware=not args.plain_tokens)
        except InputError as err:
            print(f"skipped: {err}", file=sys.stderr)
            summaries.append({"name": target.name, "error": str(err)})
            continue
        summary = result.summary()
        summaries.append(summary)
        for proof in result.undesignable:
            helix = (f"the isolated pair {proof.i + 1}-{proof.j + 1}" if proof.pairs == 1 else
                     f"the helix of {proof.pairs} pairs from {proof.i + 1}-{proof.j + 1}")
            print(f"{target.name}: undesignable: {helix} is in no sequence's MFE structure (every sequence folds "
                  f"at least {proof.gap:g} kcal/mol lower without it)", file=sys.stderr)
        records += [Record(f"{target.name}_{k} bp_distance={d.bp_distance} p_target={d.target_probability:.3g} "
                           f"ensemble_defect={d.ensemble_defect:.3g}", d.sequence)
                    for k, d in enumerate(result.designs)]
        print(f"{target.name}: {'solved' if result.solved else 'not solved'} (best bp distance "
              f"{summary['bp_distance']['best']}, {summary['seconds']:.1f} s, {result.model_calls} model calls)")
    write_fasta(args.out, records)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"method": args.method, "targets": summaries}, indent=2) + "\n")
    return 0
