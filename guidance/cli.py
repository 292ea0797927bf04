"""``molgen guide MODALITY``: reward-guided sampling from the command line (argparse hooks for molgen.cli).

    molgen guide rna --reward rna_mfe --method svdd --candidates 4 --steps 16 --n 32 --out g.fasta --json s.json
    molgen guide molecules --reward qed --method fk --particles 4 --steps 10 --n 16 --out g.sdf
    molgen guide dna --reward jaspar:MA0099.3 --condition enhancer --method svdd --value runs/v.pt --out g.fasta
    molgen guide backbones --reward rg --method dps --length 64 --steps 20 --out guided/
    molgen guide molecules --reward qed --method svdd --candidates 2 --value completions:1:1 --out g.sdf

``--candidates`` is SVDD's M and best-of-N's N per output; ``--particles`` is FK's population per output;
``--value`` chooses how SVDD (and FK's intermediate rewards) value a noisy state: ``denoised`` (default, the
reward of the denoised estimate), ``completions:K[:STEPS[:ALPHA]]`` (K sampled completions of STEPS transitions
each, mean reward, or the soft value at ALPHA > 0; their model calls are counted) or a value-net checkpoint
from ``python -m molgen.guidance.train_value`` (SVDD-MC, svdd only). The summary JSON
holds reward_mean / reward_median / reward_top10, model_calls (every particle and candidate counted),
reward_calls, seconds, the reward's failure counts and the modality's naturalness (molecules: validity and
stability; sequences: NLL in bits per token under the model and 3-mer r; backbones: CA-CA validity).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from molgen.guidance.tasks import METHODS as TASK_METHODS

METHODS = tuple(m for m in TASK_METHODS if m != "svdd_mc")  # svdd with a value net is SVDD-MC (--value)


def add_guide(parser: argparse.ArgumentParser, modality: str) -> None:
    from molgen.guidance.fk import POTENTIALS

    parser.add_argument("--reward", required=True, help="NAME[:ARGS], e.g. qed, rna_mfe, jaspar:MA0099.3, qed+0.5*sa")
    parser.add_argument("--method", choices=METHODS, default="svdd")
    parser.add_argument("--candidates", type=int, default=4, help="SVDD's M / best-of-N's N")
    parser.add_argument("--particles", type=int, default=4, help="FK population per output")
    parser.add_argument("--alpha", type=float, default=0.0, help="SVDD temperature (0 = argmax)")
    parser.add_argument("--value", default=None,
                        help="value of a noisy state: denoised (default), completions:K[:STEPS[:ALPHA]] (svdd, fk) "
                             "or a value net checkpoint (SVDD-MC, python -m molgen.guidance.train_value)")
    parser.add_argument("--branch-below", dest="branch_below", type=float, default=None,
                        help="SVDD: branch into M children only at times t <= this (one child above it)")
    parser.add_argument("--lam", type=float, default=10.0, help="FK tilt strength lambda")
    parser.add_argument("--potential", default="difference", choices=POTENTIALS)
    parser.add_argument("--scale", type=float, default=1.0, help="DPS guidance scale")
    parser.add_argument("--preset", default="guided", help="the modality's sampler preset (molgen.modalities)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the preset's)")
    parser.add_argument("--n", type=int, default=16, help="number of outputs")
    parser.add_argument("--length", type=int, default=None, help="sequence / backbone length")
    parser.add_argument("--condition", default=None, help="sequence class label (e.g. enhancer)")
    parser.add_argument("--solver", default=None, help="stochastic sampler (default: the modality's)")
    parser.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-failed", dest="max_failed", type=float, default=0.5,
                        help="stop when more than this share of reward calls fail (exceptions, NaN); 1 never stops")
    parser.add_argument("--out", required=True, help="output file (FASTA, SDF/XYZ) or folder (backbones)")
    parser.add_argument("--json", default=None, help="write the summary JSON here")


def _check(args: argparse.Namespace) -> None:
    for name in ("candidates", "particles", "steps", "n"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (args.alpha >= 0 and not math.isnan(args.alpha)):
        raise ValueError(f"--alpha must be >= 0, got {args.alpha}")
    if not math.isfinite(args.lam) or not math.isfinite(args.scale):
        raise ValueError(f"--lam and --scale must be finite, got {args.lam} and {args.scale}")
    if args.branch_below is not None and not (args.method == "svdd" and 0.0 <= args.branch_below <= 1.0):
        raise ValueError(f"--branch-below is a time in [0, 1] for --method svdd, got {args.branch_below} "
                         f"with --method {args.method}")
    if args.value is not None and args.value.startswith("completions"):
        if args.method not in ("svdd", "fk"):
            raise ValueError(f"--value {args.value} steers svdd or fk, not --method {args.method}")
    elif args.value not in (None, "denoised") and args.method != "svdd":
        raise ValueError("--value NET.pt is SVDD-MC's value net; it needs --method svdd")


def run_guide(args: argparse.Namespace) -> int:
    from molgen.guidance.completions import parse_value
    from molgen.guidance.rewards import check_modality, parse_reward, resolve_length
    from molgen.guidance.tasks import get_problem, guide

    _check(args)
    # a malformed value spec, reward name or argument fails here, before any model is loaded
    completions = parse_value(args.value) if args.value and args.value.startswith("completions") else None
    reward = parse_reward(args.reward)  # bad names / arguments fail before any model is loaded
    check_modality(args.reward, args.modality)
    length = resolve_length(reward, args.length)  # rna_target's length when none is given; a mismatch fails here
    problem = get_problem(args.modality, preset=args.preset, steps=args.steps, checkpoint=args.checkpoint,
                          length=length, condition=args.condition, solver=args.solver)
    value, net = completions, False
    if completions is None and args.value not in (None, "denoised"):
        from molgen.guidance.train_value import load_value

        (value, _), net = load_value(args.value, problem, args.reward), True
    method = {"svdd": "svdd_mc" if net else "svdd"}.get(args.method, args.method)
    res = guide(problem, method, reward, args.n, candidates=args.candidates, particles=args.particles,
                alpha=args.alpha, lam=args.lam, potential=args.potential, dps_scale=args.scale, value=value,
                branch_below=args.branch_below, seed=args.seed, max_failed=args.max_failed)
    problem.write(args.out, res)
    summary = {**res.summary(), "method": method, "reward": args.reward, "value": args.value or "denoised",
               **problem.natural(res),
               "reward_stats": reward.stats.as_dict(), "sampler": problem.settings,
               "model_checkpoint": str(problem.checkpoint),
               "model_sha256": problem.sha256}
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return 0
