"""RNA and DNA rewards on sequence strings (scored per sample; a bad sequence costs that sample a penalty).

* ``rna_mfe``: -MFE in kcal/mol of the ViennaRNA minimum-free-energy fold (higher = more stable).
* ``rna_target:DOTBRACKET``: -(base-pair distance between the MFE structure and the target) / length,
  in [-1, 0] (0 = folds into the target); the sequence must have the target's length.
* ``gc`` / ``gc:target=0.5``: GC fraction, or -|GC - target|.
* ``jaspar:MATRIX_ID``: best window of the JASPAR matrix on either strand, as (score - min) / (max - min) of
  its log2-odds PWM (uniform background, pseudocount 0.8), in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from molgen.guidance.rewards import Reward, register

DNA = "ACGT"


def _clean(seq: object, letters: str) -> str:
    if not isinstance(seq, str):
        raise TypeError(f"expected a sequence string, got {type(seq).__name__}")
    s = seq.upper().replace("U", "T") if letters == DNA else seq.upper().replace("T", "U")
    bad = next((i for i, c in enumerate(s) if c not in letters), None)
    if bad is not None or not s:
        raise ValueError(f"invalid sequence {seq[:30]!r}: position {bad} is not one of {letters}")
    return s


def check_dot_bracket(target: str) -> str:
    """A balanced dot-bracket string; raises ValueError naming the first bad position."""
    if not isinstance(target, str) or not target:
        raise ValueError("rna_target needs a dot-bracket structure, e.g. rna_target:((((....))))")
    depth = 0
    for i, c in enumerate(target):
        if c not in ".()":
            raise ValueError(f"dot-bracket {target!r}: character {c!r} at position {i} is not '.', '(' or ')'")
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            raise ValueError(f"dot-bracket {target!r}: unmatched ')' at position {i}")
    if depth:
        raise ValueError(f"dot-bracket {target!r}: {depth} unmatched '('")
    return target


@dataclass
class RNAMFE(Reward):
    name: str = "rna_mfe"
    penalty: float = 0.0

    def score_one(self, sample: object) -> float:
        import RNA

        return -float(RNA.fold(_clean(sample, "ACGU"))[1])


@dataclass
class RNATarget(Reward):
    target: str = ""
    name: str = "rna_target"
    penalty: float = -1.0

    def __post_init__(self) -> None:
        check_dot_bracket(self.target)
        super().__post_init__()

    def lengths(self) -> set[int]:
        return {len(self.target)}

    def score_one(self, sample: object) -> float:
        import RNA

        seq = _clean(sample, "ACGU")
        if len(seq) != len(self.target):
            raise ValueError(f"sequence length {len(seq)} differs from the target's {len(self.target)}")
        structure = RNA.fold(seq)[0]
        return -RNA.bp_distance(structure, self.target) / len(seq)


@dataclass
class GC(Reward):
    target: float | None = None
    name: str = "gc"
    penalty: float = -1.0

    def score_one(self, sample: object) -> float:
        s = _clean(sample, DNA)
        gc = sum(c in "GC" for c in s) / len(s)
        return gc if self.target is None else -abs(gc - self.target)


def jaspar_pwm(matrix_id: str, pseudocount: float = 0.8) -> np.ndarray:
    """log2-odds PWM [4, W] (rows A, C, G, T) of a JASPAR matrix against a uniform background."""
    import warnings

    from pyjaspar import jaspardb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        motif = jaspardb().fetch_motif_by_id(matrix_id)
    if motif is None:
        raise ValueError(f"unknown JASPAR matrix ID {matrix_id!r} (expected e.g. MA0114.4)")
    counts = np.array([motif.counts[c] for c in DNA], dtype=np.float64)
    p = (counts + pseudocount / 4) / (counts.sum(0, keepdims=True) + pseudocount)
    return np.log2(p / 0.25)


@dataclass
class Jaspar(Reward):
    matrix_id: str = ""
    name: str = "jaspar"
    penalty: float = 0.0
    pwm: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self.pwm = jaspar_pwm(str(self.matrix_id))
        except ValueError:
            raise
        except Exception as err:  # pyjaspar raises various errors for malformed IDs
            raise ValueError(f"unknown JASPAR matrix ID {self.matrix_id!r}: {err}") from None
        self.lo, self.hi = float(self.pwm.min(0).sum()), float(self.pwm.max(0).sum())
        super().__post_init__()

    def score_one(self, sample: object) -> float:
        s = _clean(sample, DNA)
        width = self.pwm.shape[1]
        if len(s) < width:
            raise ValueError(f"sequence of length {len(s)} is shorter than the motif ({width})")
        idx = np.array([DNA.index(c) for c in s])
        rc = 3 - idx[::-1]
        best = max(_best_window(self.pwm, idx), _best_window(self.pwm, rc))
        return (best - self.lo) / (self.hi - self.lo)


def _best_window(pwm: np.ndarray, idx: np.ndarray) -> float:
    width = pwm.shape[1]
    windows = np.lib.stride_tricks.sliding_window_view(idx, width)  # [n, W]
    return float(pwm[windows, np.arange(width)].sum(1).max())


register("rna_mfe", "rna", "-MFE (kcal/mol) of the ViennaRNA fold")(lambda: RNAMFE())
register("rna_target", "rna", "-(bp distance of the MFE structure to a target dot-bracket) / length")(
    lambda target: RNATarget(target=str(target))
)
register("gc", "sequence", "GC fraction (RNA or DNA), or -|GC - target| with target=")(
    lambda target=None: GC(target=target)
)
register("jaspar", "dna", "best JASPAR PWM window on either strand, scaled to [0, 1] (arg: matrix ID)")(
    lambda matrix_id: Jaspar(matrix_id=str(matrix_id))
)
