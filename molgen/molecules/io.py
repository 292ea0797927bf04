"""Molecule files: multi-XYZ and SDF read/write, RDKit molecules with a 3D conformer and EDM-inferred bonds.

Readers return ``(molecules, skipped)``: every record that cannot be used (a bad count line, fewer or more
atom lines than it says, unknown element, missing or non-numeric coordinates, too many atoms, no atoms) is a
``Skipped`` record naming it (file, record number and title, line); the next record is read from its own count
line. ``strict=True`` raises the first as an ``InputError`` instead. SDF records keep the file's own bonds,
charges and aromatic flags in ``Molecule.bonded`` (for the file-bond metrics).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rdkit import Chem, RDLogger

from molgen.errors import InputError, Skipped
from molgen.files import read_bytes
from molgen.molecules.metrics import ELEMENTS, build_rdkit


@dataclass
class Molecule:
    """Element symbols and positions [n, 3] in Angstrom; ``bonded``: the file's molecule (SDF), unsanitised."""

    symbols: tuple[str, ...]
    positions: np.ndarray
    name: str = ""
    bonded: Chem.Mol | None = None

    def __len__(self) -> int:
        return len(self.symbols)

    def to_rdkit(self) -> Chem.Mol:
        """RDKit molecule with the EDM-inferred bonds and a 3D conformer; sanitised when it can be."""
        return to_rdkit(self)


def _open_text(path: Path) -> str:
    return read_bytes(path).decode("utf-8", errors="replace")


def _check(symbols: Sequence[str], pos: np.ndarray, elements: Sequence[str] | None, max_atoms: int | None) -> None:
    """``InputError`` (without a location: the caller adds it) for atoms the metrics cannot use."""
    allowed = set(elements) if elements is not None else set(ELEMENTS)
    if not symbols:
        raise InputError("no atoms")
    bad = sorted(set(symbols) - allowed)
    if bad:
        raise InputError(f"unknown element(s) {bad}; supported: {sorted(allowed)}")
    if max_atoms is not None and len(symbols) > max_atoms:
        raise InputError(f"{len(symbols)} atoms, more than the {max_atoms} supported")
    if pos.shape != (len(symbols), 3) or not np.isfinite(pos).all():
        raise InputError("coordinates missing or not finite")


def _atom_count(line: str) -> int | None:
    """The atom count of an XYZ count line (its first field), or None when it is not a count."""
    fields = line.split()
    return int(fields[0]) if fields and fields[0].isascii() and fields[0].isdigit() else None


def _is_count_line(line: str) -> bool:
    """A lone non-negative integer: where an XYZ record starts."""
    return len(line.split()) == 1 and _atom_count(line) is not None


def _is_atom_line(line: str) -> bool:
    fields = line.split()
    try:
        return len(fields) >= 4 and all(np.isfinite(float(v)) for v in fields[1:4])
    except ValueError:
        return False


def _next_count_line(lines: Sequence[str], start: int) -> int:
    return next((j for j in range(start, len(lines)) if _is_count_line(lines[j])), len(lines))


def _xyz_records(lines: Sequence[str], file: str) -> Iterator[tuple[str, int, str, list[str]] | InputError]:
    """(record label, count line number, title, atom lines) of each multi-XYZ record, or the ``InputError`` of
    a record whose count line is bad or disagrees with its atom lines (reading goes on at the next count line)."""
    i = record = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        record += 1
        n = _atom_count(lines[i])
        if n is None:
            yield InputError(f"expected an atom count, got {lines[i].strip()[:40]!r}", file, record, f"line {i + 1}")
            i = _next_count_line(lines, i + 1)
            continue
        title = lines[i + 1].strip() if i + 1 < len(lines) else ""
        label = f"{record} ({title or 'untitled'})"
        j = i + 2
        while j < min(i + 2 + n, len(lines)) and not _is_count_line(lines[j]):
            j += 1
        atoms = lines[i + 2 : j]
        if len(atoms) < n:
            yield InputError(f"the count line says {n} atoms but {len(atoms)} atom lines follow", file, label,
                             f"line {i + 1}")
        elif j < len(lines) and _is_atom_line(lines[j]):
            yield InputError(f"the count line says {n} atoms but more atom lines follow (line {j + 1})", file,
                             label, f"line {i + 1}")
            j = _next_count_line(lines, j)
        else:
            yield label, i + 1, title, atoms
        i = j


def _xyz_molecule(atom_lines: Sequence[str], title: str, elements: Sequence[str] | None,
                  max_atoms: int | None) -> Molecule:
    symbols, coords = [], []
    for k, line in enumerate(atom_lines):
        fields = line.split()
        if len(fields) < 4:
            raise InputError(f"atom {k + 1} has no x y z coordinates")
        symbols.append(fields[0].capitalize() if fields[0].isalpha() else fields[0])
        try:
            coords.append([float(v) for v in fields[1:4]])
        except ValueError:
            raise InputError(f"atom {k + 1} has non-numeric coordinates {fields[1:4]}") from None
    pos = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    _check(symbols, pos, elements, max_atoms)
    return Molecule(tuple(symbols), pos, title)


def read_xyz(
    path: str | Path,
    *,
    elements: Sequence[str] | None = None,
    max_atoms: int | None = None,
    strict: bool = False,
) -> tuple[list[Molecule], list[Skipped]]:
    """Multi-XYZ file (``.xyz`` or ``.xyz.gz``): count line, title line, ``El x y z`` lines per record."""
    path = Path(path)
    mols: list[Molecule] = []
    skipped: list[Skipped] = []
    for item in _xyz_records(_open_text(path).splitlines(), path.name):
        try:
            if isinstance(item, InputError):
                raise item
            label, line_no, title, atom_lines = item
            try:
                mols.append(_xyz_molecule(atom_lines, title, elements, max_atoms))
            except InputError as err:
                raise InputError(err.message, path.name, label, f"line {line_no}") from None
        except InputError as err:
            if strict:
                raise
            skipped.append(Skipped.of(err))
    if not mols and not skipped:
        raise InputError("empty file (no XYZ records)", path.name)
    return mols, skipped


def _v2000_symbols(lines: Sequence[str]) -> list[str] | None:
    """Element symbols of a V2000 atom block (columns 32-34, as written: RDKit turns unknown ones into ``*``),
    checking that every atom has numeric x, y, z (columns 1-30: RDKit reads blank fields as 0, which would
    silently move the atom to the origin). None for V3000 blocks."""
    if len(lines) < 4 or "V3000" in lines[3]:
        return None
    try:
        n = int(lines[3][:3])
    except ValueError:
        raise InputError(f"counts line (record line 4) has no atom count: {lines[3][:40]!r}") from None
    for k in range(n):
        line = lines[4 + k] if 4 + k < len(lines) else ""
        try:
            np.asarray([line[i : i + 10] for i in (0, 10, 20)], dtype=np.float64)
        except ValueError:
            raise InputError(f"atom {k + 1} (record line {5 + k}) has no x y z coordinates: {line[:40]!r}") from None
    return [lines[4 + k][31:34].strip() for k in range(n)]


def sdf_blocks(text: str) -> list[str]:
    """The MOL blocks of an SDF text: split at ``$$$$`` lines, each block starting at its title line (which may
    be blank, as RDKit writes unnamed molecules)."""
    parts = text.split("$$$$")
    return [parts[0], *(p[2:] if p.startswith("\r\n") else p[1:] if p.startswith("\n") else p for p in parts[1:])]


def read_sdf(
    path: str | Path,
    *,
    elements: Sequence[str] | None = None,
    max_atoms: int | None = None,
    strict: bool = False,
) -> tuple[list[Molecule], list[Skipped]]:
    """SDF (``.sdf`` or ``.sdf.gz``): atoms and 3D coordinates of each record, and the record's own bonds,
    charges and aromatic flags as ``Molecule.bonded`` (the EDM metrics ignore them and infer bonds from
    distances; the file-bond metrics use them)."""
    path = Path(path)
    text = _open_text(path)
    blocks = [b for b in sdf_blocks(text) if b.strip()]
    if not blocks:
        raise InputError("empty file (no SDF records)", path.name)
    mols: list[Molecule] = []
    skipped: list[Skipped] = []
    RDLogger.DisableLog("rdApp.*")
    try:
        for record, block in enumerate(blocks, start=1):
            title = block.splitlines()[0].strip()
            try:
                mols.append(_sdf_molecule(block, title, elements, max_atoms))
            except InputError as err:
                located = InputError(err.message, path.name, f"{record} ({title or 'untitled'})")
                if strict:
                    raise located from None
                skipped.append(Skipped.of(located))
    finally:
        RDLogger.EnableLog("rdApp.*")
    return mols, skipped


def _sdf_molecule(block: str, title: str, elements: Sequence[str] | None, max_atoms: int | None) -> Molecule:
    raw = _v2000_symbols(block.splitlines())
    mol = Chem.MolFromMolBlock(block, sanitize=False, removeHs=False, strictParsing=False)
    if mol is None:
        raise InputError("not a readable MOL block")
    if mol.GetNumConformers() == 0 or mol.GetNumAtoms() == 0:
        raise InputError("no atoms or coordinates")
    conf = mol.GetConformer()
    pos = np.asarray(conf.GetPositions(), dtype=np.float64)
    if not conf.Is3D() and np.allclose(pos[:, 2], 0.0):
        raise InputError("coordinates are 2D, 3D needed")
    symbols = tuple(raw if raw is not None else (a.GetSymbol() for a in mol.GetAtoms()))
    _check(symbols, pos, elements, max_atoms)
    return Molecule(symbols, pos, title, mol)


def read_molecules(
    path: str | Path,
    *,
    elements: Sequence[str] | None = None,
    max_atoms: int | None = None,
    strict: bool = False,
) -> tuple[list[Molecule], list[Skipped]]:
    """Dispatch on the suffix: ``.sdf``/``.mol``/``.sdf.gz`` or ``.xyz``/``.xyz.gz``."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".sdf", ".mol", ".sd"):
        return read_sdf(path, elements=elements, max_atoms=max_atoms, strict=strict)
    if kind == ".xyz":
        return read_xyz(path, elements=elements, max_atoms=max_atoms, strict=strict)
    raise InputError(f"unknown molecule file type {kind or '(none)'!r}; use .sdf or .xyz", str(path))


def to_rdkit(mol: Molecule) -> Chem.Mol:
    """RDKit ``Mol`` with a 3D conformer and EDM-inferred bonds (sanitised if possible, else as built)."""
    rw = build_rdkit(mol.symbols, mol.positions)
    out = rw.GetMol()
    RDLogger.DisableLog("rdApp.*")
    try:
        Chem.SanitizeMol(out)
    except ValueError:
        out.UpdatePropertyCache(strict=False)
    finally:
        RDLogger.EnableLog("rdApp.*")
    if mol.name:
        out.SetProp("_Name", mol.name)
    return out


def write_xyz(path: str | Path, molecules: Iterable[Molecule]) -> Path:
    """Multi-XYZ with 6-decimal coordinates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for i, m in enumerate(molecules):
        out.append(f"{len(m)}\n{m.name or f'molecule_{i}'}\n")
        out.extend(f"{s} {x:.6f} {y:.6f} {z:.6f}\n" for s, (x, y, z) in zip(m.symbols, m.positions))
    path.write_text("".join(out))
    return path


def write_sdf(path: str | Path, molecules: Iterable[Molecule]) -> Path:
    """SDF with 3D coordinates and EDM-inferred bonds; records that do not sanitise are written unsanitised
    (kekulisation is not attempted) so every sample is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Chem.SDWriter(str(path)) as writer:
        writer.SetKekulize(False)
        for i, m in enumerate(molecules):
            rd = to_rdkit(m if m.name else Molecule(m.symbols, m.positions, f"molecule_{i}"))
            writer.write(rd)
    return path


def write_molecules(path: str | Path, molecules: Sequence[Molecule]) -> Path:
    """By suffix: ``.sdf`` or ``.xyz``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".sdf":
        return write_sdf(path, molecules)
    if suffix == ".xyz":
        return write_xyz(path, molecules)
    raise InputError(f"cannot write {suffix or '(no suffix)'!r}; use .sdf or .xyz", str(path))
