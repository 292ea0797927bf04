"""RNA and DNA data sets read from a data path (never shipped), padded token tensors and length sampling.

Sources (see the project README for where to get them): Rfam 14.2 seed sequences, ArchiveII and bpRNA-1m(90)
for RNA; the iEnhancer-2L enhancer / non-enhancer sets (200 bp) for DNA.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from molgen.sequences.alphabets import DNA, RNA, Alphabet, infer_alphabet, pad_batch
from molgen.sequences.io import Record, parse_fasta, read_records, read_sequences

REPO_ROOT = Path(__file__).resolve().parents[2]
DNA_LABELS = ("non-enhancer", "enhancer")


def default_data_root() -> Path:
    """``../shared/data`` relative to the repository."""
    return REPO_ROOT.parent / "shared" / "data"


def resolve_data_root(path: str | Path | None) -> Path:
    root = Path(path) if path is not None else default_data_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data path {root} does not exist; pass --data PATH (the folder holding rna/ and dna/)"
        )
    return root


@dataclass
class SequenceSet:
    """Validated sequences of one alphabet, with optional integer labels and their names."""

    alphabet: Alphabet
    records: list[Record]
    labels: list[int] | None = None
    label_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        return [len(r.seq) for r in self.records]

    def tokens(self, length: int | None = None) -> torch.Tensor:
        """``[N, length]`` ids right-padded with the pad token."""
        return pad_batch([self.alphabet.encode(r.seq, r.name) for r in self.records], self.alphabet, length)


HOLDOUT = 0.05  # share of records held out by a hash of their name


def holdout(name: str, fraction: float) -> bool:
    """Deterministic split: a record is held out when a hash of its name falls below ``fraction``."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def clean(
    records: Sequence[Record], alphabet: Alphabet, max_length: int, min_length: int = 1
) -> list[Record]:
    """Keep records inside the alphabet and length range (for curated corpora with IUPAC codes)."""
    out = []
    for rec in records:
        seq = alphabet.normalise(rec.seq)
        if min_length <= len(seq) <= max_length and alphabet.invalid_position(seq) is None:
            out.append(Record(rec.name, seq))
    return out


def load_rna(
    root: str | Path | None = None,
    source: str = "rfam",
    split: str = "train",
    max_length: int = 128,
    holdout_fraction: float = HOLDOUT,
) -> SequenceSet:
    """RNA sequences <= ``max_length`` nt with only A/C/G/U (T read as U); ``split`` is train, test or all.

    ``source``: ``rfam`` (Rfam 14.2 seeds), ``archiveII`` or ``bprna`` (bpRNA-1m(90) short entries).
    """
    root = resolve_data_root(root)
    if source == "rfam":
        records = read_sequences(root / "rna" / "rfam14.2_seed_sequences.fasta.gz")
    elif source == "archiveII":
        with gzip.open(root / "rna" / "archiveII.csv.gz", "rt") as fh:
            records = [Record(row["id"], row["sequence"]) for row in csv.DictReader(fh)]
    elif source == "bprna":
        with gzip.open(root / "rna" / "bpRNA-1m_90_short.dbn.gz", "rt") as fh:
            lines = [ln for ln in fh if ln.startswith(">") or not set(ln.strip()) <= set(".()[]{}<>")]
        records = list(parse_fasta(lines, "bpRNA"))
    else:
        raise ValueError(f"unknown RNA source {source!r}; choose rfam, archiveII or bprna")
    records = clean(records, RNA, max_length)
    return SequenceSet(RNA, _split(records, split, holdout_fraction))


def _split(records: list[Record], split: str, fraction: float) -> list[Record]:
    if split == "all":
        return records
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose train, test or all")
    return [r for r in records if holdout(r.name, fraction) == (split == "test")]


def load_enhancers(root: str | Path | None = None, split: str = "train") -> SequenceSet:
    """iEnhancer-2L layer 1: 200 bp human enhancers (label 1) and non-enhancers (label 0).

    ``train`` is the cross-validation set (1,484 + 1,484); ``test`` the independent set minus the sequences
    that also occur in the cross-validation set (100 of its 200 enhancers do).
    """
    root = resolve_data_root(root) / "dna"
    part = {"train": "cv", "test": "ind"}.get(split)
    if part is None:
        raise ValueError(f"unknown split {split!r}; choose train or test")
    seen = set()
    if split == "test":
        for kind in ("enhancer", "non"):
            seen |= {DNA.normalise(r.seq) for r in read_sequences(root / f"iEnhancer_layer1_{kind}.cv.txt")}
    records, labels = [], []
    for label, kind in ((1, "enhancer"), (0, "non")):
        for rec in clean(read_sequences(root / f"iEnhancer_layer1_{kind}.{part}.txt"), DNA, 200, 200):
            if rec.seq not in seen:
                records.append(Record(f"{kind}|{rec.name}", rec.seq))
                labels.append(label)
    return SequenceSet(DNA, records, labels, DNA_LABELS)


def load_dataset(modality: str, root: str | Path | None = None, split: str = "train", **kw) -> SequenceSet:
    """The default training corpus of a modality: ``rna`` -> Rfam seeds, ``dna`` -> iEnhancer layer 1."""
    if modality == "rna":
        return load_rna(root, split=split, **kw)
    if modality == "dna":
        return load_enhancers(root, split=split)
    raise ValueError(f"unknown sequence modality {modality!r}; choose rna or dna")


def load_fasta(path: str | Path, alphabet: Alphabet | None = None, max_length: int | None = None) -> SequenceSet:
    """A user's FASTA (or one sequence per line) over any alphabet (``custom_alphabet``), or when None the
    alphabet inferred from the file (``infer_alphabet``). Unreadable records, records with letters outside the
    alphabet and records longer than ``max_length`` are left out with a warning naming them."""
    import warnings

    records, skipped = read_records(path)
    alphabet = alphabet or infer_alphabet(r.seq for r in records)
    kept = clean(records, alphabet, max_length or max((len(r.seq) for r in records), default=0))
    names = {k.name for k in kept}
    dropped = [s.record for s in skipped] + [r.name for r in records if r.name not in names]
    if dropped:
        warnings.warn(f"{path}: left out {len(dropped)} record(s) unreadable, too long or outside the alphabet "
                      f"{alphabet.letters!r}: {', '.join(map(str, dropped[:5]))}{' ...' if len(dropped) > 5 else ''}",
                      stacklevel=2)
    if not kept:
        raise ValueError(f"{path}: no usable sequences over the alphabet {alphabet.letters!r}")
    return SequenceSet(alphabet, kept)


class LengthDistribution:
    """Empirical length distribution: ``p(L) = count(L) / N``; samples lengths with a generator."""

    def __init__(self, counts: dict[int, int]):
        if not counts or any(n < 0 for n in counts.values()) or sum(counts.values()) == 0:
            raise ValueError("a length distribution needs at least one positive count")
        self.lengths = torch.tensor(sorted(counts), dtype=torch.long)
        self.probs = torch.tensor([counts[k] for k in sorted(counts)], dtype=torch.float64)
        self.probs /= self.probs.sum()

    @classmethod
    def from_lengths(cls, lengths: Sequence[int]) -> LengthDistribution:
        counts: dict[int, int] = {}
        for n in lengths:
            counts[int(n)] = counts.get(int(n), 0) + 1
        return cls(counts)

    @property
    def max_length(self) -> int:
        return int(self.lengths.max())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        return self.lengths[idx]

    def to_dict(self) -> dict[str, int]:
        return {str(int(k)): int(round(float(p) * 1e9)) for k, p in zip(self.lengths, self.probs)}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> LengthDistribution:
        return cls({int(k): int(v) for k, v in d.items()})
