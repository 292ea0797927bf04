"""PDB / mmCIF input and output of protein backbones (N, CA, C, O) with Biopython.

Reading keeps the 20 standard amino acids of one chain of the first model. Ligands, water and ions
(residues without backbone atoms) are skipped; a residue that carries N/CA/C atoms but is not one of the 20
standard amino acids (e.g. MSE) is an error naming chain and residue, and so is a residue without CA
(``strict=False`` drops such residues instead, leaving a chain break); missing N, C or O atoms are kept as
NaN and listed in ``Backbone.missing``; chain breaks (C(i)-N(i+1) > 2.0 A or CA-CA > 4.2 A) are listed in
``Backbone.breaks``.
"""

from __future__ import annotations

import gzip
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BACKBONE_ATOMS = ("N", "CA", "C", "O")
THREE_TO_ONE = {
    "ALA": "A",
    "ARG": "R",
    "ASN": "N",
    "ASP": "D",
    "CYS": "C",
    "GLN": "Q",
    "GLU": "E",
    "GLY": "G",
    "HIS": "H",
    "ILE": "I",
    "LEU": "L",
    "LYS": "K",
    "MET": "M",
    "PHE": "F",
    "PRO": "P",
    "SER": "S",
    "THR": "T",
    "TRP": "W",
    "TYR": "Y",
    "VAL": "V",
}
ONE_TO_THREE = {v: k for k, v in THREE_TO_ONE.items()}
BREAK_CN = 2.0  # A: a peptide bond C(i)-N(i+1) is 1.33 A
BREAK_CACA = 4.2  # A: consecutive trans CA-CA is 3.80 A
STRUCTURE_SUFFIXES = (".pdb", ".cif", ".mmcif", ".ent", ".pdb.gz", ".cif.gz", ".mmcif.gz", ".ent.gz")


@dataclass
class Backbone:
    """One chain's backbone: ``coords`` [L, 4, 3] float32 in Angstrom (atoms N, CA, C, O; NaN if missing)."""

    coords: np.ndarray
    sequence: str
    chain_id: str = "A"
    residue_numbers: list[int] = field(default_factory=list)
    insertion_codes: list[str] = field(default_factory=list)
    name: str = "backbone"
    missing: list[str] = field(default_factory=list)
    breaks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.float32)
        n = len(self.coords)
        if self.coords.shape != (n, 4, 3):
            raise ValueError(f"{self.name}: backbone coords must be [L, 4, 3], got {self.coords.shape}")
        if len(self.sequence) != n:
            raise ValueError(f"{self.name}: sequence length {len(self.sequence)} != {n} residues")
        if not self.residue_numbers:
            self.residue_numbers = list(range(1, n + 1))
        if not self.insertion_codes:
            self.insertion_codes = [""] * n

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def ca(self) -> np.ndarray:
        return self.coords[:, 1]

    def label(self, i: int) -> str:
        """Human-readable residue label, e.g. ``A:45 GLY`` or ``A:45A GLY``."""
        return f"{self.chain_id}:{self.residue_numbers[i]}{self.insertion_codes[i]} " + ONE_TO_THREE.get(
            self.sequence[i], "UNK"
        )

    def index_of(self, residue_number: int) -> int:
        """Position of residue ``residue_number`` (no insertion code) in this chain."""
        for i, (num, icode) in enumerate(zip(self.residue_numbers, self.insertion_codes)):
            if num == residue_number and not icode:
                return i
        raise ValueError(f"{self.name}: chain {self.chain_id} has no residue {residue_number}")

    def segments(self) -> list[tuple[int, int]]:
        """Maximal unbroken ``[start, stop)`` runs (cut where consecutive CA are more than 4.2 A apart)."""
        d = np.linalg.norm(np.diff(self.ca, axis=0), axis=-1)
        cuts = [0, *(np.nonzero(d > BREAK_CACA)[0] + 1).tolist(), len(self)]
        return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _open_text(path: Path) -> io.StringIO:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: not a valid gzip file ({err})") from err
    try:
        return io.StringIO(raw.decode())
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text PDB/mmCIF file ({err})") from err


def _is_cif(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith((".cif", ".mmcif"))


def _parse_structure(path: Path):
    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.PDBExceptions import PDBConstructionException, PDBConstructionWarning

    handle = _open_text(path)
    parser = MMCIFParser(QUIET=True) if _is_cif(path) else PDBParser(QUIET=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PDBConstructionWarning)
            structure = parser.get_structure(path.stem, handle)
    except KeyError as err:  # MMCIFParser: a required data item is absent
        kind = "mmCIF" if _is_cif(path) else "PDB"
        raise ValueError(f"{path}: malformed {kind} file (required field {err.args[0]} is missing)") from err
    except IndexError as err:  # MMCIFParser: a loop row with fewer values than the loop declares
        kind = "mmCIF" if _is_cif(path) else "PDB"
        raise ValueError(f"{path}: malformed {kind} file (a record has fewer fields than its header; {err})") from err
    except (PDBConstructionException, ValueError) as err:
        raise ValueError(f"{path}: malformed {'mmCIF' if _is_cif(path) else 'PDB'} file ({err})") from err
    models = list(structure)
    if not models:
        raise ValueError(f"{path}: no atoms found (malformed or empty structure file)")
    return models[0]


def read_backbone(path: str | Path, chain: str | None = None, *, strict: bool = True) -> Backbone:
    """Read one chain's backbone (the first chain with amino acids when ``chain`` is None).

    ``strict=False`` drops non-standard amino acids and residues without CA (each leaves a chain break).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"structure file {path} does not exist")
    model = _parse_structure(path)
    chains = [c for c in model if chain is None or c.id == chain]
    if chain is not None and not chains:
        raise ValueError(f"{path}: no chain {chain!r} (chains: {[c.id for c in model]})")
    for ch in chains:
        residues = list(ch)
        residues = [r for i, r in enumerate(residues) if _is_amino_acid(residues, i)]
        if residues:
            return _chain_backbone(path, ch.id, residues, strict)
    raise ValueError(f"{path}: no amino-acid residues in {'chain ' + chain if chain else 'any chain'}")


def _linked(a, b) -> bool:
    """Whether residue ``a``'s C is peptide-bonded (< 2 A) to residue ``b``'s N."""
    return "C" in a and "N" in b and float(np.linalg.norm(a["C"].get_coord() - b["N"].get_coord())) < BREAK_CN


def _is_amino_acid(residues: list, i: int) -> bool:
    """Standard amino acid in an ATOM record, or a peptide-linked residue with N, CA, C (a modified one).

    Ligands, water and ions (HETATM groups not peptide-bonded to a neighbour) are not amino acids."""
    res = residues[i]
    if res.id[0] == " " and (res.get_resname() in THREE_TO_ONE or {"N", "CA", "C"} & set(res.child_dict)):
        return True
    if not {"N", "CA", "C"} <= set(res.child_dict):
        return False
    return (i > 0 and _linked(residues[i - 1], res)) or (i + 1 < len(residues) and _linked(res, residues[i + 1]))


def _chain_backbone(path: Path, chain_id: str, residues: list, strict: bool) -> Backbone:
    coords, seq, nums, icodes, missing = [], [], [], [], []
    for res in residues:
        hetflag, num, icode = res.id
        label = f"{chain_id}:{num}{icode.strip()} {res.get_resname()}"
        if res.get_resname() not in THREE_TO_ONE:
            if not strict:
                continue
            raise ValueError(f"{path}: non-standard residue {label} (only the 20 standard amino acids are read)")
        if "CA" not in res:
            if not strict:
                continue
            raise ValueError(f"{path}: residue {label} has no CA atom")
        xyz = np.full((4, 3), np.nan, dtype=np.float32)
        for k, atom in enumerate(BACKBONE_ATOMS):
            if atom in res:
                xyz[k] = res[atom].get_coord()
            else:
                missing.append(f"{label} missing {atom}")
        coords.append(xyz)
        seq.append(THREE_TO_ONE[res.get_resname()])
        nums.append(int(num))
        icodes.append(icode.strip())
    if not coords:
        raise ValueError(f"{path}: chain {chain_id} has no standard amino-acid residues")
    bb = Backbone(np.stack(coords), "".join(seq), chain_id, nums, icodes, path.name.split(".")[0], missing)
    bb.breaks = find_breaks(bb)
    return bb


def find_breaks(bb: Backbone) -> list[str]:
    """Chain breaks: consecutive residues with C-N > 2.0 A or CA-CA > 4.2 A, as readable strings."""
    out = []
    for i in range(len(bb) - 1):
        d_caca = float(np.linalg.norm(bb.coords[i + 1, 1] - bb.coords[i, 1]))
        d_cn = float(np.linalg.norm(bb.coords[i + 1, 0] - bb.coords[i, 2]))  # NaN when N or C is missing
        if d_caca > BREAK_CACA or d_cn > BREAK_CN:
            out.append(f"break between {bb.label(i)} and {bb.label(i + 1)} (CA-CA {d_caca:.2f} A, C-N {d_cn:.2f} A)")
    return out


def _to_structure(bb: Backbone):
    from Bio.PDB.StructureBuilder import StructureBuilder

    sb = StructureBuilder()
    sb.init_structure(bb.name)
    sb.init_model(0)
    sb.init_chain(bb.chain_id)
    serial = 1
    for i in range(len(bb)):
        sb.init_seg("    ")
        sb.init_residue(ONE_TO_THREE[bb.sequence[i]], " ", bb.residue_numbers[i], bb.insertion_codes[i] or " ")
        for k, atom in enumerate(BACKBONE_ATOMS):
            if np.isfinite(bb.coords[i, k]).all():
                sb.init_atom(atom, bb.coords[i, k].astype(float), 0.0, 1.0, " ", f" {atom:<3}", serial, atom[0])
                serial += 1
    return sb.get_structure()


def write_backbone(bb: Backbone, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``bb`` as PDB or mmCIF (``fmt`` "pdb"/"cif", else by suffix); missing atoms are left out."""
    from Bio.PDB import MMCIFIO, PDBIO

    path = Path(path)
    fmt = fmt or ("cif" if _is_cif(path) else "pdb")
    if fmt not in ("pdb", "cif"):
        raise ValueError(f"unknown structure format {fmt!r}; use 'pdb' or 'cif'")
    writer = PDBIO() if fmt == "pdb" else MMCIFIO()
    writer.set_structure(_to_structure(bb))
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.save(str(path))
    return path


def backbone_from_ca(
    ca: np.ndarray, sequence: str | None = None, name: str = "sample", chain_id: str = "A"
) -> Backbone:
    """Full N, CA, C, O backbone from a CA trace [L, 3] by ideal-geometry rebuild (poly-Gly by default)."""
    from molgen.structure.geometry import rebuild_backbone

    coords = rebuild_backbone(np.asarray(ca, dtype=np.float64))
    return Backbone(coords, sequence or "G" * len(ca), chain_id, name=name)


def list_structure_files(folder: str | Path) -> list[Path]:
    """PDB/mmCIF files (optionally gzipped) directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"structure folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(STRUCTURE_SUFFIXES))
