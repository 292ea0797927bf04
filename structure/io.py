"""PDB / mmCIF input and output of protein backbones (N, CA, C, O) with Biopython.

Reading keeps the amino acids of one chain of the first model. Ligands, water and ions (residues without
backbone atoms) are skipped; modified and unknown residues with backbone atoms (MSE, UNK, HETATM amino acids
peptide-bonded to a neighbour) are read as backbone, with their parent's letter (``X`` when unknown). A residue
without CA is an error naming chain and residue (``strict=False`` leaves it out instead, listed in
``Backbone.dropped``, with a chain break); missing N, C or O atoms are kept as NaN and listed in
``Backbone.missing``; chain breaks (C(i)-N(i+1) > 2.0 A, CA-CA > 4.2 A, or a residue left out) are listed in
``Backbone.breaks``. Those where residues are missing (a residue left out, or a jump in the residue numbers)
are ``Backbone.gaps``: geometry metrics do not count them as bonds, while a break between consecutively
numbered residues (a generated model's stretched bond) stays a defect of the coordinates. ``read_backbones``
reads a list of files and returns what it could not read as ``Skipped`` records instead of raising.
``read_cal`` reads CA-only traces in the ``.cal`` text format (``>name`` lines, then one residue per line:
one-letter code and x, y, z in Angstrom, tab-separated; optionally gzipped), each as a ``Backbone`` whose
N, C and O are missing. Every bad-input error is an ``InputError`` naming the file.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from molgen.errors import InputError, Skipped
from molgen.files import read_bytes

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
MIN_RESIDUES = 6  # the fewest residues the backbone metrics take (DSSP assigns no shorter chain)


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
    gaps: list[int] = field(default_factory=list)  # i: residues are missing between residues i and i + 1
    dropped: list[str] = field(default_factory=list)  # residues the reader left out (no CA atom)

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.float32)
        n = len(self.coords)
        if self.coords.shape != (n, 4, 3):
            raise InputError(f"backbone coords must be [L, 4, 3], got {self.coords.shape}", self.name)
        if len(self.sequence) != n:
            raise InputError(f"sequence length {len(self.sequence)} != {n} residues", self.name)
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
        raise InputError(f"chain {self.chain_id} has no residue {residue_number}", self.name)

    def segments(self) -> list[tuple[int, int]]:
        """Maximal unbroken ``[start, stop)`` runs (cut where consecutive CA are more than 4.2 A apart)."""
        d = np.linalg.norm(np.diff(self.ca, axis=0), axis=-1)
        cuts = [0, *(np.nonzero(d > BREAK_CACA)[0] + 1).tolist(), len(self)]
        return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _open_text(path: Path) -> io.StringIO:
    raw = read_bytes(path)
    try:
        return io.StringIO(raw.decode())
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(f"byte {raw[err.start]:#04x} is not UTF-8: not a text PDB/mmCIF file", str(path),
                         position=f"line {line}") from err


def _is_cif(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith((".cif", ".mmcif"))


def _parse_structure(path: Path):
    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.PDBExceptions import PDBConstructionException, PDBConstructionWarning

    handle = _open_text(path)
    kind = "mmCIF" if _is_cif(path) else "PDB"
    parser = MMCIFParser(QUIET=True) if _is_cif(path) else PDBParser(QUIET=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PDBConstructionWarning)
            structure = parser.get_structure(path.stem, handle)
    except KeyError as err:  # MMCIFParser: a required data item is absent
        raise InputError(f"malformed {kind} file (required field {err.args[0]} is missing)", str(path)) from err
    except IndexError as err:  # MMCIFParser: a loop row with fewer values than the loop declares
        raise InputError(f"malformed {kind} file (a record has fewer fields than its header; {err})",
                         str(path)) from err
    except (PDBConstructionException, ValueError, TypeError, ArithmeticError, AttributeError) as err:
        # Biopython's parsers raise these on malformed records (e.g. a loop without keys, a bad altloc)
        raise InputError(f"malformed {kind} file ({err or type(err).__name__})", str(path)) from err
    models = list(structure)
    if not models:
        raise InputError("no atoms found (malformed or empty structure file)", str(path))
    return models[0]


def read_backbone(path: str | Path, chain: str | None = None, *, strict: bool = True) -> Backbone:
    """Read one chain's backbone (the first chain with amino acids when ``chain`` is None).

    ``strict=False`` leaves out residues without CA (each leaves a chain break) instead of raising.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"structure file {path} does not exist")
    model = _parse_structure(path)
    chains = [c for c in model if chain is None or c.id == chain]
    if chain is not None and not chains:
        raise InputError(f"no chain {chain!r} (chains: {[c.id for c in model]})", str(path))
    for ch in chains:
        residues = list(ch)
        residues = [r for i, r in enumerate(residues) if _is_amino_acid(residues, i)]
        if residues:
            return _chain_backbone(path, ch.id, residues, strict)
    raise InputError(f"no amino-acid residues in {'chain ' + chain if chain else 'any chain'}", str(path))


def read_backbones(paths: Iterable[Path], min_length: int = MIN_RESIDUES) -> tuple[list[Backbone], list[Skipped]]:
    """Backbones of every file that can be read (``strict=False``), and what was left out: unreadable files,
    chains shorter than ``min_length`` and residues without CA, each as a ``Skipped`` record."""
    backbones, skipped = [], []
    for path in paths:
        try:
            bb = read_backbone(path, strict=False)
            if len(bb) < min_length:
                raise InputError(f"{len(bb)} residue(s); at least {min_length} are needed", str(path),
                                 f"chain {bb.chain_id}")
        except InputError as err:
            skipped.append(Skipped.of(err))
            continue
        except OSError as err:
            skipped.append(Skipped(str(path), None, f"cannot read the file ({err.strerror or err})"))
            continue
        backbones.append(bb)
        skipped += [Skipped(str(path), label, "no CA atom: left out (a chain break)") for label in bb.dropped]
    return backbones, skipped


def _cal_chain(path: Path, name: str, rows: list[tuple[str, np.ndarray]]) -> Backbone:
    coords = np.full((len(rows), 4, 3), np.nan, dtype=np.float32)
    coords[:, 1] = np.stack([xyz for _, xyz in rows])
    seq = "".join(aa if aa in ONE_TO_THREE else "X" for aa, _ in rows)
    bb = Backbone(coords, seq, "A", name=name, missing=[f"{name}: CA-only trace (no N, C, O)"])
    bb.gaps = find_gaps(bb.coords)  # CA-only sets leave out unresolved residues: every long CA-CA is a gap
    bb.breaks = [describe_break(bb, i) for i in bb.gaps]
    return bb


def read_cal(path: str | Path) -> list[Backbone]:
    """Every chain of a ``.cal`` file (``>name``, then ``AA<tab>x<tab>y<tab>z`` per residue) as CA-only
    backbones, in file order. A malformed line is an ``InputError`` naming the file and the line."""
    path = Path(path)
    chains: list[Backbone] = []
    name, rows = None, []
    for number, line in enumerate(_open_text(path), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith(">"):
            if name is not None and rows:
                chains.append(_cal_chain(path, name, rows))
            name, rows = line[1:].split()[0] if line[1:].strip() else f"chain{len(chains) + 1}", []
            continue
        fields = line.split()
        where = f"line {number}"
        if name is None:
            raise InputError("residue line before the first '>name' header", str(path), position=where)
        if len(fields) != 4:
            raise InputError(f"expected 'AA x y z', got {len(fields)} field(s)", str(path), position=where)
        try:
            xyz = np.array([float(v) for v in fields[1:]], dtype=np.float32)
        except ValueError as err:
            raise InputError(f"coordinates are not numbers ({err})", str(path), position=where) from err
        if not np.isfinite(xyz).all():
            raise InputError("coordinates are not finite numbers", str(path), position=where)
        rows.append((fields[0].upper(), xyz))
    if name is not None and rows:
        chains.append(_cal_chain(path, name, rows))
    if not chains:
        raise InputError("no chains found (a .cal file holds '>name' headers and 'AA x y z' lines)", str(path))
    return chains


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


def residue_letter(resname: str) -> str:
    """One-letter code of a standard, modified (MSE -> M) or unknown (``X``) amino-acid residue."""
    from Bio.Data.PDBData import protein_letters_3to1_extended

    letter = THREE_TO_ONE.get(resname) or protein_letters_3to1_extended.get(resname, "X")
    return letter if letter in ONE_TO_THREE else "X"


def _chain_backbone(path: Path, chain_id: str, residues: list, strict: bool) -> Backbone:
    coords, seq, nums, icodes, missing, dropped, cut_after = [], [], [], [], [], [], set()
    for res in residues:
        hetflag, num, icode = res.id
        label = f"{chain_id}:{num}{icode.strip()} {res.get_resname()}"
        if "CA" not in res:
            if not strict:
                dropped.append(label)
                cut_after.add(len(coords) - 1)
                continue
            raise InputError(f"residue {label} has no CA atom", str(path))
        xyz = np.full((4, 3), np.nan, dtype=np.float32)
        present = [k for k, atom in enumerate(BACKBONE_ATOMS) if atom in res]
        for k in present:
            xyz[k] = res[BACKBONE_ATOMS[k]].get_coord()
        missing += [f"{label} missing {atom}" for atom in BACKBONE_ATOMS if atom not in res]
        if not np.isfinite(xyz[present]).all():
            raise InputError(f"residue {label} has coordinates that are not finite numbers", str(path))
        coords.append(xyz)
        seq.append(residue_letter(res.get_resname()))
        nums.append(int(num))
        icodes.append(icode.strip())
    if not coords:
        raise InputError(f"chain {chain_id} has no residue with a CA atom", str(path))
    bb = Backbone(np.stack(coords), "".join(seq), chain_id, nums, icodes, path.name.split(".")[0], missing)
    bb.dropped = dropped
    cut_after &= set(range(len(bb) - 1))
    geometric = set(find_gaps(bb.coords))
    bb.breaks = [describe_break(bb, i) for i in sorted(geometric | cut_after)]
    skips = {i for i in range(len(bb) - 1) if not 0 <= nums[i + 1] - nums[i] <= 1}
    bb.gaps = sorted((geometric & skips) | cut_after)
    return bb


def find_gaps(coords: np.ndarray) -> list[int]:
    """Positions i of chain breaks between residues i and i + 1: C-N > 2.0 A or CA-CA > 4.2 A."""
    d_caca = np.linalg.norm(coords[1:, 1] - coords[:-1, 1], axis=-1)
    d_cn = np.linalg.norm(coords[1:, 0] - coords[:-1, 2], axis=-1)  # NaN when N or C is missing: no break
    return np.nonzero((d_caca > BREAK_CACA) | (d_cn > BREAK_CN))[0].tolist()


def describe_break(bb: Backbone, i: int) -> str:
    """The chain break between residues ``i`` and ``i + 1``, readably."""
    d_caca = float(np.linalg.norm(bb.coords[i + 1, 1] - bb.coords[i, 1]))
    d_cn = float(np.linalg.norm(bb.coords[i + 1, 0] - bb.coords[i, 2]))
    return f"break between {bb.label(i)} and {bb.label(i + 1)} (CA-CA {d_caca:.2f} A, C-N {d_cn:.2f} A)"


def _to_structure(bb: Backbone):
    from Bio.PDB.StructureBuilder import StructureBuilder

    sb = StructureBuilder()
    sb.init_structure(bb.name)
    sb.init_model(0)
    sb.init_chain(bb.chain_id)
    serial = 1
    for i in range(len(bb)):
        sb.init_seg("    ")
        resname = ONE_TO_THREE.get(bb.sequence[i], "UNK")
        sb.init_residue(resname, " ", bb.residue_numbers[i], bb.insertion_codes[i] or " ")
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
        raise InputError(f"unknown structure format {fmt!r}; use 'pdb' or 'cif'", str(path))
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
