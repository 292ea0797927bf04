"""QM9 data: the shipped 5,000-molecule subset and full QM9 from the ``qm9pack`` wheel (``molgen[qm9]``).

A processed data set is a dict of tensors (padded to ``MAX_ATOMS`` = 29 atoms):
``positions`` float32 [M, 29, 3] in Angstrom, ``types`` int64 [M, 29] (index into ``ATOM_TYPES``,
-1 = padding),
``n_atoms`` int64 [M], ``props`` float32 [M, P] (columns ``PROPERTIES``), ``smiles`` list[str] (QM9's own),
``index`` int64 [M] (QM9 molecule number), ``skipped`` list[str] (records left out because they hold atoms
outside ``ATOM_TYPES``, each named by QM9 number and SMILES). Full QM9 is split like EDM (Cormorant): a
fixed-seed permutation, 100,000 train, 10 % test, the rest validation.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

ATOM_TYPES: tuple[str, ...] = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS: tuple[int, ...] = (1, 6, 7, 8, 9)
MAX_ATOMS = 29
# (column in the QM9 CSV, name used by molgen); units as in QM9 (Hartree, bohr^3, Debye, cal/mol/K)
PROPERTIES: tuple[tuple[str, str], ...] = (
    ("HOMO_LUMO_gap_au", "gap"),
    ("HOMO_au", "homo"),
    ("LUMO_au", "lumo"),
    ("Polarizability_bohr3", "alpha"),
    ("Dipole_debye", "mu"),
    ("Heatcapacity_Cv_cal_mol_K", "cv"),
)
PROPERTY_NAMES: tuple[str, ...] = tuple(name for _, name in PROPERTIES)
SUBSET_PATH = Path(__file__).resolve().parents[2] / "data" / "molecules" / "qm9_subset_5000.csv.gz"
SPLIT_SEED = 0
N_TRAIN = 100_000
CACHE_VERSION = 1

_ELEMENT = re.compile(r"[A-Z][a-z]?")


def cache_dir() -> Path:
    """``$MOLGEN_CACHE`` or ``~/.cache/molgen``."""
    return Path(os.environ.get("MOLGEN_CACHE", Path.home() / ".cache" / "molgen"))


def parse_elements(text: str) -> list[str]:
    """``"['C','H']"`` -> ``['C', 'H']``."""
    return _ELEMENT.findall(text)


def parse_xyz_field(text: str, n_atoms: int) -> np.ndarray:
    """QM9's ``XYZ_Ang`` field (Mathematica exponents ``1.2*^-5``, bare ``0.``) -> float array [n, 3]."""
    flat = text.replace("*^", "e").replace("[", " ").replace("]", " ").replace(",", " ").split()
    xyz = np.asarray(flat, dtype=np.float64)
    if xyz.size != 3 * n_atoms:
        raise ValueError(f"XYZ field has {xyz.size} numbers, expected {3 * n_atoms}")
    return xyz.reshape(n_atoms, 3)


def unrepresentable(frame: pd.DataFrame) -> list[str]:
    """Names (``index N (SMILES)``) of the records holding an element outside ``ATOM_TYPES``."""
    known = set(ATOM_TYPES)
    return [
        f"index {i} ({smiles})"
        for i, smiles, elements in zip(frame["Index"], frame["SMILES"], frame["Elements"])
        if not set(parse_elements(elements)) <= known
    ]


def frame_to_tensors(frame: pd.DataFrame) -> dict:
    """Parse a QM9 frame (columns as in ``qm9pack``) into the padded tensor dict described above; records with
    atoms the model cannot represent are skipped with a warning that names and counts them."""
    skipped = unrepresentable(frame)
    if skipped:
        keep = [set(parse_elements(e)) <= set(ATOM_TYPES) for e in frame["Elements"]]
        frame = frame[keep].reset_index(drop=True)
        warnings.warn(
            f"skipped {len(skipped)} records with atoms outside {', '.join(ATOM_TYPES)}: {', '.join(skipped)}",
            stacklevel=2,
        )
    m = len(frame)
    positions = torch.zeros(m, MAX_ATOMS, 3, dtype=torch.float32)
    types = torch.full((m, MAX_ATOMS), -1, dtype=torch.int64)
    n_atoms = torch.tensor(frame["N_atoms"].to_numpy(), dtype=torch.int64)
    lookup = {s: i for i, s in enumerate(ATOM_TYPES)}
    for row, (elements, xyz, n) in enumerate(zip(frame["Elements"], frame["XYZ_Ang"], n_atoms.tolist())):
        symbols = parse_elements(elements)
        if len(symbols) != n or n > MAX_ATOMS:
            raise ValueError(f"QM9 row {row}: {len(symbols)} elements for N_atoms={n}")
        types[row, :n] = torch.tensor([lookup[s] for s in symbols])
        positions[row, :n] = torch.from_numpy(parse_xyz_field(xyz, n))
    props = torch.tensor(frame[[col for col, _ in PROPERTIES]].to_numpy(np.float32))
    return {
        "positions": positions,
        "types": types,
        "n_atoms": n_atoms,
        "props": props,
        "smiles": [str(s) for s in frame["SMILES"]],
        "index": torch.tensor(frame["Index"].to_numpy(), dtype=torch.int64),
        "skipped": skipped,
    }


def select(data: dict, idx: Tensor) -> dict:
    """Rows ``idx`` of a processed data set."""
    out = {k: v[idx] for k, v in data.items() if isinstance(v, Tensor)}
    out["smiles"] = [data["smiles"][i] for i in idx.tolist()]
    out["skipped"] = list(data.get("skipped", []))
    return out


def load_subset(path: str | Path = SUBSET_PATH) -> dict:
    """The shipped 5,000 random QM9 molecules (all of them; used for tests and the default demo)."""
    cols = ["Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang", *[c for c, _ in PROPERTIES]]
    return frame_to_tensors(pd.read_csv(path, usecols=cols))


def edm_split(n: int, seed: int = SPLIT_SEED, n_train: int = N_TRAIN) -> dict[str, Tensor]:
    """EDM/Cormorant-style split of ``n`` molecules: permutation with a fixed seed, then
    ``n_train`` train, ``int(0.1 n)`` test, the rest validation."""
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    n_test = int(0.1 * n)
    return {
        "train": perm[:n_train],
        "test": perm[n_train : n_train + n_test],
        "valid": perm[n_train + n_test :],
    }


def _read_qm9pack() -> pd.DataFrame:
    # locate the wheel's data without importing it (qm9pack's __init__ needs pkg_resources)
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "full QM9 needs the qm9pack package: pip install 'molgen[qm9]' (or pip install qm9pack)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    cols = ["Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang", *[c for c, _ in PROPERTIES]]
    parts = [pd.read_csv(folder / f"qm9_part{i}.csv", usecols=cols) for i in (1, 2, 3)]
    return pd.concat(parts, ignore_index=True).sort_values("Index", kind="stable").reset_index(drop=True)


def load_qm9(split: str = "train") -> dict:
    """Full QM9 (130,831 molecules) split like EDM; processed once and cached under ``cache_dir()``."""
    if split not in ("train", "valid", "test", "all"):
        raise ValueError(f"unknown QM9 split {split!r}; choose train, valid, test or all")
    path = cache_dir() / f"qm9_full_v{CACHE_VERSION}.pt"
    if path.exists():
        data = torch.load(path, weights_only=True)
    else:
        data = frame_to_tensors(_read_qm9pack())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(data, tmp)
        tmp.replace(path)
    if split == "all":
        return data
    return select(data, edm_split(len(data["n_atoms"]))[split])


def load_dataset(name: str, split: str = "train") -> dict:
    """``qm9`` (full, needs ``qm9pack``) or ``subset`` (shipped 5k; split ``train`` = first 4,500 of a
    seed-0 permutation, ``test`` = the other 500, ``all`` = everything)."""
    if name == "qm9":
        return load_qm9(split)
    if name == "subset":
        data = load_subset()
        if split == "all":
            return data
        perm = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(data["n_atoms"])))
        parts = {"train": perm[:4500], "test": perm[4500:], "valid": perm[4500:]}
        if split not in parts:
            raise ValueError(f"unknown split {split!r}; choose train, valid, test or all")
        return select(data, parts[split])
    raise ValueError(f"unknown molecule data set {name!r}; choose 'qm9' or 'subset'")


def atom_count_histogram(n_atoms: Tensor) -> Tensor:
    """Counts of molecules per atom number, float [MAX_ATOMS + 1] (index = number of atoms)."""
    return torch.bincount(n_atoms, minlength=MAX_ATOMS + 1).to(torch.float64)


def property_stats(props: Tensor) -> tuple[Tensor, Tensor]:
    """Per-property mean and standard deviation (for normalising conditions)."""
    return props.mean(0), props.std(0)
