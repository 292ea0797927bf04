"""RNA design to a target secondary structure: ``design_rna`` (Python) and ``molgen design rna`` (command).

Methods (``METHODS``), each run per target until it has ``n`` solved designs or its budget (seconds, model
calls) is spent:

* ``refine`` (default): a population sampled from the structure-conditioned model with pair-aware unmasking
  (paired positions always hold GC, CG, AU, UA, GU or UG), then local refinement: each round re-masks, in every
  unsolved design, a few positions whose partner in the MFE fold differs from the target's (with their target
  mates) and draws ``DRAWS`` proposals for them from one model call; the best replaces its design unless it is
  worse on ``f = d_bp(MFE, target) + ENERGY_WEIGHT * (E(target) - E(MFE))`` (kcal/mol; 0 exactly when the MFE
  structure is the target, and the energy gap ranks designs of equal distance). Long targets are refined from
  the inside out, domain by domain (``stages``). When ``STALL_ROUNDS`` whole-sequence rounds in a row find no
  better design and the budget has seconds, the rest of it goes to ViennaRNA's adaptive walk
  (``RNA.inverse_fold``) started in turn from the unsolved designs (best first) and from uniform random
  sequences: the model places the pairs, the walk fixes what its proposals do not (isolated base pairs, for
  one), and the random starts keep the walk's own reach where the model's placements mislead it. Folds inside
  the walk are not counted;
* ``sample``: the model alone, fresh pair-aware samples until the budget ends;
* ``svdd`` / ``fk``: SVDD (value-guided branching) or FK steering (SMC with the tilt exp(lambda r)) over the
  pair-aware sampler with the reward ``r = -d_bp / L``;
* ``inverse_fold``: ViennaRNA's adaptive walk ``RNA.inverse_fold`` from uniform random starts (the classic
  baseline), each restart in a child process stopped at the deadline.

Each design is reported with its MFE structure, base-pair distance, target probability and ensemble defect
(``molgen.sequences.structure.ensemble``). Before the budget starts, each target is checked for short helices
(isolated pairs among them) that no sequence can hold in its MFE structure (``helix_proofs``); such a target is
reported undesignable, and the search still returns the closest designs it finds.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from molgen.diffusion.discrete import DiscreteSampler, gumbel_argmax, pair_tokens
from molgen.errors import InputError
from molgen.sequences.alphabets import RNA
from molgen.sequences.structure import (
    HelixProof,
    allowed_pairs,
    bp_distance,
    ensemble,
    fold,
    helix_proofs,
    parse_dot_bracket,
)

METHODS = ("refine", "sample", "svdd", "fk", "inverse_fold")
DEFAULT_METHOD = "refine"
ENERGY_WEIGHT = 0.5  # bp-distance units per kcal/mol of E(target) - E(MFE) in the refinement objective
MAX_REMASK = 4  # positions (before adding their mates) a refinement proposal redraws at most
DRAWS = 4  # proposals per design and round, drawn from one model call; the best is kept if not worse
DOMAIN_SPAN = 40  # the shortest domain refined on its own before the whole sequence
STALL_ROUNDS = 3  # whole-sequence rounds without a better best design before refine hands over to the walk
STAGE_ROUNDS = 10  # refinement rounds per domain at most
NEST_RATIO = 0.75  # a domain is refined on its own only if its largest refined part spans less than this share
GUIDED_ROWS = 2  # designs per SVDD / FK pass (a pass ends only at its last step)
SVDD_CANDIDATES = 4  # SVDD's children per step
REPORT_POOL = 4  # designs per requested one that get the partition function before the final ranking
FK_PARTICLES, FK_LAMBDA = 4, 20.0  # FK steering: particles per design, tilt exp(lambda r) with r = -d_bp / L


@dataclass(frozen=True)
class Target:
    name: str
    structure: str

    @property
    def partners(self) -> list[int]:
        return parse_dot_bracket(self.structure, self.name)


@dataclass(frozen=True)
class Budget:
    """Per-target limits: wall-clock ``seconds`` and ``calls`` (model evaluations of one sequence); either may
    be None (no limit), not both."""

    seconds: float | None = 10.0
    calls: int | None = None

    def __post_init__(self) -> None:
        if self.seconds is None and self.calls is None:
            raise ValueError("a design budget needs --seconds or --calls")
        for name in ("seconds", "calls"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"--{name} must be positive, got {v}")


@dataclass
class Counter:
    """What a method spent on one target."""

    start: float = field(default_factory=time.perf_counter)
    model_calls: int = 0
    folding_calls: int = 0

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def spent(self, budget: Budget) -> bool:
        return ((budget.seconds is not None and self.seconds() >= budget.seconds)
                or (budget.calls is not None and self.model_calls >= budget.calls))


@dataclass(frozen=True)
class Design:
    sequence: str
    mfe_structure: str
    bp_distance: int
    target_probability: float
    ensemble_defect: float


@dataclass
class TargetResult:
    """One target's designs (best first) and what finding them cost."""

    name: str
    target: str
    method: str
    designs: list[Design]
    model_calls: int
    folding_calls: int | None  # None for inverse_fold: its folds happen inside ViennaRNA
    seconds: float
    undesignable: list[HelixProof] = field(default_factory=list)  # proofs that no sequence can solve it

    @property
    def solved(self) -> bool:
        return any(d.bp_distance == 0 for d in self.designs)

    def summary(self) -> dict[str, Any]:
        """The JSON record: ``solved``, ``undesignable_helices`` (helices no sequence can hold in its MFE structure:
        1-based outermost pair, pairs, least energy gap in kcal/mol; ``helix_proofs``), ``bp_distance`` /
        ``target_probability`` / ``ensemble_defect`` (best and median over the designs), costs, and the designs'
        diversity (mean pairwise Hamming fraction)."""
        def best_median(key: str, best: Any) -> dict[str, float]:
            values = [getattr(d, key) for d in self.designs]
            return {"best": best(values), "median": statistics.median(values)}

        return {
            "name": self.name,
            "target": self.target,
            "length": len(self.target),
            "method": self.method,
            "solved": self.solved,
            "n_solved": sum(d.bp_distance == 0 for d in self.designs),
            "bp_distance": best_median("bp_distance", min),
            "target_probability": best_median("target_probability", max),
            "ensemble_defect": best_median("ensemble_defect", min),
            "model_calls": self.model_calls,
            "folding_calls": self.folding_calls,
            "seconds": round(self.seconds, 3),
            "diversity": diversity([d.sequence for d in self.designs]),
            "undesignable_helices": [{"i": p.i + 1, "j": p.j + 1, "pairs": p.pairs, "energy_gap": p.gap}
                                     for p in self.undesignable],
            "designs": [asdict(d) for d in self.designs],
        }


def diversity(seqs: Sequence[str]) -> float | None:
    """Mean pairwise Hamming fraction of designs of one target (``guidance.tasks.pairwise_hamming``); None below
    two designs."""
    from molgen.guidance.tasks import pairwise_hamming

    return pairwise_hamming(torch.stack([RNA.encode(s) for s in seqs])) if len(seqs) > 1 else None


def objective(seq: str, target: str) -> tuple[float, str]:
    """(f, MFE structure) with ``f = d_bp(MFE, target) + ENERGY_WEIGHT * (E(target) - E(MFE))`` (2 foldings)."""
    import RNA as vienna

    fc = vienna.fold_compound(seq)
    structure, energy = fc.mfe()
    gap = fc.eval_structure(target) - energy
    return bp_distance(structure, target) + ENERGY_WEIGHT * max(gap, 0.0), structure


# --------------------------------------------------------------------------------------------- model side
class PairSampler:
    """Pair-aware draws from a masked-diffusion RNA model for one target (``partners``), counting model calls."""

    def __init__(self, pre: Any, target: Target, counter: Counter, steps: int, generator: torch.Generator,
                 pair_aware: bool = True):
        length, max_len = len(target.structure), pre.model.config.max_length
        if length > max_len:
            raise InputError(f"target of {length} nt is longer than the model's maximum {max_len}",
                             record=target.name)
        self.pre, self.counter, self.gen = pre, counter, generator
        self.partners = torch.tensor(target.partners, dtype=torch.long)[None]
        self.sampler = DiscreteSampler(pre.model, pre.process, "cached_ancestral", min(steps, length),
                                       pairing=allowed_pairs() if pair_aware else None)

    def cond(self, rows: int) -> dict[str, torch.Tensor]:
        return {"partners": self.partners.expand(rows, -1)}

    @torch.no_grad()
    def sample(self, rows: int) -> torch.Tensor:
        """``rows`` fresh designs [rows, L]."""
        x_T = self.pre.process.prior(torch.full((rows,), self.partners.shape[1]))
        st = self.sampler.run(x_T, self.cond(rows), self.gen)
        self.counter.model_calls += st.rows_evaluated
        return st.x

    @torch.no_grad()
    def redraw(self, x: torch.Tensor, remask: torch.Tensor, draws: int = 1) -> torch.Tensor:
        """``draws`` copies of ``x`` [draws, B, L] with the ``remask`` positions redrawn (pairs jointly), all
        from one model call."""
        x_t = torch.where(remask, torch.full_like(x, RNA.mask_id), x)
        t = remask.float().mean(-1)
        cond = self.cond(len(x))
        log_p0 = self.pre.process.log_probs(self.pre.model(x_t, t, **cond), x_t)
        self.counter.model_calls += len(x)
        out = []
        for _ in range(draws):
            if self.sampler.pairing is None:
                tokens = gumbel_argmax(log_p0, self.gen)
            else:
                tokens = pair_tokens(log_p0, x_t, cond["partners"], self.sampler.pairing,
                                     lambda w: gumbel_argmax(w, self.gen))
            out.append(torch.where(remask, tokens, x))
        return torch.stack(out)


def remask_positions(mfe: str, partners: list[int], rng: random.Random) -> list[int]:
    """1 to ``MAX_REMASK`` positions whose MFE partner differs from the target's, with their target mates."""
    wrong = [i for i, (a, b) in enumerate(zip(parse_dot_bracket(mfe), partners)) if a != b]
    chosen = rng.sample(wrong, min(len(wrong), rng.randint(1, MAX_REMASK)))
    return sorted({i for c in chosen for i in (c, partners[c]) if i >= 0})


def stages(partners: list[int], min_span: int = DOMAIN_SPAN) -> list[tuple[int, int]]:
    """Segments ``[a, b]`` refined in turn: the domains (the outer pair of a helix with at least ``min_span`` nt
    inside and out, innermost first), then the whole sequence. A domain's fold is a fraction of the whole's
    cost (O(span^3)) and nested domains stay solved as a rule, so long targets are designed from the inside out."""
    length = len(partners)
    inner = [(i, j) for i, j in enumerate(partners)
             if j > i and min_span <= j - i + 1 <= length - min_span and (i == 0 or partners[i - 1] != j + 1)]
    kept: list[tuple[int, int]] = []
    for a, b in sorted(inner, key=lambda ab: ab[1] - ab[0]):  # a domain must be well over its largest kept part
        if all(not (a <= c and d <= b) or (d - c) < NEST_RATIO * (b - a) for c, d in kept):
            kept.append((a, b))
    return [*kept, (0, length - 1)]


def _refine(pre: Any, target: Target, n: int, budget: Budget, counter: Counter, seed: int,
            population: int, steps: int, pair_aware: bool) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    sampler = PairSampler(pre, target, counter, steps, gen, pair_aware)
    x = sampler.sample(max(population, n))
    seqs = [RNA.decode(r) for r in x]
    for a, b in stages(target.partners):
        whole = (a, b) == (0, len(seqs[0]) - 1)
        sub = target.structure[a : b + 1]
        partners = parse_dot_bracket(sub)
        scored = [objective(s[a : b + 1], sub) for s in seqs]
        counter.folding_calls += 2 * len(seqs)
        best, stalled = min(f for f, _ in scored), 0
        for _ in range(10**9 if whole else STAGE_ROUNDS):
            active = [i for i, (f, _) in enumerate(scored) if f > 0]
            if counter.spent(budget) or not active or (whole and len(seqs) - len(active) >= n):
                break
            if whole and budget.seconds is not None and stalled >= STALL_ROUNDS:  # proposals stopped helping
                designs = itertools.cycle([seqs[i] for i in sorted(active, key=lambda i: scored[i][0])])
                starts = (s for pair in zip(designs, _random_starts(target, rng)) for s in pair)
                return seqs + _walk(starts, target, n - (len(seqs) - len(active)), budget,
                                    counter)
            remask = torch.zeros(len(active), x.shape[1], dtype=torch.bool)
            for row, i in enumerate(active):
                remask[row, [a + k for k in remask_positions(scored[i][1], partners, rng)]] = True
            proposals = sampler.redraw(x[active], remask, DRAWS)
            for row, i in enumerate(active):
                tried = {}
                for tokens in proposals[:, row]:
                    seq = RNA.decode(tokens)
                    if seq not in tried:
                        tried[seq] = (objective(seq[a : b + 1], sub), tokens)
                counter.folding_calls += 2 * len(tried)
                seq, ((f, mfe), tokens) = min(tried.items(), key=lambda kv: kv[1][0][0])
                if f <= scored[i][0]:
                    x[i], seqs[i], scored[i] = tokens, seq, (f, mfe)
            now = min(f for f, _ in scored)
            best, stalled = now, (0 if now < best else stalled + 1)
    return seqs


def _sample(pre: Any, target: Target, n: int, budget: Budget, counter: Counter, seed: int,
            population: int, steps: int, pair_aware: bool) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    sampler = PairSampler(pre, target, counter, steps, gen, pair_aware)
    seqs: list[str] = []
    solved = 0
    while True:
        batch = [RNA.decode(r) for r in sampler.sample(population)]
        seqs += batch
        solved += n_solved(batch, target, counter)
        if solved >= n or counter.spent(budget):
            return seqs


def _guided(kind: str) -> Any:
    """SVDD or FK steering over the pair-aware sampler with the reward ``-d_bp / L``, pass after pass."""

    def run(pre: Any, target: Target, n: int, budget: Budget, counter: Counter, seed: int,
            population: int, steps: int, pair_aware: bool) -> list[str]:
        from molgen.guidance.fk import Tilt, fk_sample
        from molgen.guidance.rewards.nucleic import RNATarget
        from molgen.guidance.svdd import svdd_sample

        gen = torch.Generator().manual_seed(seed)
        sampler = PairSampler(pre, target, counter, steps, gen, pair_aware).sampler
        reward = RNATarget(target=target.structure)
        rows = min(population, GUIDED_ROWS) * (FK_PARTICLES if kind == "fk" else 1)
        cond = {"partners": torch.tensor(target.partners)[None].expand(rows, -1)}
        seqs: list[str] = []
        solved = 0
        while True:
            x_T = pre.process.prior(torch.full((rows,), len(target.structure)))
            if kind == "svdd":
                res = svdd_sample(sampler, x_T, reward, candidates=SVDD_CANDIDATES, decode=_decode, cond=cond,
                                  generator=gen)
            else:
                res = fk_sample(sampler, x_T, particles=FK_PARTICLES, tilt=Tilt(reward, lam=FK_LAMBDA, decode=_decode),
                                cond=cond, generator=gen, final="best")
            counter.model_calls += res.model_calls
            counter.folding_calls += res.reward_calls
            seqs += _decode(res.samples)
            solved += n_solved(_decode(res.samples), target, counter)
            if solved >= n or counter.spent(budget):
                return seqs

    return run


def _decode(tokens: torch.Tensor) -> list[str]:
    return [RNA.decode(r) for r in tokens]


def n_solved(seqs: Sequence[str], target: Target, counter: Counter) -> int:
    """How many of ``seqs`` fold into the target (one folding each, counted)."""
    counter.folding_calls += len(seqs)
    return sum(fold(s)[0] == target.structure for s in seqs)


def _random_starts(target: Target, rng: random.Random) -> Iterator[str]:
    """Uniform random sequences of the target's length, without end."""
    while True:
        yield "".join(rng.choice(RNA.letters) for _ in target.structure)


def _inverse_fold(target: Target, n: int, budget: Budget, counter: Counter, seed: int) -> list[str]:
    """Restarts of ``RNA.inverse_fold`` from uniform random sequences (``_walk``)."""
    return _walk(_random_starts(target, random.Random(seed)), target, n, budget, counter)


def _walk(starts: Iterator[str], target: Target, n: int, budget: Budget, counter: Counter) -> list[str]:
    """``RNA.inverse_fold`` from each start in turn until ``n`` are solved or the
    seconds of the budget are spent; each walk runs in a child process that is stopped at the deadline (one
    call cannot be interrupted otherwise), so the budget holds. Returns the walks' ends (a start where a walk
    was stopped)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    seqs: list[str] = []
    solved = 0
    for start in starts:
        if budget.seconds is not None and counter.seconds() >= budget.seconds:
            break
        left = None if budget.seconds is None else budget.seconds - counter.seconds()
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_inverse_fold_child, args=(start, target.structure, send))
        child.start()
        send.close()
        seq = receive.recv() if receive.poll(left) else None
        child.kill()
        child.join()
        seqs.append(seq or start)
        solved += seq is not None and fold(seq)[0] == target.structure
        counter.folding_calls += seq is not None
        if solved >= n:
            break
    return seqs or [next(starts)]


def _inverse_fold_child(start: str, structure: str, send: Any) -> None:
    import RNA as vienna

    vienna.cvar.give_up = 0
    send.send(vienna.inverse_fold(start, structure)[0].upper())


# --------------------------------------------------------------------------------------------- entry point
def read_targets(spec: str | Path) -> list[Target | InputError]:
    """Targets from a dot-bracket string or a file of them (FASTA-like: ``>name`` then the structure, or one
    structure per line); a bad target becomes the ``InputError`` that names it, in its place."""
    text = str(spec)
    path = Path(text)
    if not set(text) <= set("().[]{}<>") and path.exists():
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        out, name = [], None
        for line in lines:
            if line.startswith(">"):
                name = line[1:].split()[0] if line[1:].split() else f"target_{len(out) + 1}"
                continue
            name = name or f"target_{len(out) + 1}"
            out.append(_checked(Target(name, line.split()[0]), str(path)))
            name = None
        if not out:
            raise InputError("no target structure in the file", file=str(path))
        return out
    return [_checked(Target("target_1", text.strip()), None)]


def _checked(target: Target, file: str | None) -> Target | InputError:
    try:
        parse_dot_bracket(target.structure, target.name)
    except InputError as err:
        return InputError(err.message, file=file, record=target.name, position=err.position)
    return target


def design_rna(
    target: str | Target,
    n: int = 1,
    budget: Budget | None = None,
    method: str = DEFAULT_METHOD,
    model: Any = None,
    seed: int = 0,
    population: int = 8,
    steps: int = 16,
    pair_aware: bool = True,
) -> TargetResult:
    """Designs for one target structure with ``method`` (``METHODS``); ``model``: a ``Pretrained`` (default:
    the shipped structure-conditioned model; an unconditional RNA model works too: it ignores the structure,
    and pair-aware sampling still keeps every target pair an allowed one). ``n`` solved designs end the run
    early; ``pair_aware=False`` draws every letter on its own (the plain-token sampler)."""
    if method not in METHODS:
        raise ValueError(f"unknown design method {method!r}; choose one of {', '.join(METHODS)}")
    if n < 1 or population < 1 or steps < 1:
        raise ValueError("n, population and steps must be >= 1")
    target = target if isinstance(target, Target) else Target("target_1", target)
    parse_dot_bracket(target.structure, target.name)  # a named error for a bad structure, before any work
    budget = budget or Budget()
    if method == "inverse_fold" and budget.seconds is None:
        raise ValueError("inverse_fold makes no model calls: give it a budget in --seconds")
    pre = None if method == "inverse_fold" else model if model is not None else load_design_model()
    proofs = helix_proofs(target.structure)
    counter = Counter()  # the budget starts after the model is loaded and the target is checked
    if pre is None:
        seqs = _inverse_fold(target, n, budget, counter, seed)
    else:
        run = {"refine": _refine, "sample": _sample, "svdd": _guided("svdd"), "fk": _guided("fk")}[method]
        seqs = run(pre, target, n, budget, counter, seed, population, steps, pair_aware)
    seconds = counter.seconds()
    designs = best_designs(list(dict.fromkeys(seqs)), target.structure, n, counter)
    folding_calls = None if method == "inverse_fold" else counter.folding_calls  # its folds run inside ViennaRNA
    return TargetResult(target.name, target.structure, method, designs, counter.model_calls, folding_calls, seconds,
                        proofs)


def best_designs(seqs: list[str], target: str, n: int, counter: Counter) -> list[Design]:
    """The ``n`` best of distinct ``seqs``, by base-pair distance, then target probability: every one is folded,
    and only the ``REPORT_POOL * n`` closest get the partition function (3-4 foldings' worth each)."""
    distance = {s: bp_distance(fold(s)[0], target) for s in seqs}
    pool = sorted(seqs, key=distance.__getitem__)[: REPORT_POOL * n]
    counter.folding_calls += len(seqs) + len(pool)
    designs = []
    for s in pool:
        e = ensemble(s, target)
        designs.append(Design(s, e.mfe_structure, distance[s], e.target_probability, e.ensemble_defect))
    return sorted(designs, key=lambda d: (d.bp_distance, -d.target_probability))[:n]


def load_design_model(checkpoint: str | Path | None = None) -> Any:
    """The structure-conditioned RNA model (default: the shipped ``data/sequences/rna_design.pt``)."""
    from molgen.sequences.pretrained import default_checkpoint, load_pretrained

    return load_pretrained(checkpoint or default_checkpoint("rna_design"))

