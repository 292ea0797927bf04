"""``molgen guide MODALITY``: reward-guided sampling from the command line (argparse hooks for molgen.cli).

    molgen guide rna --reward rna_mfe --method svdd --candidates 4 --steps 16 --n 32 --out g.fasta --json s.json

``--candidates`` is SVDD's M and best-of-N's N per output; ``--particles`` is FK's population per output.
The summary JSON holds reward_mean / reward_median / reward_top10, model_calls (every particle and candidate
counted), reward_calls, seconds and the modality's naturalness (sequences: NELBO bits per token under the
model). RNA and DNA are wired; molecules and backbones need their modality decoders (raises a clear error).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

METHODS = ("svdd", "fk", "bon", "dps")


def add_guide(parser: argparse.ArgumentParser, modality: str) -> None:
    parser.add_argument("--reward", required=True, help="NAME[:ARGS], e.g. rna_mfe, rna_target:((((....))))")
    parser.add_argument("--method", choices=METHODS, default="svdd")
    parser.add_argument("--candidates", type=int, default=4, help="SVDD's M / best-of-N's N")
    parser.add_argument("--particles", type=int, default=4, help="FK population per output")
    parser.add_argument("--alpha", type=float, default=0.0, help="SVDD temperature (0 = argmax)")
    parser.add_argument("--lam", type=float, default=10.0, help="FK tilt strength lambda")
    parser.add_argument("--potential", default="difference", choices=("difference", "max", "sum"))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--n", type=int, default=16, help="number of outputs")
    parser.add_argument("--length", type=int, default=None, help="sequence length (default: from the data)")
    parser.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output file (FASTA for sequences)")
    parser.add_argument("--json", default=None, help="write the summary JSON here")


def _check(args: argparse.Namespace) -> None:
    for name in ("candidates", "particles", "steps", "n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (args.alpha >= 0 and not math.isnan(args.alpha)):
        raise ValueError(f"--alpha must be >= 0, got {args.alpha}")


def run_guide(args: argparse.Namespace) -> int:
    from guidance.rewards import parse_reward

    _check(args)
    reward = parse_reward(args.reward)  # bad names / arguments fail before any model is loaded
    if args.modality in ("rna", "dna"):
        summary = _guide_sequences(args, reward)
    else:
        raise ValueError(f"molgen guide {args.modality}: not wired yet (rna and dna are)")
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return 0


def _guide_sequences(args: argparse.Namespace, reward) -> dict:
    from guidance.baselines import best_of_n
    from guidance.fk import Tilt, fk_sample
    from guidance.svdd import svdd_sample
    from molgen.diffusion.discrete import DiscreteSampler
    from molgen.sequences.io import Record, write_fasta
    from molgen.sequences.pretrained import default_checkpoint, load_pretrained

    path = Path(args.checkpoint) if args.checkpoint else default_checkpoint(args.modality)
    if not path.exists():
        raise ValueError(f"no checkpoint at {path}; train one with `molgen train {args.modality}` or pass "
                         "--checkpoint")
    if args.method == "dps":
        raise ValueError("dps needs a differentiable reward on a continuous state; use svdd, fk or bon for sequences")
    pre = load_pretrained(path)
    g = torch.Generator().manual_seed(args.seed)
    smp = DiscreteSampler(pre.model, pre.process, "ancestral", steps=args.steps)
    per = {"svdd": 1, "fk": args.particles, "bon": args.candidates}[args.method]
    if args.length is not None:
        lengths = torch.full((args.n,), args.length, dtype=torch.long)
    else:
        lengths = pre.lengths.sample(args.n, g)
    x_T = pre.process.prior(lengths.repeat_interleave(per), int(lengths.max()))

    def decode(tokens: torch.Tensor) -> list[str]:
        return [pre.alphabet.decode(row) for row in tokens]

    with torch.no_grad():
        if args.method == "svdd":
            res = svdd_sample(smp, x_T, reward, candidates=args.candidates, alpha=args.alpha, decode=decode,
                              generator=g)
        elif args.method == "fk":
            res = fk_sample(smp, x_T, particles=per, tilt=Tilt(reward, lam=args.lam, potential=args.potential,
                                                               decode=decode), generator=g, final="best")
        else:
            res = best_of_n(smp, x_T, reward, candidates=per, decode=decode, generator=g)
        nelbo = pre.process.nelbo(pre.model, res.samples, n_t=4, generator=torch.Generator().manual_seed(0))
    seqs = decode(res.samples)
    write_fasta(args.out, [Record(f"guided_{i} reward={float(r):.4g}", s) for i, (s, r) in
                           enumerate(zip(seqs, res.rewards.tolist()))])
    n_tokens = pre.process.is_data(res.samples).sum(-1).clamp_min(1)
    return {**res.summary(), "method": args.method, "reward": args.reward,
            "nll_bits_per_token": float((nelbo / (n_tokens * math.log(2))).mean()),
            "reward_stats": reward.stats.as_dict()}
