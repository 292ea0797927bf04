"""Reading user files: one place for existence, gzip (by suffix, any case) and the error that names the file."""

from __future__ import annotations

import gzip
from pathlib import Path

from molgen.errors import InputError


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, decompressed when its name ends in ``.gz`` (any case); a missing file is a
    ``FileNotFoundError``, a broken gzip stream an ``InputError`` naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise InputError(f"not a valid gzip file ({err})", str(path)) from None
    return raw
