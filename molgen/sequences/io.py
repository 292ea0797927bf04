"""FASTA / plain-text sequence readers and a FASTA writer, with errors that name the record and position."""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from molgen.sequences.alphabets import Alphabet


@dataclass(frozen=True)
class Record:
    name: str
    seq: str


def _open_text(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sequence file {path} does not exist")
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def parse_fasta(lines: Iterable[str], source: str = "<input>") -> Iterator[Record]:
    """FASTA records (multi-line sequences joined); text before the first header raises."""
    name, chunks, line_no = None, [], 0
    for line_no, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            if name is not None:
                yield Record(name, "".join(chunks))
            name, chunks = line[1:].strip() or f"{source}:{line_no}", []
        elif name is None:
            raise ValueError(f"{source}, line {line_no}: sequence text before the first '>' header")
        else:
            chunks.append(line)
    if name is not None:
        yield Record(name, "".join(chunks))


def parse_plain(lines: Iterable[str], source: str = "<input>") -> Iterator[Record]:
    """One sequence per non-empty line; records are named ``source:line``."""
    for line_no, line in enumerate(lines, start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield Record(f"{Path(source).name}:{line_no}", line)


def read_sequences(path: str | Path) -> list[Record]:
    """Read FASTA (any line starts with '>') or plain one-per-line text, gzip or not."""
    with _open_text(path) as fh:
        lines = fh.readlines()
    parser = parse_fasta if any(ln.startswith(">") for ln in lines) else parse_plain
    return list(parser(lines, str(path)))


def validate(
    records: Iterable[Record], alphabet: Alphabet, max_length: int | None = None, min_length: int = 1
) -> list[Record]:
    """Normalise records; raise on empty, too short/long or out-of-alphabet sequences (record + position)."""
    out = []
    for rec in records:
        seq = alphabet.normalise(rec.seq)
        if not seq:
            raise ValueError(f"record {rec.name!r}: empty sequence")
        if len(seq) < min_length:
            raise ValueError(f"record {rec.name!r}: {len(seq)} nt is shorter than the minimum {min_length}")
        if max_length is not None and len(seq) > max_length:
            raise ValueError(
                f"record {rec.name!r}: length {len(seq)} exceeds the maximum length {max_length}"
            )
        pos = alphabet.invalid_position(seq)
        if pos is not None:
            raise ValueError(
                f"record {rec.name!r}, position {pos}: character {seq[pos - 1]!r} is not in the "
                f"{alphabet.name} alphabet {alphabet.letters!r}"
            )
        out.append(Record(rec.name, seq))
    return out


def write_fasta(path: str | Path, records: Iterable[Record], width: int = 0) -> Path:
    """Write records as FASTA (``width`` > 0 wraps sequence lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for rec in records:
            fh.write(f">{rec.name}\n")
            if width > 0:
                fh.writelines(rec.seq[i : i + width] + "\n" for i in range(0, len(rec.seq), width))
            else:
                fh.write(rec.seq + "\n")
    return path
