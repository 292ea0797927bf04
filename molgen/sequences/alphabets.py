"""Token alphabets for biological sequences, with a padding and an absorbing mask token.

Token ids are ``0 .. K-1`` for the K letters of the alphabet, ``K`` for padding and ``K + 1`` for the mask
token of masked (absorbing-state) diffusion. A denoiser predicts logits over the K letters only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Alphabet:
    """A set of letters plus pad and mask tokens; ``aliases`` map accepted input letters onto letters."""

    name: str
    letters: str
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of data letters K (what a denoiser predicts over)."""
        return len(self.letters)

    @property
    def pad_id(self) -> int:
        return len(self.letters)

    @property
    def mask_id(self) -> int:
        return len(self.letters) + 1

    @property
    def vocab_size(self) -> int:
        """K letters + pad + mask."""
        return len(self.letters) + 2

    def normalise(self, seq: str) -> str:
        """Upper-case and map aliases (e.g. T -> U for RNA); whitespace is removed."""
        seq = "".join(seq.split()).upper()
        return "".join(self.aliases.get(c, c) for c in seq)

    def encode(self, seq: str, record: str = "<input>") -> torch.Tensor:
        """Letters -> LongTensor of ids; a character outside the alphabet raises (record, position)."""
        seq = self.normalise(seq)
        if not seq:
            raise ValueError(f"record {record!r}: empty sequence")
        lookup = {c: i for i, c in enumerate(self.letters)}
        ids = []
        for pos, c in enumerate(seq, start=1):
            if c not in lookup:
                raise ValueError(
                    f"record {record!r}, position {pos}: character {c!r} is not in the {self.name} "
                    f"alphabet {self.letters!r}"
                )
            ids.append(lookup[c])
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Ids -> letters; padding ends the sequence, a remaining mask token is written as ``'-'``."""
        out = []
        for i in ids.tolist() if isinstance(ids, torch.Tensor) else ids:
            if i == self.pad_id:
                break
            out.append("-" if i == self.mask_id else self.letters[i])
        return "".join(out)

    def invalid_position(self, seq: str) -> int | None:
        """1-based position of the first character outside the alphabet (after normalising), else None."""
        seq = self.normalise(seq)
        for pos, c in enumerate(seq, start=1):
            if c not in self.letters:
                return pos
        return None


DNA = Alphabet("DNA", "ACGT", {"U": "T"})
RNA = Alphabet("RNA", "ACGU", {"T": "U"})
PROTEIN = Alphabet("protein", "ACDEFGHIKLMNPQRSTVWY")
ALPHABETS: dict[str, Alphabet] = {"dna": DNA, "rna": RNA, "protein": PROTEIN}


def get_alphabet(name: str) -> Alphabet:
    try:
        return ALPHABETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown alphabet {name!r}; choose one of {sorted(ALPHABETS)}") from None


def custom_alphabet(letters: str, name: str = "custom") -> Alphabet:
    """An alphabet of the given distinct letters (case-sensitive, so 20+ states can use both cases and digits);
    a shipped name (``dna``, ``rna``, ``protein``) returns that alphabet."""
    if letters.lower() in ALPHABETS:
        return ALPHABETS[letters.lower()]
    if not letters or len(set(letters)) != len(letters) or any(c.isspace() or c in ">;-" for c in letters):
        raise ValueError(f"an alphabet needs distinct letters, none of them whitespace, '>', ';' or '-', "
                         f"got {letters!r}")
    return CaseSensitiveAlphabet(name, letters)


@dataclass(frozen=True)
class CaseSensitiveAlphabet(Alphabet):
    """A user's alphabet: letters are read as written (no upper-casing, no aliases)."""

    def normalise(self, seq: str) -> str:
        return "".join(seq.split())


def infer_alphabet(seqs: Iterable[str]) -> Alphabet:
    """The shipped alphabet that holds every letter of ``seqs`` (DNA, then RNA, then protein), else a custom one
    of their distinct letters in sorted order."""
    letters = set().union(*(set("".join(s.split())) for s in seqs))
    for alphabet in ALPHABETS.values():
        if {c.upper() for c in letters} <= set(alphabet.letters):
            return alphabet
    return custom_alphabet("".join(sorted(letters)))


def alphabet_card(alphabet: Alphabet) -> str | dict[str, str]:
    """How a checkpoint's card records its alphabet: a shipped alphabet's name, else its name and letters."""
    if ALPHABETS.get(alphabet.name.lower()) == alphabet:
        return alphabet.name.lower()
    return {"name": alphabet.name, "letters": alphabet.letters}


def alphabet_from_card(value: str | dict[str, str]) -> Alphabet:
    """The inverse of ``alphabet_card``."""
    if isinstance(value, dict):
        return custom_alphabet(value["letters"], value.get("name", "custom"))
    return get_alphabet(value)


def pad_batch(seqs: Sequence[torch.Tensor], alphabet: Alphabet, length: int | None = None) -> torch.Tensor:
    """Stack id tensors into ``[B, length]`` right-padded with ``pad_id``; too long a sequence raises."""
    length = max(len(s) for s in seqs) if length is None else length
    out = torch.full((len(seqs), length), alphabet.pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the padded length {length}")
        out[i, : len(s)] = s
    return out
