"""A prior over secondary-structure strings, so that a conditioned backbone model can be asked for a natural
arrangement of helices and strands, or for a composition, one residue label at a time.

The law (``structure/_ss_law.py``, measured by P-SEA on the training chains): the fraction of residues in each
state (coil, helix, strand), the probability that an element of state a is followed by one of state b != a,
and the histogram of element lengths per state (lengths 1 to ``MAX_ELEMENT``, longer ones counted there).
A string of length L is a renewal process: the first element's state is drawn by residue frequency and its
length is the rest of a length-biased element (a uniform point inside it, as a random crop starts); then
elements follow by the transition matrix with lengths from their histograms, cut at L. Regenerate the law with
``python -m molgen.structure.ss_prior [DATA_PATH]``.

A composition request draws ``tries`` strings and keeps the one closest to it in L1 distance, per chain
(``SSRequest``, ``parse_ss``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from molgen.structure.sse import SS_STATES, composition_of, encode_ss

MAX_ELEMENT = 60


@dataclass(frozen=True)
class SSLaw:
    """Residue fractions [3], element transitions [3, 3] (rows sum to 1, zero diagonal) and element-length
    counts [3, MAX_ELEMENT] (column k: length k + 1), states in ``SS_STATES`` order."""

    fractions: np.ndarray
    transitions: np.ndarray
    lengths: np.ndarray


def elements(labels: str) -> list[tuple[int, int]]:
    """(state index, length) of each run of equal letters of a 3-state string."""
    out: list[tuple[int, int]] = []
    for c in labels:
        s = SS_STATES.index(c)
        if out and out[-1][0] == s:
            out[-1] = (s, out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


def fit_law(strings: list[str]) -> SSLaw:
    """The law of ``strings`` (3-state strings of unbroken chains)."""
    fractions = np.zeros(3)
    transitions = np.zeros((3, 3))
    lengths = np.zeros((3, MAX_ELEMENT))
    for labels in strings:
        runs = elements(labels)
        for (a, _), (b, _) in zip(runs, runs[1:]):
            transitions[a, b] += 1
        for k, (s, n) in enumerate(runs):
            fractions[s] += n
            if 0 < k < len(runs) - 1:  # whole elements only (the chain ends cut theirs)
                lengths[s, min(n, MAX_ELEMENT) - 1] += 1
    if not (lengths.sum(1) > 0).all() or not (transitions.sum(1) > 0).all():
        raise ValueError("the strings hold no whole element of some state, or no transition out of it")
    return SSLaw(fractions / fractions.sum(), transitions / transitions.sum(1, keepdims=True), lengths)


@lru_cache(maxsize=1)
def default_law() -> SSLaw:
    from molgen.structure._ss_law import FRACTIONS, LENGTHS, TRANSITIONS

    return SSLaw(np.asarray(FRACTIONS), np.asarray(TRANSITIONS), np.asarray(LENGTHS, dtype=np.float64))


def sample_string(length: int, rng: np.random.Generator, law: SSLaw | None = None) -> str:
    """One 3-state string of ``length`` residues from the law (``SS_STATES`` letters)."""
    law = law or default_law()
    probs = law.lengths / law.lengths.sum(1, keepdims=True)
    state = int(rng.choice(3, p=law.fractions))
    biased = probs[state] * np.arange(1, MAX_ELEMENT + 1)  # the element a random residue falls in
    run = int(rng.integers(1, int(rng.choice(MAX_ELEMENT, p=biased / biased.sum())) + 2))
    out = [SS_STATES[state] * run]
    total = run
    while total < length:
        state = int(rng.choice(3, p=law.transitions[state]))
        run = int(rng.choice(MAX_ELEMENT, p=probs[state])) + 1
        out.append(SS_STATES[state] * run)
        total += run
    return "".join(out)[:length]


def composition(labels: str) -> np.ndarray:
    """Fractions of coil, helix, strand (``SS_STATES`` order) of a 3-state string."""
    return np.array([labels.count(c) for c in SS_STATES], dtype=np.float64) / max(len(labels), 1)


def closest_string(target: tuple[float, float, float], length: int, rng: np.random.Generator,
                   tries: int = 256, law: SSLaw | None = None) -> str:
    """Of ``tries`` strings from the law, the one whose composition is closest to ``target`` (L1)."""
    strings = [sample_string(length, rng, law) for _ in range(tries)]
    gaps = [np.abs(composition(s) - np.asarray(target)).sum() for s in strings]
    return strings[int(np.argmin(gaps))]


@dataclass(frozen=True)
class SSRequest:
    """What sampled backbones are asked to be: ``labels``, one 3-state letter per residue (the same for every
    chain); or a ``composition`` (fractions of coil, helix, strand), for which each chain gets the closest of
    ``closest_string``'s draws; or neither, ``natural``: each chain gets a string drawn from the law. The
    model is always given per-residue labels with their own composition (as in training), because the labels
    are what it follows (a composition alone changes little)."""

    composition: tuple[float, float, float] | None = None
    labels: str | None = None

    def strings(self, n: int, length: int, rng: np.random.Generator) -> list[str]:
        """One 3-state string per chain."""
        if self.labels is not None:
            if len(self.labels) != length:
                raise ValueError(f"the per-residue secondary structure has {len(self.labels)} letters for "
                                 f"chains of {length} residues")
            return [self.labels] * n
        if self.composition is not None:
            return [closest_string(self.composition, length, rng) for _ in range(n)]
        return [sample_string(length, rng) for _ in range(n)]

    def tensors(self, n: int, length: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The model's conditioning keywords ``ss`` [n, length] and ``composition`` [n, 3]."""
        labels = torch.stack([encode_ss(s) for s in self.strings(n, length, rng)])
        return {"ss": labels, "composition": composition_of(labels, torch.ones_like(labels, dtype=torch.bool))}

    def describe(self) -> str:
        if self.labels is not None:
            return self.labels
        if self.composition is not None:
            return ",".join(f"{k}:{v:.2f}" for k, v in zip("CHE", self.composition))
        return "natural"


def parse_ss(spec: str) -> SSRequest:
    """``"natural"`` (strings from the law), ``"E:0.4,H:0.2"`` (fractions of strand ``E``, helix ``H``,
    coil ``C``; states left out share the rest equally) or a per-residue string of ``H``, ``E``, ``C`` (or
    ``-``) letters."""
    spec = spec.strip().upper()
    if spec == "NATURAL":
        return SSRequest()
    if ":" not in spec:
        labels = spec.replace("C", "-")
        encode_ss(labels)  # names bad letters
        return SSRequest(labels=labels)
    given: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition(":")
        key = key.strip()
        if key not in ("C", "H", "E") or key in given:
            raise ValueError(f"secondary-structure composition {spec!r}: {key!r} is not one of C, H, E (once each)")
        try:
            given[key] = float(value)
        except ValueError as err:
            raise ValueError(f"secondary-structure composition {spec!r}: {value!r} is not a number") from err
        if not 0.0 <= given[key] <= 1.0:
            raise ValueError(f"secondary-structure composition {spec!r}: fractions must lie in [0, 1]")
    rest = 1.0 - sum(given.values())
    free = [k for k in "CHE" if k not in given]
    if rest < -1e-6 or (not free and abs(rest) > 1e-2):
        raise ValueError(f"secondary-structure composition {spec!r}: fractions must sum to 1, got {1 - rest:.3f}")
    fractions = [given.get(k, max(rest, 0.0) / max(len(free), 1)) for k in "CHE"]
    return SSRequest(composition=tuple(fractions))


def _write_law(data_path: str | None, target: Path) -> None:
    from molgen.structure.data import default_sources, held_out_split, load_backbones, segments_of

    chains, _ = held_out_split(load_backbones(default_sources(data_path)))
    law = fit_law([s.ss for s in segments_of(chains)])
    def counts(row: np.ndarray) -> str:
        return ",\n".join("        " + ", ".join(f"{int(v)}" for v in row[i : i + 20]) for i in range(0, len(row), 20))

    rows = ",\n".join(f"    [\n{counts(row)},\n    ]" for row in law.lengths)
    target.write_text(
        '"""Secondary-structure law of the training chains (P-SEA), written by\n'
        '``python -m molgen.structure.ss_prior``: residue fractions, element transitions and element-length\n'
        'counts (lengths 1-60), states coil, helix, strand."""\n\n'
        f"FRACTIONS = [{', '.join(f'{v:.4f}' for v in law.fractions)}]\n"
        "TRANSITIONS = [\n" + ",\n".join("    [" + ", ".join(f"{v:.4f}" for v in row) + "]"
                                         for row in law.transitions) + ",\n]\n"
        f"LENGTHS = [\n{rows},\n]\n"
    )


if __name__ == "__main__":
    _write_law(sys.argv[1] if len(sys.argv) > 1 else None, Path(__file__).with_name("_ss_law.py"))
