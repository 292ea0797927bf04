"""Ehrlich functions (closed-form test functions for biological sequence design; Stanton et al. 2024, PyPI
``pytorch-holo``): molgen campaigns against holo's genetic algorithm at equal oracle calls.

An Ehrlich function over V states and length L is a discrete Markov process (DMP) whose banded transition matrix
makes some sequences infeasible (value -inf), and C spaced motifs of length K; the value of a feasible sequence
is the product over motifs of the (quantised) fraction of each motif present, so 1.0 is the optimum and most
feasible sequences score 0. The benchmark

1. draws ``--prior-size`` sequences from the function's feasible initial distribution (its DMP,
   ``Ehrlich.initial_solution``), writes them as FASTA over V letters and trains a masked-diffusion prior on them
   with ``molgen train sequences --fasta`` (``--prior-minutes`` of one CPU thread);
2. writes the oracle as a user's Python reward file (``python:oracle.py:score``, infeasible -> -1)
   that logs every value it returns, so a method's oracle calls are counted where they are made (SVDD's
   look-ahead evaluations included);
3. runs each method until ``--oracle-calls`` and records the best value found after each round:
   ``ga`` (holo's ``DiscreteEvolution`` from the initial solution, as holo's benchmark runs it; ``ga_mut1/L`` with
   one expected mutation per child), ``best_of_n`` (campaign rounds of prior samples, selection only),
   ``refine`` (rounds that re-mask and resample the selection), ``recombine`` (the same, with half of the
   refinements rearranged selected designs instead: ``refine.recombine``), ``svdd`` (SVDD look-ahead on top),
   ``surrogate`` (SVDD-MC steered by a value net fitted on the campaign's scores: no oracle calls while sampling),
   ``finetune``, ``finetune_svdd`` and ``finetune_recombine`` (the same with ``finetune: {}`` between rounds),
   ``grpo`` (``finetune: {method: grpo}``: on-policy GRPO between rounds, its rollouts' oracle calls counted).

Needs holo, which is no extra of molgen (its pins fight torch's): ``pip install botorch pooch`` and
``pip install --no-deps pytorch-holo``.

    python benchmarks/ehrlich.py --states 32 --length 32 --motifs 4 --motif-length 4 --quantization 4 \\
        --oracle-calls 16000 --seed 0 --json OUT.json --png OUT.png

JSON: ``rows`` of ``{"method", "oracle_calls", "best_value"}`` (the best value within the first oracle_calls
calls, at 64 points of the budget), ``summary`` (per method: best value within the budget, calls to reach 1.0
if ever, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
PENALTY = -1.0  # the value of an infeasible sequence (Ehrlich's -inf)

ORACLE = '''"""Ehrlich oracle written by benchmarks/ehrlich.py: a molgen python reward (python:oracle.py:score)."""
import math
from pathlib import Path

import torch
from holo.test_functions.closed_form import Ehrlich

LETTERS = {letters!r}
INFEASIBLE = {penalty!r}
F = Ehrlich(num_states={states}, dim={length}, num_motifs={motifs}, motif_length={motif_length},
            quantization={quantization}, random_seed={seed})
LOG = Path(__file__).with_name("oracle_log.txt")


def score(seqs):
    """One Ehrlich value per sequence (an infeasible one: INFEASIBLE), each appended to oracle_log.txt."""
    x = torch.tensor([[LETTERS.index(c) for c in s] for s in seqs])
    values = [v if math.isfinite(v) else INFEASIBLE for v in F(x).tolist()]
    with LOG.open("a") as fh:
        fh.write("".join(f"{{v}}\\n" for v in values))
    return values
'''


def ehrlich(args: argparse.Namespace) -> Any:
    from holo.test_functions.closed_form import Ehrlich

    return Ehrlich(num_states=args.states, dim=args.length, num_motifs=args.motifs, motif_length=args.motif_length,
                   quantization=args.quantization, random_seed=args.seed)


def train_prior(args: argparse.Namespace, work: Path) -> Path:
    """The prior's checkpoint, trained once per setting on the function's feasible initial distribution."""
    from molgen.cli import main as molgen

    model = work / "prior" / "model.pt"
    if model.is_file():
        return model
    f = ehrlich(args)
    x = f.initial_solution(args.prior_size)
    fasta = work / "initial.fasta"
    fasta.write_text("".join(f">init{i}\n{''.join(LETTERS[j] for j in row)}\n" for i, row in enumerate(x.tolist())))
    code = molgen(["train", "sequences", "--fasta", str(fasta), "--alphabet", LETTERS[: args.states],
                   "--out", str(work / "prior"), "--max-minutes", str(args.prior_minutes), "--threads", "1",
                   "--seed", str(args.seed)])
    if code:
        raise RuntimeError(f"training the prior failed (exit {code})")
    return model


def trace(log: Path) -> list[float]:
    """Every value the oracle returned, in order."""
    return [float(v) for v in log.read_text().split()] if log.is_file() else []


def run_ga(args: argparse.Namespace, mutation_prob: float) -> list[float]:
    """holo's DiscreteEvolution minimising -f from the initial solution: every value it asked for, in order."""
    from holo.optim import DiscreteEvolution

    torch.manual_seed(args.seed)
    f = ehrlich(args)
    x = torch.nn.Parameter(f.initial_solution().float(), requires_grad=False)
    opt = DiscreteEvolution([x], vocab=list(range(args.states)), mutation_prob=mutation_prob,
                            recombine_prob=0.5, num_particles=args.ga_particles, survival_quantile=0.5)
    log: list[float] = []

    def closure(particles: list[torch.Tensor]) -> torch.Tensor:
        values = f(particles[0].long())
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, PENALTY))
        log.extend(values.tolist())
        return -values

    while len(log) < args.oracle_calls:
        opt.step(closure)
    return log


CAMPAIGNS: dict[str, dict[str, Any]] = {  # beside the common keys; refine: the --refine-* options
    "best_of_n": {"refine": None},
    "refine": {},
    "recombine": {"refine": "recombine"},
    "svdd": {"guidance": {"method": "svdd", "candidates": 2}},
    "surrogate": {"guidance": {"method": "svdd_mc", "candidates": 4}},
    "finetune": {"finetune": True},
    "finetune_svdd": {"finetune": True, "guidance": {"method": "svdd", "candidates": 2}},
    "finetune_recombine": {"finetune": True, "refine": "recombine"},
    "grpo": {"finetune": "grpo"},
}


def run_campaign(args: argparse.Namespace, method: str, work: Path, prior: Path) -> list[float]:
    """A campaign over the oracle, one round at a time until the budget: every value the oracle returned."""
    from molgen.campaign import Campaign, CampaignConfig

    folder = work / method
    folder.mkdir(parents=True, exist_ok=True)
    oracle = folder / "oracle.py"
    oracle.write_text(ORACLE.format(letters=LETTERS[: args.states], states=args.states, length=args.length,
                                    motifs=args.motifs, motif_length=args.motif_length,
                                    quantization=args.quantization, seed=args.seed, penalty=PENALTY))
    log = folder / "oracle_log.txt"
    log.unlink(missing_ok=True)
    refine = {"fraction": args.refine_fraction, "t": args.refine_t[0] if len(args.refine_t) == 1 else args.refine_t}
    base = {"name": f"ehrlich_{method}", "modality": "sequences", "checkpoint": str(prior), "seed": args.seed,
            "n_per_round": args.per_round, "length": args.length, "sampler": {"steps": args.steps},
            "rewards": [{"name": "ehrlich", "spec": f"python:{oracle}:score"}],
            "selection": {"rule": "top_k", "k": args.keep, "min_distance": args.min_distance},
            "refine": refine, **CAMPAIGNS[method]}
    if base["refine"] == "recombine":
        base["refine"] = {**refine, "recombine": args.recombine}
    if base.get("finetune") == "grpo":  # on-policy: its rollouts' oracle calls count in the trace
        base["finetune"] = {"method": "grpo", "kl_bound": args.kl_bound}
    elif base.get("finetune"):
        base["finetune"] = {"kl_bound": args.kl_bound, "steps": args.finetune_steps}
    # a design drawn again costs no call (the campaign remembers its score): rounds go on until the budget is
    # spent, at most four times as many as if every design were new
    rounds = 4 * math.ceil(args.oracle_calls / args.per_round)
    campaign = Campaign(CampaignConfig.from_mapping({**base, "rounds": rounds}, method), folder / "campaign",
                        overwrite=True)
    with torch.no_grad():
        for r in campaign.pending_rounds():
            campaign.run_round(r)
            if len(trace(log)) >= args.oracle_calls:
                break
    campaign.close()
    return trace(log)


def best_so_far(values: list[float], budget: int, points: int = 64) -> list[dict[str, Any]]:
    """``points`` rows ``{oracle_calls, best_value}`` evenly over the budget (the running maximum)."""
    rows, best = [], -math.inf
    marks = {max(1, round(budget * (k + 1) / points)) for k in range(points)}
    for i, v in enumerate(values[:budget], start=1):
        best = max(best, v)
        if i in marks:
            rows.append({"oracle_calls": i, "best_value": best})
    return rows


def summarise(values: list[float], budget: int, seconds: float) -> dict[str, Any]:
    """The best value within the first ``budget`` oracle calls, the calls to reach 1.0 (if ever) and the time."""
    best = max(values[:budget])
    return {"best_value": best, "oracle_calls": min(budget, len(values)),
            "calls_to_optimum": next((i + 1 for i, v in enumerate(values) if v >= 1.0), None),
            "seconds": round(seconds, 1)}


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["oracle_calls"], r["best_value"]) for r in rows if r["method"] == method]
        ax.step(*zip(*pts), where="post", label=method, linestyle="--" if method.startswith("ga") else "-")
    ax.set_xlabel("oracle calls")
    ax.set_ylabel("best value found")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--states", type=int, default=32)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--motifs", type=int, default=4)
    p.add_argument("--motif-length", type=int, default=4)
    p.add_argument("--quantization", type=int, default=None, help="default: the motif length")
    p.add_argument("--oracle-calls", type=int, default=16000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", default=["ga", "ga_mut1/L", *CAMPAIGNS])
    p.add_argument("--prior-size", type=int, default=4096, help="training sequences from the initial distribution")
    p.add_argument("--prior-minutes", type=float, default=3.0)
    p.add_argument("--per-round", type=int, default=64, help="campaign designs per round")
    p.add_argument("--keep", type=int, default=16, help="campaign selection size")
    p.add_argument("--steps", type=int, default=16, help="campaign sampler steps")
    p.add_argument("--refine-fraction", type=float, default=0.9, help="share of a round refining the selection")
    p.add_argument("--refine-t", type=float, nargs="+", default=[0.15],
                   help="refinement noise level (share of letters re-masked); several: a ladder")
    p.add_argument("--recombine", type=float, default=0.5,
                   help="methods *recombine: share of the refinements that are rearranged designs (refine.recombine)")
    p.add_argument("--min-distance", type=float, default=None, help="campaign selection's diversity filter")
    p.add_argument("--kl-bound", type=float, default=1.0, help="fine-tuning's KL bound (nats per masked letter)")
    p.add_argument("--finetune-steps", type=int, default=16, help="fine-tuning steps per round")
    p.add_argument("--ga-particles", type=int, default=128)
    p.add_argument("--work", default=None, help="folder for the prior and the campaigns (default runs/ehrlich/...)")
    p.add_argument("--json", required=True)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    args.quantization = args.quantization or args.motif_length
    torch.set_num_threads(1)
    setting = f"V{args.states}_L{args.length}_C{args.motifs}_K{args.motif_length}_Q{args.quantization}_s{args.seed}"
    work = Path(args.work or ROOT / "runs" / "ehrlich" / setting)
    work.mkdir(parents=True, exist_ok=True)
    prior = train_prior(args, work) if any(not m.startswith("ga") for m in args.methods) else None
    rows, summary = [], {}
    for method in args.methods:
        t0 = time.perf_counter()
        if method.startswith("ga"):
            values = run_ga(args, 1.0 / args.length if method == "ga_mut1/L" else 0.2)
        else:
            values = run_campaign(args, method, work, prior)
        seconds = time.perf_counter() - t0
        rows += [{"method": method, **r} for r in best_so_far(values, args.oracle_calls)]
        summary[method] = summarise(values, args.oracle_calls, seconds)
        print(f"{method}: {summary[method]}", flush=True)
    title = (f"Ehrlich V={args.states} L={args.length} C={args.motifs} K={args.motif_length} "
             f"Q={args.quantization}, seed {args.seed}")
    out = {"title": title, "setting": {k: v for k, v in vars(args).items() if k not in ("json", "png", "work")},
           "prior": None if prior is None else json.loads(prior.with_suffix(".json").read_text())["provenance"],
           "summary": summary, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    if args.png:
        plot(rows, title, Path(args.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
