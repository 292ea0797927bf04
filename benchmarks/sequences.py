"""Few-step masked-diffusion samplers on the shipped RNA / DNA models.

For each sampler and step count: k-mer (3, 6) Pearson r against the shipped held-out reference, the ratio of
3-mer r to the same model's 256-step ancestral sampler (target >= 0.97 at 16 and 32 model calls: reported for the best
sampler at each budget and for every sampler), model NLL of
the samples (bits per nt), RNA MFE per nt / DNA JASPAR motif-hit r, model calls and wall clock per sequence;
and the cached ancestral sampler's speed-up over plain ancestral at the same steps, measured in the same run.

    python benchmarks/sequences.py --json runs/sequences/bench.json [--modality rna dna] [--n 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from molgen.diffusion.discrete import DiscreteSampler
from molgen.sequences.evaluate import compare, load_reference, sequence_stats
from molgen.sequences.pretrained import default_checkpoint, load_pretrained
from molgen.sequences.training import heldout_bits_per_token

FEW = ("ancestral", "cached_ancestral", "tau_leaping", "first_hitting", "remdm")


def run_one(pre, solver: str, steps: int, lengths: torch.Tensor, cond: dict, seed: int, ref: dict) -> dict:
    """Sample with one configuration and score the samples."""
    x_T = pre.process.prior(lengths, int(lengths.max()))
    sampler = DiscreteSampler(pre.model, pre.process, solver, steps, options={"eta": 0.02})
    start = time.perf_counter()
    with torch.no_grad():
        st = sampler.run(x_T, cond, torch.Generator().manual_seed(seed))
    wall = time.perf_counter() - start
    seqs = [pre.alphabet.decode(row) for row in st.x]
    modality = ref["modality"]
    scores = compare(sequence_stats(seqs, modality), ref)
    bits = heldout_bits_per_token(pre.model, pre.process, st.x, cond, n_t=4)
    keep = ("kmer3_r", "kmer6_r", "mfe_per_nt_mean", "bp_fraction_mean", "motif_hit_r")
    return {
        "solver": solver,
        "steps": steps,
        "model_calls": st.nfe,
        "rows_evaluated_per_seq": st.rows_evaluated / len(seqs),
        "wall_s_per_seq": wall / len(seqs),
        "nll_bits_per_nt": bits,
        **{k: scores[k] for k in keep if k in scores},
    }


def bench_modality(modality: str, n: int, few_steps: list[int], ref_steps: int, seed: int) -> dict:
    pre = load_pretrained(default_checkpoint(modality))
    ref = load_reference(modality)
    lengths = pre.lengths.sample(n, torch.Generator().manual_seed(seed))
    cond = {}
    if pre.label_names:  # DNA: half enhancer, half non-enhancer, like the natural reference
        cond = {"labels": torch.arange(n) % len(pre.label_names)}
    rows = [run_one(pre, s, ref_steps, lengths, cond, seed, ref) for s in ("ancestral", "cached_ancestral")]
    base = rows[0]["kmer3_r"]
    for steps in few_steps:
        rows += [run_one(pre, s, steps, lengths, cond, seed, ref) for s in FEW]
    for r in rows:
        r["kmer3_r_ratio_vs_ref"] = r["kmer3_r"] / base
        print(json.dumps({"modality": modality, **r}), flush=True)
    speedup = {}
    for steps in [ref_steps, *few_steps]:
        plain = next(r for r in rows if r["solver"] == "ancestral" and r["steps"] == steps)
        cached = next(r for r in rows if r["solver"] == "cached_ancestral" and r["steps"] == steps)
        speedup[str(steps)] = plain["wall_s_per_seq"] / cached["wall_s_per_seq"]
    heldout = {k: ref.get("natural_baseline", {}).get(k) for k in ("kmer3_r", "kmer6_r")}
    return {
        "checkpoint": str(default_checkpoint(modality)),
        "n": n,
        "mean_length": float(lengths.float().mean()),
        "reference_steps": ref_steps,
        "rows": rows,
        "cached_speedup": speedup,
        "natural_train_vs_heldout": heldout,
        "few_step_best": {str(s): best_at(rows, s) for s in few_steps},
        "few_step_ratio_ok_every_sampler": {
            str(s): all(r["kmer3_r_ratio_vs_ref"] >= 0.97 for r in rows if r["steps"] == s) for s in few_steps
        },
    }


def best_at(rows: list[dict], steps: int) -> dict:
    """The sampler with the highest 3-mer ratio at ``steps`` model calls, and whether it reaches 0.97."""
    best = max((r for r in rows if r["steps"] == steps), key=lambda r: r["kmer3_r_ratio_vs_ref"])
    return {"solver": best["solver"], "kmer3_r_ratio_vs_ref": best["kmer3_r_ratio_vs_ref"],
            "ok": best["kmer3_r_ratio_vs_ref"] >= 0.97}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--modality", nargs="+", default=["rna", "dna"], choices=["rna", "dna"])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--ref-steps", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {
        "hardware": f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s)",
        "command": "python benchmarks/sequences.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    for modality in args.modality:
        out[modality] = bench_modality(modality, args.n, args.steps, args.ref_steps, args.seed)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(out, indent=2, default=lambda v: float(v) if isinstance(v, np.floating) else v)
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
