"""RNA secondary structure: dot-bracket parsing, ViennaRNA folding metrics, and sequence-structure pairs.

A pseudoknot-free secondary structure on ``L`` nucleotides is a set of nested base pairs, written as a
dot-bracket string and held as ``partners``: ``partners[i] = j`` when i pairs with j, ``-1`` when i is unpaired.

Metrics (ViennaRNA, Turner 2004 parameters at 37 C):

* ``bp_distance(a, b) = |P(a) symmetric-difference P(b)|``, the number of base pairs in one structure only;
* target probability ``p(s*) = exp(-E(s*) / kT) / Z``, the Boltzmann weight of the target in the ensemble;
* ensemble defect ``ED = 1 - (1/L) sum_i [ sum_j P_ij 1(i-j in s*) + P_i^unpaired 1(i unpaired in s*) ]``,
  the expected fraction of nucleotides in another state than the target's (0 = the ensemble is the target).

Training pairs: ``synthetic_pair`` draws a sequence (uniform letters, or letters laid on a random nested
structure: complementary stems, A-rich loops, then mutated) and returns it with its exact MFE structure, so
that the model learns p(sequence | structure) on pairs where the structure is the sequence's own fold.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from molgen.errors import InputError
from molgen.sequences.alphabets import RNA

PAIRS = ("GC", "CG", "AU", "UA", "GU", "UG")  # canonical and wobble pairs ViennaRNA scores
PSEUDOKNOT_BRACKETS = "[]{}<>"
MIN_HAIRPIN = 3  # ViennaRNA forbids hairpin loops shorter than 3 nt


def allowed_pairs() -> torch.Tensor:
    """[4, 4] bool over RNA letters ``ACGU``: True where (a, b) can pair; symmetric."""
    out = torch.zeros(RNA.size, RNA.size, dtype=torch.bool)
    for a, b in PAIRS:
        out[RNA.letters.index(a), RNA.letters.index(b)] = True
    return out


def parse_dot_bracket(structure: str, record: str | int | None = None) -> list[int]:
    """Partners of a pseudoknot-free dot-bracket string; a bad character, an unmatched bracket or a pseudoknot
    bracket raises ``InputError`` naming the (1-based) position."""
    if not isinstance(structure, str) or not structure.strip():
        raise InputError("empty dot-bracket structure, expected e.g. ((((....))))", record=record)
    structure = structure.strip()
    partners, stack = [-1] * len(structure), []
    for i, c in enumerate(structure):
        if c == "(":
            stack.append(i)
        elif c == ")":
            if not stack:
                raise InputError("unmatched ')'", record=record, position=i + 1)
            j = stack.pop()
            partners[i], partners[j] = j, i
        elif c in PSEUDOKNOT_BRACKETS:
            raise InputError(f"{c!r}: pseudoknots are not supported (only '(', ')' and '.')", record=record,
                             position=i + 1)
        elif c != ".":
            raise InputError(f"character {c!r} is not '(', ')' or '.'", record=record, position=i + 1)
    if stack:
        raise InputError(f"unmatched '(' ({len(stack)} in all)", record=record, position=stack[0] + 1)
    return partners


def dot_bracket(partners: Sequence[int]) -> str:
    """The dot-bracket string of a nested ``partners`` list (inverse of ``parse_dot_bracket``)."""
    return "".join("." if j < 0 else "(" if j > i else ")" for i, j in enumerate(partners))


def sharp_hairpins(partners: Sequence[int]) -> list[int]:
    """1-based positions of pairs closing a hairpin loop of fewer than ``MIN_HAIRPIN`` nt (no sequence can
    fold into them under ViennaRNA's model)."""
    out = []
    for i, j in enumerate(partners):
        if j > i and all(partners[k] < 0 for k in range(i + 1, j)) and j - i - 1 < MIN_HAIRPIN:
            out.append(i + 1)
    return out


def partners_tensor(structures: Sequence[Sequence[int]], length: int | None = None) -> torch.Tensor:
    """[B, length] long: each row's partners, ``-1`` where unpaired and after its end."""
    length = max(len(p) for p in structures) if length is None else length
    out = torch.full((len(structures), length), -1, dtype=torch.long)
    for b, p in enumerate(structures):
        out[b, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    return out


# --------------------------------------------------------------------------------------------- ViennaRNA
def fold(seq: str) -> tuple[str, float]:
    """MFE structure and free energy (kcal/mol) of an RNA sequence."""
    import RNA as vienna

    structure, energy = vienna.fold(seq)
    return structure, float(energy)


def bp_distance(a: str, b: str) -> int:
    import RNA as vienna

    return int(vienna.bp_distance(a, b))


@dataclass(frozen=True)
class Ensemble:
    """Boltzmann-ensemble figures of a sequence against a target structure."""

    mfe_structure: str
    target_probability: float
    ensemble_defect: float


def ensemble(seq: str, target: str) -> Ensemble:
    """MFE structure, target probability and ensemble defect from one ViennaRNA partition function."""
    import RNA as vienna

    fc = vienna.fold_compound(seq)
    structure, energy = fc.mfe()
    fc.exp_params_rescale(energy)
    fc.pf()
    return Ensemble(structure, float(fc.pr_structure(target)), float(fc.ensemble_defect(target)))


def wrong_positions(structure: str, target: str) -> list[int]:
    """0-based positions whose partner (or unpaired state) differs between two structures of one length."""
    a, b = parse_dot_bracket(structure), parse_dot_bracket(target)
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


@dataclass(frozen=True)
class HelixProof:
    """A helix of ``pairs`` stacked pairs (i, j), (i + 1, j - 1), ... (0-based outermost pair) that no sequence
    can hold in its MFE structure: over every assignment of the letters its loops depend on,
    ``gap = min E(target) - E(target without the helix) > 0`` (kcal/mol); ``witness`` is a sequence at the
    minimum."""

    i: int
    j: int
    pairs: int
    gap: float
    witness: str


ENERGY_RESOLUTION = 0.01  # kcal/mol: ViennaRNA's energies are whole dcal/mol
SMALL_LOOP = 6  # loops of up to this many unpaired nt are scored on all their letters (tri-, tetra-, hexaloops,
#                 1x1 to 2x2 interior loops); larger ones only on the letters next to their pairs


def loop_members(partners: Sequence[int], closing: tuple[int, int] | None) -> tuple[list[int], list[int]]:
    """(paired, unpaired) positions of the loop closed by ``closing`` (None: the exterior loop): the closing
    pair, the pairs one level inside it and the unpaired positions between them."""
    a, b = closing if closing is not None else (-1, len(partners))
    paired = [] if closing is None else [a, b]
    unpaired, k = [], a + 1
    while k < b:
        if partners[k] > k:
            paired += [k, partners[k]]
            k = partners[k]
        elif partners[k] < 0:
            unpaired.append(k)
        k += 1
    return paired, unpaired


def _enclosing(partners: Sequence[int], i: int) -> tuple[int, int] | None:
    j = partners[i]
    return next(((a, partners[a]) for a in range(i - 1, -1, -1) if partners[a] > j), None)


def helix_proofs(structure: str, max_pairs: int = 3, max_cases: int = 50_000) -> list[HelixProof]:
    """Helices of up to ``max_pairs`` stacked pairs that make ``structure`` undesignable under ViennaRNA's
    energies (a sufficient test; an isolated pair is a helix of one pair).

    Removing a helix is the only difference between the target S and S' = S without it, and E(S) - E(S')
    depends only on the helix's stacks and the two loops it separates: their pairs, the letters next to those
    pairs and, for loops of at most ``SMALL_LOOP`` unpaired nt, every letter (special hairpins, small
    interior-loop tables). Enumerating those letters (pairs from ``PAIRS``; other positions are fixed) gives
    min E(S) - E(S'); when it is positive, every sequence folds lower without the helix, so no sequence has S
    as its MFE structure (a two-pair stem closing a long hairpin loop, for one). Helices whose loops need more
    than ``max_cases`` assignments are left undecided (not reported)."""
    import itertools

    import RNA as vienna

    partners = parse_dot_bracket(structure)
    n, md = len(partners), vienna.md()
    base = ["A"] * n  # the letters no loop in question depends on
    for a, b in enumerate(partners):
        if b > a:
            base[a], base[b] = "G", "C"
    proofs = []
    for i, j in enumerate(partners):
        if j < i or (i > 0 and partners[i - 1] == j + 1):
            continue  # not the outermost pair of a helix
        h = 1
        while partners[i + h] == j - h:
            h += 1
        if h > max_pairs:
            continue
        helix = [(i + k, j - k) for k in range(h)]
        outer = loop_members(partners, _enclosing(partners, i))
        inner = loop_members(partners, helix[-1])
        paired = set(outer[0]) | set(inner[0]) | {k for pair in helix for k in pair}
        loops = [outer[1], inner[1], outer[1] + inner[1] + [k for pair in helix for k in pair]]  # S' merges them
        free = {k for k in outer[1] + inner[1] if k - 1 in paired or k + 1 in paired}
        free |= {k for loop in loops if len(loop) <= SMALL_LOOP for k in loop if partners[k] < 0}
        pairs = sorted((k, partners[k]) for k in paired if partners[k] > k)
        free_list = sorted(free)
        if 6 ** len(pairs) * 4 ** len(free_list) > max_cases:
            continue
        without = list(structure)
        for a, b in helix:
            without[a] = without[b] = "."
        best = (float("inf"), "")
        for pair_letters in itertools.product(PAIRS, repeat=len(pairs)):
            for letters in itertools.product(RNA.letters, repeat=len(free_list)):
                seq = list(base)
                for (a, b), ab in zip(pairs, pair_letters):
                    seq[a], seq[b] = ab
                for k, c in zip(free_list, letters):
                    seq[k] = c
                fc = vienna.fold_compound("".join(seq), md, vienna.OPTION_EVAL_ONLY)
                gap = fc.eval_structure(structure) - fc.eval_structure("".join(without))
                best = min(best, (gap, "".join(seq)))
        if best[0] > ENERGY_RESOLUTION / 2:  # positive, float noise aside
            proofs.append(HelixProof(i, j, h, round(best[0], 2), best[1]))
    return proofs


# --------------------------------------------------------------------------------------------- training pairs
def random_structure(length: int, rng: random.Random, tries: int = 60) -> list[int]:
    """A random nested structure: stems of 3-9 pairs placed where they nest with the ones already placed,
    each closing at least ``MIN_HAIRPIN`` nt."""
    partners = [-1] * length
    for _ in range(tries):
        stem = rng.randint(3, 9)
        loop = rng.randint(MIN_HAIRPIN, max(MIN_HAIRPIN, min(40, length // 2)))
        span = 2 * stem + loop
        if span > length:
            continue
        i = rng.randrange(0, length - span + 1)
        j = i + span - 1 - rng.randint(0, max(0, (length - i - span) // 2))
        if j - i + 1 < span or j >= length:
            continue
        outer = [(i + k, j - k) for k in range(stem)]
        if all(partners[a] < 0 and partners[b] < 0 for a, b in outer) and _nests(partners, i, j):
            for a, b in outer:
                partners[a], partners[b] = b, a
    return partners


def _nests(partners: list[int], i: int, j: int) -> bool:
    """True when a pair (i, j) crosses no existing pair."""
    return all(partners[k] < 0 or i <= partners[k] <= j for k in range(i + 1, j))


PAIR_WEIGHTS = (0.3, 0.3, 0.15, 0.15, 0.05, 0.05)  # GC CG AU UA GU UG when stems are laid down
LOOP_WEIGHTS = (0.4, 0.2, 0.2, 0.2)  # A C G U in loops


def seeded_sequence(partners: Sequence[int], rng: random.Random, mutate: float = 0.08) -> str:
    """Letters on a structure: a random pair per stem pair, A-rich loops, then a ``mutate`` fraction redrawn."""
    seq = [""] * len(partners)
    for i, j in enumerate(partners):
        if j < 0:
            seq[i] = rng.choices(RNA.letters, LOOP_WEIGHTS)[0]
        elif j > i:
            seq[i], seq[j] = rng.choices(PAIRS, PAIR_WEIGHTS)[0]
    for i in range(len(seq)):
        if rng.random() < mutate:
            seq[i] = rng.choice(RNA.letters)
    return "".join(seq)


def synthetic_pair(length: int, rng: random.Random) -> tuple[str, str]:
    """(sequence, its MFE structure): half uniform letters with a random GC content, half seeded on a random
    structure; the structure is always the exact ViennaRNA fold of the sequence."""
    if rng.random() < 0.5:
        gc = rng.uniform(0.3, 0.7)
        seq = "".join(rng.choices(RNA.letters, ((1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2), k=length))
    else:
        seq = seeded_sequence(random_structure(length, rng), rng)
    return seq, fold(seq)[0]
