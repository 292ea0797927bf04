"""Reference statistics of natural sequences and ``evaluate_fasta``: how natural do samples look?

Reference (``data/sequences/reference_{rna,dna}.json``, derived from the held-out natural sequences): 3- and
6-mer spectra; RNA: ViennaRNA MFE per nt and base-paired fraction; DNA: JASPAR 2024 CORE vertebrate motif hit
rates of natural enhancers. Build them with ``python -m molgen.sequences.evaluate rna|dna [--data PATH]``.

``evaluate_fasta`` evaluates every record it can read and lists the rest under ``skipped``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molgen.errors import InputError, Skipped
from molgen.sequences.alphabets import DNA, RNA, Alphabet
from molgen.sequences.data import load_dataset
from molgen.sequences.io import Record, read_records, screen
from molgen.sequences.metrics import fold_stats, jaspar_pwms, kmer_frequencies, motif_hits, pearson
from molgen.sequences.pretrained import SHIPPED_DIR, default_checkpoint, load_pretrained

MAX_FOLD = 1000  # natural sequences folded for the reference


def reference_path(modality: str) -> Path:
    return SHIPPED_DIR / f"reference_{modality}.json"


def infer_modality(seqs: list[str]) -> str:
    letters = set("".join(seqs).upper())
    return "rna" if "U" in letters and "T" not in letters else "dna"


def sequence_stats(seqs: list[str], modality: str, motif_seqs: list[str] | None = None) -> dict[str, Any]:
    """k-mer spectra plus folding (RNA) or motif (DNA) statistics of ``seqs``."""
    alphabet = RNA if modality == "rna" else DNA
    stats: dict[str, Any] = {
        "modality": modality,
        "n": len(seqs),
        "mean_length": float(np.mean([len(s) for s in seqs])),
        "kmer3": kmer_frequencies(seqs, alphabet, 3).tolist(),
        "kmer6": kmer_frequencies(seqs, alphabet, 6).tolist(),
    }
    if modality == "rna":
        mfe, bp = fold_stats(seqs[:MAX_FOLD])
        stats["mfe_per_nt"], stats["bp_fraction"] = mfe.round(5).tolist(), bp.round(5).tolist()
    else:
        ids, pwm, widths = jaspar_pwms()
        hits = motif_hits(motif_seqs if motif_seqs is not None else seqs, pwm, widths)
        stats["motif_ids"], stats["motif_hit_rate"] = list(ids), hits.mean(0).round(5).tolist()
    return stats


def build_reference(modality: str, root: str | Path | None = None) -> dict[str, Any]:
    """Reference from the held-out split; DNA motif rates from all natural enhancers (train + held-out)."""
    test, train = load_dataset(modality, root, "test"), load_dataset(modality, root, "train")
    seqs = [r.seq for r in test.records]
    motif_seqs = None
    if modality == "dna":
        motif_seqs = [r.seq for d in (train, test) for r, y in zip(d.records, d.labels) if y == 1]
    ref = sequence_stats(seqs, modality, motif_seqs)
    train_seqs = [r.seq for r in train.records]
    alphabet = test.alphabet
    ref["natural_baseline"] = {  # train vs held-out: what natural sequences score against the reference
        f"kmer{k}_r": pearson(kmer_frequencies(train_seqs, alphabet, k), np.array(ref[f"kmer{k}"]))
        for k in (3, 6)
    }
    ref["source"] = "held-out split of " + (
        "Rfam 14.2 seeds" if modality == "rna" else "iEnhancer-2L layer 1"
    )
    return ref


def usable_records(path: str | Path, alphabet: Alphabet | None = None) -> tuple[list[Record], list[Skipped]]:
    """The records of ``path`` that can be evaluated (in ``alphabet``; by default RNA or DNA, as the letters
    say) and the skipped rest; ``InputError`` when none is left."""
    records, skipped = read_records(path)
    alphabet = alphabet or (RNA if infer_modality([r.seq for r in records]) == "rna" else DNA)
    records, bad = screen(records, alphabet, file=str(path))
    skipped += bad
    if not records:
        first = f": {skipped[0]}" if skipped else ""
        raise InputError(f"no sequences to evaluate ({len(skipped)} records skipped{first})", str(path))
    return records, skipped


def load_reference(reference: str) -> dict[str, Any]:
    """``rna`` / ``dna`` -> shipped reference JSON; a FASTA/plain path -> its own statistics (with the records
    it skipped under ``skipped``)."""
    if reference in ("rna", "dna"):
        path = reference_path(reference)
        if not path.exists():
            raise FileNotFoundError(
                f"reference statistics {path} missing; build with "
                f"`python -m molgen.sequences.evaluate {reference}`"
            )
        return json.loads(path.read_text())
    records, skipped = usable_records(reference)
    seqs = [r.seq for r in records]
    return {**sequence_stats(seqs, infer_modality(seqs)), "skipped": [s.as_dict() for s in skipped]}


def model_bits_per_token(seqs: list[str], modality: str, alphabet: Alphabet) -> dict[str, Any]:
    """``model_bits_per_token``: NELBO (bits per nt) under the shipped default model (unconditional) of the
    sequences it can score (up to its maximum length), their number, and a note on what was left out."""
    from molgen.sequences.training import heldout_bits_per_token

    ckpt = default_checkpoint(modality)
    if not ckpt.exists():
        return {"model_bits_per_token": None, "model_bits_per_token_note": f"no shipped model at {ckpt}"}
    pre = load_pretrained(ckpt)
    limit = pre.model.config.max_length
    scored = [s for s in seqs if len(s) <= limit]
    out: dict[str, Any] = {"model_bits_per_token": None, "model_bits_per_token_n": len(scored)}
    if len(scored) < len(seqs):
        left_out = len(seqs) - len(scored)
        out["model_bits_per_token_note"] = f"{left_out} sequence(s) longer than the model's {limit} nt left out"
    if scored:
        x0 = torch.nn.utils.rnn.pad_sequence([alphabet.encode(s) for s in scored], True, alphabet.pad_id)
        out["model_bits_per_token"] = heldout_bits_per_token(pre.model, pre.process, x0, {})
    return out


def compare(samples: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Sample-vs-reference figures: k-mer Pearson r, folding or motif statistics."""
    from scipy.stats import wasserstein_distance

    out: dict[str, Any] = {
        f"kmer{k}_r": pearson(np.array(samples[f"kmer{k}"]), np.array(ref[f"kmer{k}"])) for k in (3, 6)
    }
    if "mfe_per_nt" in samples and "mfe_per_nt" in ref:
        for key in ("mfe_per_nt", "bp_fraction"):
            s, r = np.array(samples[key]), np.array(ref[key])
            out[f"{key}_mean"], out[f"{key}_natural"] = float(s.mean()), float(r.mean())
            out[f"{key}_w1"] = float(wasserstein_distance(s, r))
    if "motif_hit_rate" in samples and "motif_hit_rate" in ref:
        out["motif_hit_r"] = pearson(np.array(samples["motif_hit_rate"]), np.array(ref["motif_hit_rate"]))
        out["motif_hit_rate_mean"] = float(np.mean(samples["motif_hit_rate"]))
        out["motif_hit_rate_natural"] = float(np.mean(ref["motif_hit_rate"]))
    return out


def evaluate_fasta(path: str | Path, reference: str = "rna", nll: bool = True) -> dict[str, Any]:
    """Evaluate the usable sequences in ``path`` against a reference (``rna``, ``dna`` or a natural FASTA
    path); records that cannot be evaluated (here or in a reference file) are listed under ``skipped``."""
    ref = load_reference(str(reference))
    modality = ref["modality"]
    alphabet = RNA if modality == "rna" else DNA
    records, skipped = usable_records(path, alphabet)
    seqs = [r.seq for r in records]
    result: dict[str, Any] = {
        "file": str(path),
        "n": len(seqs),
        "modality": modality,
        "mean_length": float(np.mean([len(s) for s in seqs])),
    }
    result.update(compare(sequence_stats(seqs, modality), ref))
    if "natural_baseline" in ref:
        result["natural_baseline"] = ref["natural_baseline"]
    if nll:
        result.update(model_bits_per_token(seqs, modality, alphabet))
    result["skipped"] = [s.as_dict() for s in skipped] + ref.get("skipped", [])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build data/sequences/reference_{rna,dna}.json")
    parser.add_argument("modality", choices=["rna", "dna"])
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ref = build_reference(args.modality, args.data)
    out = Path(args.out) if args.out else reference_path(args.modality)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ref) + "\n")
    print(f"wrote {out}: n={ref['n']}, natural baseline {ref['natural_baseline']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
