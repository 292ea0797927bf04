"""Small-molecule rewards on SMILES strings (or RDKit molecules); an unparsable molecule costs a penalty.

* ``validity``: 1 if RDKit parses and sanitises the molecule (times the atom share below), else the penalty 0.
* ``qed``: quantitative estimate of drug-likeness (Bickerton et al. 2012), in [0, 1].
* ``sa``: synthetic accessibility (Ertl & Schuffenhauer 2009, RDKit Contrib ``sascorer``) mapped to
  (10 - SA) / 9 in [0, 1], higher = easier to make.
* ``logp``: Crippen logP; ``logp:target=2.5`` gives -|logP - target|.
* ``ring_penalty``: -(number of rings with more than 6 atoms) (the usual penalised-logP ring term).

A sample of several fragments (``.`` in its SMILES: a generated structure that shed atoms, or a salt) is scored
on its largest fragment, and the [0, 1] scores (validity, QED, SA) are multiplied by that fragment's share of
all atoms, hydrogens counted: one connected molecule keeps its score, a structure that lost a hydrogen keeps
about 95 % of it. Scoring the largest fragment alone would reward breaking off the atoms that lower its score.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

from molgen.guidance.rewards import InvalidSample, Reward, register


def to_mol(sample: Any) -> Any:
    from rdkit import Chem

    if sample is not None and not isinstance(sample, str):
        return sample
    mol = Chem.MolFromSmiles(sample) if sample else None
    if mol is None:
        raise InvalidSample(f"not a valid molecule: {sample!r}")
    return mol


@cache
def _sascorer() -> Any:
    from rdkit.Chem import RDConfig

    path = os.path.join(RDConfig.RDContribDir, "SA_Score")
    if path not in sys.path:
        sys.path.append(path)
    import sascorer

    return sascorer


@dataclass
class MolReward(Reward):
    kind: str = "qed"
    target: float | None = None
    penalty: float = 0.0

    def score_one(self, sample: Any) -> float:
        from rdkit.Chem import QED, Crippen
        from rdkit.rdBase import BlockLogs

        from molgen.molecules.metrics import largest_fragment

        _quiet = BlockLogs()  # silences RDKit per-molecule warnings while this call runs
        mol, share = largest_fragment(to_mol(sample))
        if self.kind == "validity":
            return share
        if self.kind == "qed":
            return share * float(QED.qed(mol))
        if self.kind == "sa":
            return share * (10.0 - float(_sascorer().calculateScore(mol))) / 9.0
        if self.kind == "logp":
            v = float(Crippen.MolLogP(mol))
            return v if self.target is None else -abs(v - self.target)
        if self.kind == "ring_penalty":
            return -float(sum(len(r) > 6 for r in mol.GetRingInfo().AtomRings()))
        raise ValueError(f"unknown molecule reward kind {self.kind!r}")


register("validity", "molecules", "1 for a valid connected molecule, its largest fragment's atom share if "
         "fragmented, 0 if it does not sanitise")(
    lambda: MolReward(name="validity", kind="validity")
)
register("qed", "molecules", "RDKit QED drug-likeness in [0, 1]")(lambda: MolReward(name="qed", kind="qed"))
register("sa", "molecules", "(10 - SA score) / 9 in [0, 1] (RDKit Contrib sascorer)")(
    lambda: MolReward(name="sa", kind="sa")
)
register("logp", "molecules", "Crippen logP, or -|logP - target| with target=")(
    lambda target=None: MolReward(name="logp", kind="logp", target=target, penalty=-10.0)
)
register("ring_penalty", "molecules", "-(number of rings larger than 6)")(
    lambda: MolReward(name="ring_penalty", kind="ring_penalty", penalty=-5.0)
)
