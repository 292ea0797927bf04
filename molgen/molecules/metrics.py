"""EDM's QM9 metrics (Hoogeboom et al. 2022, ``qm9/bond_analyze.py``, ``analyze.py``, ``rdkit_functions.py``).

Bond order from the interatomic distance d (in pm) and tabulated lengths b1, b2, b3 of single, double and
triple bonds: order 0 if d >= b1 + 10; else 3 if the pair has a triple length and d < b3 + 3; else 2 if
the pair has a double length and d < b2 + 5; else 1. An atom is stable when its summed bond order equals
its allowed valence; a molecule when all its atoms are. Validity: an RDKit molecule from those bonds that
sanitises; its largest fragment's SMILES is kept. Uniqueness over valid SMILES, novelty of unique SMILES
against training SMILES made by the same code. This is the metric for generated structures.

For files that carry bonds (SDF), ``file_bond_metrics`` judges validity and stability by the file's own bonds,
charges and aromatic flags with RDKit instead (an aromatic benzene, ``[NH4+]`` or acetate is stable there).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from rdkit import Chem, RDLogger

from molgen.errors import InputError
from molgen.progress import progress

# Bond lengths in pm, as tabulated by EDM (from wiredchemist.com and chemistry-reference.com); symmetric.
BONDS1: dict[tuple[str, str], int] = {}
_B1 = {
    "H": {
        "H": 74,
        "C": 109,
        "N": 101,
        "O": 96,
        "F": 92,
        "B": 119,
        "Si": 148,
        "P": 144,
        "As": 152,
        "S": 134,
        "Cl": 127,
        "Br": 141,
        "I": 161,
    },
    "C": {
        "C": 154,
        "N": 147,
        "O": 143,
        "F": 135,
        "Si": 185,
        "P": 184,
        "S": 182,
        "Cl": 177,
        "Br": 194,
        "I": 214,
    },
    "N": {"N": 145, "O": 140, "F": 136, "Cl": 175, "Br": 214, "S": 168, "I": 222, "P": 177},
    "O": {"O": 148, "F": 142, "Br": 172, "S": 151, "P": 163, "Si": 163, "Cl": 164, "I": 194},
    "F": {"F": 142, "S": 158, "Si": 160, "Cl": 166, "Br": 178, "P": 156, "I": 187},
    "B": {"Cl": 175},
    "Si": {"Si": 233, "S": 200, "Cl": 202, "Br": 215, "I": 243},
    "Cl": {"Cl": 199, "P": 203, "S": 207, "Br": 214},
    "S": {"S": 204, "Br": 225, "P": 210, "I": 234},
    "Br": {"Br": 228, "P": 222},
    "P": {"P": 221},
    "I": {"I": 266},
}
_B2 = {
    "C": {"C": 134, "N": 129, "O": 120, "S": 160},
    "N": {"N": 125, "O": 121},
    "O": {"O": 121, "P": 150},
    "P": {"S": 186},
}
_B3 = {"C": {"C": 120, "N": 116, "O": 113}, "N": {"N": 110}}
MARGINS = (10, 5, 3)
# allowed valences (EDM ``allowed_bonds``); a tuple allows several
ALLOWED_BONDS: dict[str, tuple[int, ...]] = {
    "H": (1,),
    "C": (4,),
    "N": (3,),
    "O": (2,),
    "F": (1,),
    "B": (3,),
    "Al": (3,),
    "Si": (4,),
    "P": (3, 5),
    "S": (4,),
    "Cl": (1,),
    "As": (3,),
    "Br": (1,),
    "I": (1,),
    "Hg": (1, 2),
    "Bi": (3, 5),
}


def _symmetric(table: dict[str, dict[str, int]]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for a, row in table.items():
        for b, length in row.items():
            out[(a, b)] = out[(b, a)] = length
    return out


BONDS1, BONDS2, BONDS3 = _symmetric(_B1), _symmetric(_B2), _symmetric(_B3)
ELEMENTS: tuple[str, ...] = tuple(sorted({a for a, _ in BONDS1}))
_BOND_TYPES = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}


def bond_order(a: str, b: str, distance: float) -> int:
    """EDM bond order (0-3) of elements ``a``, ``b`` at ``distance`` Angstrom; 0 for untabulated pairs."""
    d = 100.0 * distance
    if (a, b) not in BONDS1 or d >= BONDS1[(a, b)] + MARGINS[0]:
        return 0
    if (a, b) in BONDS2 and d < BONDS2[(a, b)] + MARGINS[1]:
        if (a, b) in BONDS3 and d < BONDS3[(a, b)] + MARGINS[2]:
            return 3
        return 2
    return 1


def _thresholds(symbols: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairwise thresholds in Angstrom (inf where a pair has no bond of that order)."""
    uniq = sorted(set(symbols))
    idx = np.array([uniq.index(s) for s in symbols])
    tabs = []
    for table, margin in zip((BONDS1, BONDS2, BONDS3), MARGINS):
        small = np.full((len(uniq), len(uniq)), -np.inf)
        for i, a in enumerate(uniq):
            for j, b in enumerate(uniq):
                if (a, b) in table:
                    small[i, j] = (table[(a, b)] + margin) / 100.0
        tabs.append(small[idx][:, idx])
    return tabs[0], tabs[1], tabs[2]


def bond_matrix(symbols: Sequence[str], positions: np.ndarray) -> np.ndarray:
    """Symmetric int matrix [n, n] of EDM bond orders (vectorised ``bond_order`` over all pairs)."""
    pos = np.asarray(positions, dtype=np.float64)
    dist = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))
    t1, t2, t3 = _thresholds(symbols)
    order = np.where(dist < t1, np.where(dist < t2, np.where(dist < t3, 3, 2), 1), 0)
    np.fill_diagonal(order, 0)
    return order


def atom_stability(symbols: Sequence[str], positions: np.ndarray) -> np.ndarray:
    """Bool [n]: summed bond order equals an allowed valence."""
    valence = bond_matrix(symbols, positions).sum(1)
    return np.array([int(v) in ALLOWED_BONDS.get(s, ()) for s, v in zip(symbols, valence)], dtype=bool)


def build_rdkit(symbols: Sequence[str], positions: np.ndarray, *, conformer: bool = True) -> Chem.RWMol:
    """Unsanitised RDKit molecule with EDM-inferred bonds (and a 3D conformer)."""
    order = bond_matrix(symbols, positions)
    mol = Chem.RWMol()
    for s in symbols:
        mol.AddAtom(Chem.Atom(s))
    for i, j in zip(*np.nonzero(np.triu(order))):
        mol.AddBond(int(i), int(j), _BOND_TYPES[int(order[i, j])])
    if conformer:
        conf = Chem.Conformer(len(symbols))
        for i, p in enumerate(np.asarray(positions, dtype=np.float64)):
            conf.SetAtomPosition(i, p.tolist())
        conf.Set3D(True)
        mol.AddConformer(conf, assignId=True)
    return mol


def sanitised(symbols: Sequence[str], positions: np.ndarray) -> Chem.Mol | None:
    """The EDM-inferred molecule, sanitised by RDKit, or None when it does not sanitise (RDKit's log muted)."""
    mol = build_rdkit(symbols, positions, conformer=False)
    RDLogger.DisableLog("rdApp.*")
    try:
        Chem.SanitizeMol(mol)
    except ValueError:
        return None
    finally:
        RDLogger.EnableLog("rdApp.*")
    return mol


def structure_smiles(symbols: Sequence[str], positions: np.ndarray) -> str | None:
    """SMILES of the whole inferred structure ('.' between fragments) if it sanitises, else None."""
    mol = sanitised(symbols, positions)
    return None if mol is None else Chem.MolToSmiles(mol)


def largest_fragment(mol: Chem.Mol) -> tuple[Chem.Mol, float]:
    """The fragment of a sanitised molecule with the most atoms (hydrogens counted, implicit ones too) and its
    share of all the molecule's atoms (1.0 for one connected molecule)."""
    frags = Chem.GetMolFrags(mol, asMols=True)
    if len(frags) == 1:
        return mol, 1.0
    sizes = [Chem.AddHs(f).GetNumAtoms() for f in frags]
    best = max(range(len(frags)), key=sizes.__getitem__)
    return frags[best], sizes[best] / sum(sizes)


def valid_smiles(symbols: Sequence[str], positions: np.ndarray) -> str | None:
    """SMILES of the largest fragment if the inferred molecule sanitises, else None (EDM validity)."""
    mol = sanitised(symbols, positions)
    return None if mol is None else Chem.MolToSmiles(largest_fragment(mol)[0])


@dataclass
class MoleculeMetrics:
    n: int
    atom_stability: float
    mol_stability: float
    validity: float
    uniqueness: float
    novelty: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return dict(self.__dict__)


def evaluate(
    molecules: Iterable[tuple[Sequence[str], np.ndarray]],
    reference_smiles: Iterable[str] | None = None,
) -> MoleculeMetrics:
    """EDM metrics over (symbols, positions [n, 3] in Angstrom) pairs. Novelty is None without a reference;
    uniqueness and novelty are 0 when nothing is valid (as EDM reports them)."""
    n_mol = n_atoms = stable_atoms = stable_mols = 0
    valid: list[str] = []
    for symbols, positions in progress(molecules, "molecule metrics"):
        stable = atom_stability(symbols, positions)
        n_mol += 1
        n_atoms += len(stable)
        stable_atoms += int(stable.sum())
        stable_mols += int(stable.all())
        smi = valid_smiles(symbols, positions)
        if smi is not None:
            valid.append(smi)
    if n_mol == 0:
        raise ValueError("no molecules to evaluate")
    unique = set(valid)
    novelty: float | None = None
    if reference_smiles is not None:
        ref = set(reference_smiles)
        novelty = len(unique - ref) / len(unique) if unique else 0.0
    return MoleculeMetrics(
        n=n_mol,
        atom_stability=stable_atoms / max(n_atoms, 1),
        mol_stability=stable_mols / n_mol,
        validity=len(valid) / n_mol,
        uniqueness=len(unique) / len(valid) if valid else 0.0,
        novelty=novelty,
    )


def file_bond_check(mol: Chem.Mol) -> tuple[np.ndarray, str | None, int]:
    """Stability and validity from a molecule's own bonds, charges and aromatic flags (as read from a file):
    (per-atom stability [n], SMILES of the largest fragment or None, implicit hydrogens RDKit had to add).

    Valid when RDKit sanitises it; an atom is stable when the molecule is valid and the atom has neither
    implicit hydrogens nor unpaired electrons (its valence, for its charge, is filled by the file's atoms)."""
    mol = Chem.Mol(mol)
    RDLogger.DisableLog("rdApp.*")
    try:
        Chem.SanitizeMol(mol)
    except (ValueError, RuntimeError):
        return np.zeros(mol.GetNumAtoms(), dtype=bool), None, 0
    finally:
        RDLogger.EnableLog("rdApp.*")
    implicit = [a.GetNumImplicitHs() for a in mol.GetAtoms()]
    stable = np.array([h == 0 and a.GetNumRadicalElectrons() == 0 for h, a in zip(implicit, mol.GetAtoms())])
    return stable.astype(bool), Chem.MolToSmiles(largest_fragment(mol)[0]), sum(implicit)


@dataclass
class FileBondMetrics:
    """Stability and validity by the files' own bonds; ``implicit_h``: molecules RDKit had to add hydrogens to."""

    n: int
    atom_stability: float
    mol_stability: float
    validity: float
    implicit_h: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def file_bond_metrics(molecules: Iterable[Chem.Mol]) -> FileBondMetrics:
    """``file_bond_check`` over molecules with their bonds as read from a file."""
    n_mol = n_atoms = stable_atoms = stable_mols = n_valid = implicit_h = 0
    for mol in molecules:
        stable, smiles, implicit = file_bond_check(mol)
        n_mol += 1
        n_atoms += len(stable)
        stable_atoms += int(stable.sum())
        stable_mols += int(stable.all())
        n_valid += smiles is not None
        implicit_h += implicit > 0
    if n_mol == 0:
        raise InputError("no molecules to evaluate")
    return FileBondMetrics(n_mol, stable_atoms / max(n_atoms, 1), stable_mols / n_mol, n_valid / n_mol, implicit_h)


def hydrogen_warnings(symbols: Iterable[Sequence[str]], file_bonds: FileBondMetrics | None) -> list[str]:
    """Warnings for missing hydrogens: no H atom in any molecule, or molecules whose file bonds leave valences
    that RDKit fills with implicit hydrogens (EDM counts such atoms as unstable)."""
    out = []
    if not any("H" in s for s in symbols):
        out.append("no molecule has hydrogen atoms: EDM stability counts every heavy atom that needs one as "
                   "unstable; add explicit hydrogens")
    if file_bonds is not None and file_bonds.implicit_h:
        out.append(f"{file_bonds.implicit_h} of {file_bonds.n} molecules lack hydrogens their bonds need (RDKit adds "
                   "them implicitly): their atoms are unstable by both metrics")
    return out
