"""RNA and DNA rewards on sequence strings (scored per sample; a bad sequence costs that sample a penalty).

* ``rna_mfe``: -MFE in kcal/mol of the ViennaRNA minimum-free-energy fold (higher = more stable).
* ``rna_target:DOTBRACKET``: -(base-pair distance between the MFE structure and the target) / length,
  in [-1, 0] (0 = folds into the target); the sequence must have the target's length.
* ``rna_target_probability:DOTBRACKET``: the target's Boltzmann probability in the sequence's ensemble, in [0, 1].
* ``rna_ensemble_defect:DOTBRACKET``: minus the ensemble defect (expected fraction of nucleotides out of their
  target state), in [-1, 0]. Both from one ViennaRNA partition function (``molgen.sequences.structure``).
* ``gc`` / ``gc:target=0.5``: GC fraction, or -|GC - target|.
* ``jaspar:MATRIX_ID``: best window of the JASPAR matrix on either strand, as (score - min) / (max - min) of
  its log2-odds PWM (uniform background, pseudocount 0.8), in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from molgen.guidance.rewards import Reward, register
from molgen.sequences.structure import bp_distance, ensemble, fold, parse_dot_bracket

DNA = "ACGT"


def _clean(seq: object, letters: str) -> str:
    if not isinstance(seq, str):
        raise TypeError(f"expected a sequence string, got {type(seq).__name__}")
    s = seq.upper().replace("U", "T") if letters == DNA else seq.upper().replace("T", "U")
    bad = next((i for i, c in enumerate(s) if c not in letters), None)
    if bad is not None or not s:
        raise ValueError(f"invalid sequence {seq[:30]!r}: position {bad} is not one of {letters}")
    return s


@dataclass
class RNAMFE(Reward):
    name: str = "rna_mfe"
    penalty: float = 0.0

    def score_one(self, sample: object) -> float:
        import RNA

        return -float(RNA.fold(_clean(sample, "ACGU"))[1])


TERMS = ("distance", "probability", "defect")  # what RNATarget scores


@dataclass
class RNATarget(Reward):
    """A target structure's reward; ``term`` is ``distance``, ``probability`` or ``defect`` (see above)."""

    target: str = ""
    term: str = "distance"
    name: str = "rna_target"
    penalty: float = -1.0

    def __post_init__(self) -> None:
        parse_dot_bracket(self.target, "rna_target")
        if self.term not in TERMS:
            raise ValueError(f"unknown rna_target term {self.term!r}; choose one of {', '.join(TERMS)}")
        super().__post_init__()

    def lengths(self) -> set[int]:
        return {len(self.target)}

    def score_one(self, sample: object) -> float:
        seq = _clean(sample, "ACGU")
        if len(seq) != len(self.target):
            raise ValueError(f"sequence length {len(seq)} differs from the target's {len(self.target)}")
        if self.term == "distance":
            return -bp_distance(fold(seq)[0], self.target) / len(seq)
        e = ensemble(seq, self.target)
        return e.target_probability if self.term == "probability" else -e.ensemble_defect



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
register("rna_target_probability", "rna", "Boltzmann probability of a target dot-bracket in the ensemble")(
    lambda target: RNATarget(target=str(target), term="probability", name="rna_target_probability", penalty=0.0)
)
register("rna_ensemble_defect", "rna", "-(ensemble defect against a target dot-bracket), in [-1, 0]")(
    lambda target: RNATarget(target=str(target), term="defect", name="rna_ensemble_defect")
)
register("gc", "sequence", "GC fraction (RNA or DNA), or -|GC - target| with target=")(
    lambda target=None: GC(target=target)
)
register("jaspar", "dna", "best JASPAR PWM window on either strand, scaled to [0, 1] (arg: matrix ID)")(
    lambda matrix_id: Jaspar(matrix_id=str(matrix_id))
)
