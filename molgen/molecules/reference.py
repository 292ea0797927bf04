"""Reference SMILES for novelty: training molecules turned into SMILES by the same code as the samples
(EDM-inferred bonds, largest fragment), as EDM does.

``data/molecules/qm9_train_smiles.txt.gz`` holds them for the full-QM9 train split; rebuild it with
``python -m molgen.molecules.reference`` (needs ``molgen[qm9]``).
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

from molgen.molecules.data import ATOM_TYPES, load_dataset
from molgen.molecules.metrics import valid_smiles

QM9_TRAIN_SMILES = Path(__file__).resolve().parents[2] / "data" / "molecules" / "qm9_train_smiles.txt.gz"


def dataset_smiles(data: dict) -> list[str]:
    """Valid SMILES (EDM validity code) of every molecule in a processed data set."""
    out = []
    for i, n in enumerate(data["n_atoms"].tolist()):
        symbols = [ATOM_TYPES[k] for k in data["types"][i, :n].tolist()]
        smi = valid_smiles(symbols, data["positions"][i, :n].double().numpy())
        if smi is not None:
            out.append(smi)
    return out


def reference_smiles(name: str) -> tuple[str, set[str] | None]:
    """(name used, SMILES set) for ``qm9`` (shipped list), ``subset`` (its train split), ``none``;
    ``auto`` = ``qm9`` when the shipped list exists, else ``subset``."""
    if name == "auto":
        name = "qm9" if QM9_TRAIN_SMILES.exists() else "subset"
    if name == "none":
        return name, None
    if name == "qm9":
        if not QM9_TRAIN_SMILES.exists():
            raise FileNotFoundError(f"{QM9_TRAIN_SMILES} missing: run python -m molgen.molecules.reference")
        return name, set(gzip.decompress(QM9_TRAIN_SMILES.read_bytes()).decode().split())
    if name == "subset":
        return name, set(dataset_smiles(load_dataset("subset", "train")))
    raise ValueError(f"unknown novelty reference {name!r}; choose auto, qm9, subset or none")


def main() -> int:
    smiles = sorted(set(dataset_smiles(load_dataset("qm9", "train"))))
    QM9_TRAIN_SMILES.write_bytes(gzip.compress(("\n".join(smiles) + "\n").encode(), mtime=0))
    print(f"wrote {len(smiles)} unique SMILES to {QM9_TRAIN_SMILES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
