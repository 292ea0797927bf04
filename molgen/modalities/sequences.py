"""DNA, RNA and any user's sequences from the masked-diffusion models of ``molgen.sequences`` (one class, one
instance per alphabet; ``sequences`` takes any alphabet, from a model trained with ``molgen train sequences``).

Presets: ``default`` is the cached ancestral sampler (a model call only when a token is unmasked) with 32
steps; ``guided`` is the plain ancestral sampler with 16 steps, whose every transition guidance can branch.
Naturalness of a design: minus its NELBO under the model in bits per nucleotide
(``molgen.sequences.training.sequence_bits``); rewards read the sequence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from molgen.modalities.base import Design, Modality, Preset

ANY_ALPHABET = "sequences"  # the instance that takes a model of any alphabet


def _draw(n: int, g: torch.Generator) -> int:
    """Uniform in 0..n-1."""
    return int(torch.randint(n, (1,), generator=g))


def rearrange(seq: str, donor: str, g: torch.Generator) -> str:
    """``seq`` rearranged by one of two moves (equal odds), its length kept:

    - translocation: ``donor[i:i+w]`` written over ``seq[j:j+w]``, w uniform in 2..max(2, n // 2) (n the
      shorter length), i and j uniform where the segment fits; the donor may be ``seq`` itself (a duplication);
    - shift: ``seq[i:j+1]`` rotated by one place either way (a deletion and an insertion of the same letter),
      which moves every letter between i and j one place along and the letter at one end to the other.

    A point mutation cannot move a motif out of another's way or bring motifs found in two designs together;
    these moves can, without breaking what they move."""
    n = min(len(seq), len(donor))
    if n < 2:
        return seq
    if _draw(2, g):
        w = 2 + _draw(max(2, n // 2) - 1, g)
        i, j = _draw(len(donor) - w + 1, g), _draw(len(seq) - w + 1, g)
        return seq[:j] + donor[i:i + w] + seq[j + w:]
    i, j = sorted((_draw(len(seq), g), _draw(len(seq), g)))
    if i == j:
        return seq
    mid = seq[i:j + 1]
    mid = mid[1:] + mid[0] if _draw(2, g) else mid[-1] + mid[:-1]
    return seq[:i] + mid + seq[j + 1:]


class Sequences(Modality):
    extension = "fasta"
    payload = "sequence"
    naturalness_label = "-NELBO (bits/nt)"
    cli_module = "molgen.sequences.cli"
    presets = {
        "default": Preset("default", "cached_ancestral", 32),
        "guided": Preset("guided", "ancestral", 16),
    }

    def __init__(self, name: str) -> None:
        self.name = name

    def solvers(self) -> list[str]:
        """The masked-diffusion samplers (``molgen.diffusion.discrete``)."""
        from molgen.diffusion.discrete import DISCRETE_SAMPLERS

        return sorted(DISCRETE_SAMPLERS)

    def default_checkpoint(self) -> Path:
        from molgen.sequences.pretrained import default_checkpoint

        if self.name == ANY_ALPHABET:
            raise ValueError("the sequences modality has no shipped model: train a prior on your FASTA with "
                             "`molgen train sequences --fasta FILE --out DIR` and give DIR/model.pt as checkpoint")
        return default_checkpoint(self.name)

    def load(self, checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> Any:
        """The pretrained model; a checkpoint of another alphabet is refused."""
        from molgen.sequences.pretrained import load_pretrained

        path = checkpoint or self.default_checkpoint()
        return self.checked(load_pretrained(path, device), path)

    def checked(self, pre: Any, path: str | Path) -> Any:
        """``pre`` when its alphabet is this modality's, else an ``InputError`` naming the checkpoint."""
        from molgen.errors import InputError

        if self.name != ANY_ALPHABET and pre.alphabet.name.lower() != self.name:
            raise InputError(f"a {pre.alphabet.name} model, not a {self.name} one", str(path))
        return pre

    def sample(self, model: Any, n: int, *, preset: Preset, seed: int, length: int | None = None,
               device: str | torch.device = "cpu") -> list[Any]:
        from molgen.sequences.sampling import generate

        return generate(model, n, solver=preset.solver, steps=preset.steps, seed=seed, length=length, device=device,
                        options=dict(preset.options) or None)

    def write(self, samples: Sequence[Any], ids: Sequence[str], path: Path) -> list[dict[str, Any]]:
        from molgen.sequences.io import Record, write_fasta

        records = [Record(i, r.seq) for r, i in zip(samples, ids)]
        write_fasta(path, records)
        if self.name == ANY_ALPHABET:
            return [{"length": len(r.seq), "sequence": r.seq} for r in records]
        return [{"length": len(r.seq), "gc": sum(c in "GC" for c in r.seq) / max(len(r.seq), 1), "sequence": r.seq}
                for r in records]

    def problem(self, *, preset: Preset, checkpoint: str | Path | None = None, length: int | None = None,
                condition: str | None = None, chunk: int = 16) -> Any:
        from molgen.diffusion.discrete import DiscreteSampler
        from molgen.guidance.tasks import Draw, Problem, pairwise_hamming, result_names, snapshot
        from molgen.guidance.value import TokenValueNet, masking_noise
        from molgen.sequences.alphabets import alphabet_card
        from molgen.sequences.evaluate import load_reference
        from molgen.sequences.io import Record, write_fasta
        from molgen.sequences.metrics import kmer_frequencies, pearson
        from molgen.sequences.pretrained import load_pretrained
        from molgen.sequences.training import sequence_bits

        path = Path(checkpoint) if checkpoint else self.default_checkpoint()
        with snapshot(path, self.name) as (copy, digest):
            pre = self.checked(load_pretrained(copy), path)
        label = pre.label_id(condition) if condition is not None else None
        max_len = pre.model.config.max_length
        if length is not None and not 1 <= length <= max_len:
            raise ValueError(f"--length must lie in 1..{max_len} for this {self.name} model, got {length}")
        sampler = DiscreteSampler(pre.model, pre.process, preset.solver, steps=preset.steps,
                                  options=dict(preset.options) or None)
        ref = None if self.name == ANY_ALPHABET else load_reference(self.name)

        def draw(outputs: int, per: int, g: torch.Generator) -> list[Any]:
            lengths = (torch.full((outputs,), length, dtype=torch.long) if length is not None
                       else pre.lengths.sample(outputs, g))
            x_T = pre.process.prior(lengths.repeat_interleave(per), int(lengths.max()))
            cond = None if label is None else {"labels": torch.full((len(x_T),), label, dtype=torch.long)}
            return [Draw(x_T, None, cond)]

        def decode(tokens: Tensor) -> list[str]:
            return [pre.alphabet.decode(row) for row in tokens]

        def natural(res: Any) -> dict[str, float]:
            tokens = res.samples
            kmer = {} if ref is None else {
                "kmer3_r": pearson(kmer_frequencies(decode(tokens), pre.alphabet, 3), np.asarray(ref["kmer3"]))}
            return {"nll_bits_per_token": float(sequence_bits(pre.model, pre.process, tokens).mean()), **kmer,
                    "diversity": pairwise_hamming(tokens)}

        def write(path_out: str | Path, res: Any, names: Sequence[str] | None = None) -> None:
            write_fasta(path_out, [Record(f"{name} reward={float(r):.4g}", s) for name, s, r in
                                   zip(result_names(res, names), decode(res.samples), res.rewards.tolist())])

        settings = {**preset.as_dict(), "length": length, "condition": condition,
                    "alphabet": alphabet_card(pre.alphabet)}
        return Problem(
            self.name, sampler, path, draw, decode, natural, write,
            value_net=lambda: TokenValueNet(pre.model.config.vocab_size, pad_id=pre.alphabet.pad_id),
            noise=masking_noise(pre.process), clean=lambda res: (res.samples, None), sha256=digest, settings=settings,
        )

    def designs(self, problem: Any, result: Any) -> list[Design]:
        return self.with_naturalness(problem, [Design(sequence=s) for s in problem.decode(result.samples)])

    def with_naturalness(self, problem: Any, designs: Sequence[Design]) -> list[Design]:
        from molgen.sequences.training import sequence_bits

        x0, _ = self.encode(problem, designs)
        bits = sequence_bits(problem.sampler.model, problem.sampler.process, x0)
        return [dataclasses.replace(d, naturalness=-float(b)) for d, b in zip(designs, bits.tolist())]

    def encode(self, problem: Any, designs: Sequence[Design]) -> tuple[Tensor, None]:
        from molgen.sequences.alphabets import alphabet_from_card

        alphabet = alphabet_from_card(problem.settings["alphabet"])
        seqs = [d.sequence or "" for d in designs]
        x = torch.full((len(seqs), max(len(s) for s in seqs)), alphabet.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = alphabet.encode(s, record=f"design {i}")
        return x, None

    def refinable(self, design: Design) -> bool:
        return bool(design.sequence)

    def recombine(self, design: Design, donor: Design, g: torch.Generator) -> Design:
        return Design(sequence=rearrange(design.sequence or "", donor.sequence or "", g))

    def distance(self, designs: Sequence[Design]) -> Callable[[int, int], float]:
        from molgen.campaign.selection import hamming

        seqs = [d.sequence or "" for d in designs]
        return lambda i, j: hamming(seqs[i], seqs[j])

    def report_columns(self, sequences: Sequence[str]) -> dict[str, list[Any]]:
        """RNA: the sequence over its MFE structure and the MFE (ViennaRNA); DNA: GC content and the sequence;
        any other alphabet: the sequence."""
        if self.name == "rna":
            import RNA

            folds = [RNA.fold(s) for s in sequences]
            return {"sequence / MFE structure": [f"{s}\n{f[0]}" for s, f in zip(sequences, folds)],
                    "MFE (kcal/mol)": [float(f[1]) for f in folds]}
        if self.name == ANY_ALPHABET:
            return {"sequence": list(sequences)}
        return {"GC": [sum(c in "GC" for c in s) / max(len(s), 1) for s in sequences], "sequence": list(sequences)}

    def noise_to(self, problem: Any, x0: Tensor, mask: Tensor | None, t: float, g: torch.Generator) -> Tensor:
        """x_t ~ q(x_t | x_0): each letter masked independently with probability 1 - alpha(t); padding kept."""
        return problem.sampler.process.corrupt(x0, torch.full((len(x0),), float(t), dtype=torch.float64), g)

    def partial_sampler(self, problem: Any, t: float) -> Any:
        """The masked-diffusion sampler on the time grid t = t_0 > ... > 0 with ceil(steps * t) transitions."""
        from molgen.diffusion.discrete import DiscreteSampler

        smp = problem.sampler
        part = DiscreteSampler(smp.model, smp.process, smp.solver, smp.steps, options=smp.options)
        part.grid = torch.linspace(float(t), 0.0, max(1, math.ceil(smp.steps * t)) + 1, dtype=torch.float64)
        return part
