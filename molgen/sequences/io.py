"""FASTA / plain-text sequence readers and a FASTA writer, with errors that name the file, record and position.

``read_records`` reads everything it can and returns the rest as ``Skipped`` records (a line that is not UTF-8
text, text before the first FASTA header); ``screen`` does the same for empty records, letters outside the
alphabet and lengths outside a range. ``read_sequences`` and ``validate`` raise the first of those as an
``InputError`` instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from molgen.errors import InputError, Skipped
from molgen.files import read_bytes
from molgen.sequences.alphabets import Alphabet


@dataclass(frozen=True)
class Record:
    name: str
    seq: str
    number: int = field(default=0, compare=False)  # 1-based position in its file; 0 when not read from one
    line: int = field(default=0, compare=False)  # the line of its header (FASTA) or of its sequence (plain)

    @property
    def label(self) -> str:
        """How errors name the record: ``3 (seq_7)`` when read from a file, else ``'seq_7'``."""
        return f"{self.number} ({self.name})" if self.number else repr(self.name)


def _read_lines(path: str | Path) -> list[bytes]:
    return read_bytes(path).splitlines()


def _decode(line: bytes | str) -> tuple[str, str | None]:
    """(text, None), or (text with replacement characters, what is wrong) for a line that is not UTF-8."""
    if isinstance(line, str):
        return line, None
    try:
        return line.decode(), None
    except UnicodeDecodeError as err:
        return line.decode(errors="replace"), f"byte {line[err.start]:#04x} at column {err.start + 1} is not UTF-8"


def _fasta_record(head: tuple[int, str, str | None], body: list[tuple[int, str, str | None]], number: int,
                  source: str) -> Record | InputError:
    line_no, text, _ = head
    rec = Record(text[1:].strip() or f"{Path(source).name}:{line_no}", "".join(t for _, t, _ in body), number, line_no)
    for n, _, bad in (head, *body):
        if bad is not None:
            return InputError(bad, source, rec.label, f"line {n}")
    return rec


def _fasta_items(lines: Iterable[bytes | str], source: str) -> Iterator[Record | InputError]:
    number, head, body, orphan = 0, None, [], False
    for line_no, raw in enumerate(lines, start=1):
        text, bad = _decode(raw)
        text = text.strip()
        if not text or text.startswith(";"):
            continue
        if text.startswith(">"):
            if head is not None:
                yield _fasta_record(head, body, number, source)
            number, head, body = number + 1, (line_no, text, bad), []
        elif head is None:
            if not orphan:
                yield InputError("sequence text before the first '>' header", source, position=f"line {line_no}")
            orphan = True
        else:
            body.append((line_no, text, bad))
    if head is not None:
        yield _fasta_record(head, body, number, source)


def _plain_items(lines: Iterable[bytes | str], source: str) -> Iterator[Record | InputError]:
    number = 0
    for line_no, raw in enumerate(lines, start=1):
        text, bad = _decode(raw)
        text = text.strip()
        if text and not text.startswith("#"):
            number += 1
            rec = Record(f"{Path(source).name}:{line_no}", text, number, line_no)
            yield rec if bad is None else InputError(bad, source, rec.label, f"line {line_no}")


def _strict(items: Iterator[Record | InputError]) -> Iterator[Record]:
    for item in items:
        if isinstance(item, InputError):
            raise item
        yield item


def parse_fasta(lines: Iterable[bytes | str], source: str = "<input>") -> Iterator[Record]:
    """FASTA records (multi-line sequences joined); text before the first header raises."""
    return _strict(_fasta_items(lines, source))


def parse_plain(lines: Iterable[bytes | str], source: str = "<input>") -> Iterator[Record]:
    """One sequence per non-empty line; records are named ``source:line``."""
    return _strict(_plain_items(lines, source))


def _items(path: str | Path) -> Iterator[Record | InputError]:
    lines = _read_lines(path)
    parser = _fasta_items if any(ln.startswith(b">") for ln in lines) else _plain_items
    return parser(lines, str(path))


def read_records(path: str | Path) -> tuple[list[Record], list[Skipped]]:
    """FASTA (any line starts with '>') or plain one-per-line text, gzip or not: the records it can read,
    and the rest as ``Skipped``."""
    records, skipped = [], []
    for item in _items(path):
        if isinstance(item, InputError):
            skipped.append(Skipped.of(item))
        else:
            records.append(item)
    return records, skipped


def read_sequences(path: str | Path) -> list[Record]:
    """Like ``read_records``, raising the first unreadable record as an ``InputError``."""
    return list(_strict(_items(path)))


def check_record(
    rec: Record, alphabet: Alphabet, max_length: int | None = None, min_length: int = 1, file: str | None = None
) -> Record:
    """The record normalised; ``InputError`` for an empty, too short/long or out-of-alphabet sequence."""
    seq = alphabet.normalise(rec.seq)
    if not seq:
        raise InputError("empty sequence", file, rec.label)
    if len(seq) < min_length:
        raise InputError(f"{len(seq)} nt is shorter than the minimum {min_length}", file, rec.label)
    if max_length is not None and len(seq) > max_length:
        raise InputError(f"length {len(seq)} exceeds the maximum length {max_length}", file, rec.label)
    pos = alphabet.invalid_position(seq)
    if pos is not None:
        raise InputError(
            f"character {seq[pos - 1]!r} is not in the {alphabet.name} alphabet {alphabet.letters!r}",
            file, rec.label, pos,
        )
    return dataclasses.replace(rec, seq=seq)


def validate(
    records: Iterable[Record], alphabet: Alphabet, max_length: int | None = None, min_length: int = 1,
    file: str | None = None,
) -> list[Record]:
    """Normalise records; raise the first bad one (``check_record``)."""
    return [check_record(rec, alphabet, max_length, min_length, file) for rec in records]


def screen(
    records: Iterable[Record], alphabet: Alphabet, max_length: int | None = None, min_length: int = 1,
    file: str | None = None,
) -> tuple[list[Record], list[Skipped]]:
    """Normalise records; the bad ones (``check_record``) are returned as ``Skipped`` instead of raising."""
    good, skipped = [], []
    for rec in records:
        try:
            good.append(check_record(rec, alphabet, max_length, min_length, file))
        except InputError as err:
            skipped.append(Skipped.of(err))
    return good, skipped


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
