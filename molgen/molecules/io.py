"""Molecule files: multi-XYZ and SDF read/write, RDKit molecules with a 3D conformer and EDM-inferred bonds.

Readers return ``(molecules, errors)``: every record that cannot be used (unknown element, missing or
non-numeric coordinates, too many atoms, no atoms) is skipped with a message naming it (record number,
title and line); ``strict=True`` raises ``ValueError`` with that message instead.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rdkit import Chem, RDLogger

from molgen.molecules.metrics import ELEMENTS, build_rdkit


@dataclass
class Molecule:
    """Element symbols and positions [n, 3] in Angstrom."""

    symbols: tuple[str, ...]
    positions: np.ndarray
    name: str = ""

    def __len__(self) -> int:
        return len(self.symbols)

    def to_rdkit(self) -> Chem.Mol:
        """RDKit molecule with the EDM-inferred bonds and a 3D conformer; sanitised when it can be."""
        return to_rdkit(self)


def _open_text(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _check(
    symbols: Sequence[str], pos: np.ndarray, where: str, elements: Sequence[str] | None, max_atoms: int | None
) -> None:
    allowed = set(elements) if elements is not None else set(ELEMENTS)
    if not symbols:
        raise ValueError(f"{where}: no atoms")
    bad = sorted(set(symbols) - allowed)
    if bad:
        raise ValueError(f"{where}: unknown element(s) {bad}; supported: {sorted(allowed)}")
    if max_atoms is not None and len(symbols) > max_atoms:
        raise ValueError(f"{where}: {len(symbols)} atoms, more than the {max_atoms} supported")
    if pos.shape != (len(symbols), 3) or not np.isfinite(pos).all():
        raise ValueError(f"{where}: coordinates missing or not finite")


def _parse_xyz_records(text: str) -> Iterable[tuple[int, int, str, list[str]]]:
    """Yield (record number, first line, title, atom lines) of a multi-XYZ text."""
    lines = text.splitlines()
    i = record = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        record += 1
        head = lines[i].strip()
        try:
            n = int(head.split()[0])
        except ValueError:
            raise ValueError(f"XYZ record {record} (line {i + 1}): expected an atom count, got {head[:40]!r}") from None
        if n < 0:
            raise ValueError(f"XYZ record {record} (line {i + 1}): negative atom count {n}")
        title = lines[i + 1].strip() if i + 1 < len(lines) else ""
        yield record, i + 1, title, lines[i + 2 : i + 2 + n] + [None] * max(0, i + 2 + n - len(lines))
        i += 2 + n


def read_xyz(
    path: str | Path,
    *,
    elements: Sequence[str] | None = None,
    max_atoms: int | None = None,
    strict: bool = False,
) -> tuple[list[Molecule], list[str]]:
    """Multi-XYZ file (``.xyz`` or ``.xyz.gz``): count line, title line, ``El x y z`` lines per record."""
    path = Path(path)
    mols: list[Molecule] = []
    errors: list[str] = []
    for record, line_no, title, atom_lines in _parse_xyz_records(_open_text(path)):
        where = f"{path.name} record {record} ({title or 'untitled'}, line {line_no})"
        try:
            symbols, coords = [], []
            for k, line in enumerate(atom_lines):
                fields = line.split() if line is not None else []
                if len(fields) < 4:
                    raise ValueError(f"{where}: atom {k + 1} has no x y z coordinates")
                symbols.append(fields[0].capitalize() if fields[0].isalpha() else fields[0])
                try:
                    coords.append([float(v) for v in fields[1:4]])
                except ValueError:
                    raise ValueError(f"{where}: atom {k + 1} has non-numeric coordinates {fields[1:4]}") from None
            pos = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
            _check(symbols, pos, where, elements, max_atoms)
            mols.append(Molecule(tuple(symbols), pos, title))
        except ValueError as err:
            if strict:
                raise
            errors.append(str(err))
    if not mols and not errors:
        raise ValueError(f"{path}: empty file (no XYZ records)")
    return mols, errors


def _v2000_symbols(lines: Sequence[str], where: str) -> list[str] | None:
    """Element symbols of a V2000 atom block (columns 32-34, as written: RDKit turns unknown ones into ``*``),
    checking that every atom has numeric x, y, z (columns 1-30: RDKit reads blank fields as 0, which would
    silently move the atom to the origin). None for V3000 blocks."""
    if len(lines) < 4 or "V3000" in lines[3]:
        return None
    try:
        n = int(lines[3][:3])
    except ValueError:
        raise ValueError(f"{where}: counts line (record line 4) has no atom count: {lines[3][:40]!r}") from None
    for k in range(n):
        line = lines[4 + k] if 4 + k < len(lines) else ""
        try:
            np.asarray([line[i : i + 10] for i in (0, 10, 20)], dtype=np.float64)
        except ValueError:
            raise ValueError(
                f"{where}: atom {k + 1} (record line {5 + k}) has no x y z coordinates: {line[:40]!r}"
            ) from None
    return [lines[4 + k][31:34].strip() for k in range(n)]


def read_sdf(
    path: str | Path,
    *,
    elements: Sequence[str] | None = None,
    max_atoms: int | None = None,
    strict: bool = False,
) -> tuple[list[Molecule], list[str]]:
    """SDF (``.sdf`` or ``.sdf.gz``): atoms and 3D coordinates of each record (its bonds are ignored: the
    metrics infer bonds from distances, as EDM does)."""
    path = Path(path)
    text = _open_text(path)
    blocks = [b for b in text.split("$$$$") if b.strip()]
    if not blocks:
        raise ValueError(f"{path}: empty file (no SDF records)")
    mols: list[Molecule] = []
    errors: list[str] = []
    RDLogger.DisableLog("rdApp.*")
    try:
        for record, block in enumerate(blocks, start=1):
            title = block.lstrip("\r\n").splitlines()[0].strip() if block.strip() else ""
            where = f"{path.name} record {record} ({title or 'untitled'})"
            try:
                raw = _v2000_symbols(block.lstrip("\r\n").splitlines(), where)
                mol = Chem.MolFromMolBlock(block.lstrip("\r\n"), sanitize=False, removeHs=False, strictParsing=False)
                if mol is None:
                    raise ValueError(f"{where}: not a readable MOL block")
                if mol.GetNumConformers() == 0 or mol.GetNumAtoms() == 0:
                    raise ValueError(f"{where}: no atoms or coordinates")
                conf = mol.GetConformer()
                pos = np.asarray(conf.GetPositions(), dtype=np.float64)
                if not conf.Is3D() and np.allclose(pos[:, 2], 0.0):
                    raise ValueError(f"{where}: coordinates are 2D, 3D needed")
                symbols = tuple(raw if raw is not None else (a.GetSymbol() for a in mol.GetAtoms()))
                _check(symbols, pos, where, elements, max_atoms)
                mols.append(Molecule(symbols, pos, title))
            except ValueError as err:
                if strict:
                    raise
                errors.append(str(err))
    finally:
        RDLogger.EnableLog("rdApp.*")
    return mols, errors


def read_molecules(
    path: str | Path,
    *,
    elements: Sequence[str] | None = None,
    max_atoms: int | None = None,
    strict: bool = False,
) -> tuple[list[Molecule], list[str]]:
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
    raise ValueError(f"{path}: unknown molecule file type {kind or '(none)'!r}; use .sdf or .xyz")


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
    raise ValueError(f"{path}: cannot write {suffix or '(no suffix)'!r}; use .sdf or .xyz")
