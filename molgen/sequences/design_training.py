"""Data and training of the structure-conditioned RNA design model p(sequence | dot-bracket).

Training pairs (read from the data path at training time, never shipped):

* synthetic: sequences of 16-200 nt with their exact ViennaRNA MFE structure (``structure.synthetic_pair``),
  made once per run folder from its seed (``synthetic.pt``);
* natural: bpRNA-1m(90) short entries outside the held-out split, and the ArchiveII families outside
  ``HELDOUT_FAMILIES``, pseudoknot-free, cut to windows of at most the model's length (a pair that crosses a
  window's edge becomes unpaired).

Held out for development and benchmarks (``heldout_targets``): ArchiveII's tRNA, 5S rRNA and SRP RNA
families, and a 10 % hash split of bpRNA; exact duplicates of a held-out sequence or structure are removed
from the natural training pairs.

    molgen train rna --design --max-minutes 60 --out runs/sequences/rna_design
"""

from __future__ import annotations

import argparse
import csv
import functools
import gzip
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from molgen.batching import ResumableLoader, SizeBucketBatches
from molgen.errors import InputError
from molgen.progress import progress
from molgen.sequences.alphabets import RNA
from molgen.sequences.data import holdout, resolve_data_root
from molgen.sequences.structure import (
    PSEUDOKNOT_BRACKETS,
    parse_dot_bracket,
    partners_tensor,
    sharp_hairpins,
    synthetic_pair,
)

HELDOUT_FAMILIES = ("tRNA", "5s", "srp")
BPRNA_HELDOUT = 0.1
MIN_LENGTH, MAX_LENGTH = 16, 200
LENGTH_BUCKET = 8  # a training batch holds sequences of lengths within one bucket of this many nt
P_UNSPECIFIED = 0.05  # classifier-free dropout: a training structure replaced by "unspecified"
DATA_NOTE = (
    "synthetic ViennaRNA MFE pairs (16-200 nt) + bpRNA-1m(90) short entries (90 % hash split) + ArchiveII "
    f"families other than {', '.join(HELDOUT_FAMILIES)} (windows <= 200 nt), pseudoknot-free"
)

Entry = tuple[str, str, str]  # (name, sequence, dot-bracket)


def read_archive(root: Path) -> list[tuple[str, str, str, str]]:
    """ArchiveII rows as (name, family, sequence, dot-bracket)."""
    with gzip.open(root / "rna" / "archiveII.csv.gz", "rt") as fh:
        return [(r["id"], r["id"].split("_")[0], RNA.normalise(r["sequence"]), r["structure"])
                for r in csv.DictReader(fh)]


def read_bprna(root: Path) -> list[Entry]:
    """bpRNA-1m(90) short entries as (name, sequence, dot-bracket)."""
    with gzip.open(root / "rna" / "bpRNA-1m_90_short.dbn.gz", "rt") as fh:
        lines = [ln.strip() for ln in fh if ln.strip()]
    out = []
    for k in range(0, len(lines) - 2, 3):
        if lines[k].startswith(">"):
            out.append((lines[k][1:].split()[0], RNA.normalise(lines[k + 1]), lines[k + 2]))
    return out


def _nested(seq: str, structure: str) -> bool:
    return (len(seq) == len(structure) and RNA.invalid_position(seq) is None
            and not set(structure) & set(PSEUDOKNOT_BRACKETS) and set(structure) <= set("().")
            and "(" in structure)


@functools.lru_cache(maxsize=4)
def split_entries(root: Path) -> tuple[list[Entry], list[Entry]]:
    """(training, held-out) nested entries; held-out = the held-out families and bpRNA's hash split."""
    train, held = [], []
    for name, family, seq, structure in read_archive(root):
        if _nested(seq, structure):
            (held if family in HELDOUT_FAMILIES else train).append((name, seq, structure))
    for name, seq, structure in read_bprna(root):
        if _nested(seq, structure):
            (held if holdout(name, BPRNA_HELDOUT) else train).append((name, seq, structure))
    seen = {s for e in held for s in e[1:]}
    return [e for e in train if e[1] not in seen and e[2] not in seen], held


def heldout_targets(root: str | Path | None, n: int, lengths: tuple[int, int], seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct held-out target structures with lengths in ``lengths`` (inclusive) that some sequence can
    fold into under ViennaRNA's model (no hairpin under 3 nt), drawn with ``seed``; (name, dot-bracket)."""
    _, held = split_entries(resolve_data_root(root))
    pool, seen = [], set()
    for name, _, structure in held:
        if lengths[0] <= len(structure) <= lengths[1] and structure not in seen:
            if not sharp_hairpins(parse_dot_bracket(structure)):
                seen.add(structure)
                pool.append((name, structure))
    random.Random(seed).shuffle(pool)
    return pool[:n]


def windows(seq: str, structure: str, max_length: int, rng: random.Random) -> Iterator[tuple[str, list[int]]]:
    """The entry itself, or (longer than ``max_length``) two random windows with pairs kept inside them."""
    partners = parse_dot_bracket(structure)
    if len(seq) <= max_length:
        yield seq, partners
        return
    for _ in range(2):
        a = rng.randrange(0, len(seq) - max_length + 1)
        b = a + max_length
        cut = [j - a if a <= j < b else -1 for j in partners[a:b]]
        if any(j >= 0 for j in cut):
            yield seq[a:b], cut


def synthetic_pairs(n: int, seed: int, lengths: tuple[int, int] = (MIN_LENGTH, MAX_LENGTH)) -> list[tuple[str, str]]:
    """``n`` (sequence, MFE structure) pairs with lengths uniform in ``lengths``."""
    rng = random.Random(seed)
    return [synthetic_pair(rng.randint(*lengths), rng) for _ in progress(range(n), desc="folding synthetic pairs")]


def encode(pairs: Sequence[tuple[str, Sequence[int]]], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [N, max_length] (padded) and partners [N, max_length] (-1 unpaired and after the end)."""
    tokens = torch.full((len(pairs), max_length), RNA.pad_id, dtype=torch.long)
    for i, (seq, _) in enumerate(pairs):
        tokens[i, : len(seq)] = RNA.encode(seq)
    return tokens, partners_tensor([p for _, p in pairs], max_length)


def training_pairs(root: Path, out: Path, n_synthetic: int, seed: int) -> tuple[list, list]:
    """(training, held-out) (sequence, partners) pairs; the synthetic part is cached in the run folder."""
    cache = out / "synthetic.json"
    if cache.exists():
        synthetic = json.loads(cache.read_text())
    else:
        synthetic = synthetic_pairs(n_synthetic, seed)
        out.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(synthetic))
    train_entries, held_entries = split_entries(root)
    rng = random.Random(seed)
    natural = [w for _, s, d in train_entries for w in windows(s, d, MAX_LENGTH, rng)]
    train = [(s, parse_dot_bracket(d)) for s, d in synthetic] + natural
    held = [w for _, s, d in held_entries for w in windows(s, d, MAX_LENGTH, rng)]
    return train, held


def run_train_design(args: argparse.Namespace) -> int:
    """``molgen train rna --design``: train and export the structure-conditioned model with its card."""
    from molgen.checkpoints import hardware, load_weights, read_init, save_checkpoint
    from molgen.sequences.data import LengthDistribution
    from molgen.sequences.model import DenoiserConfig, n_parameters
    from molgen.sequences.pretrained import default_checkpoint, load_pretrained
    from molgen.sequences.training import (
        NELBO_TIMES,
        MaskedDiffusionModule,
        fit,
        heldout_bits_per_token,
        train_command,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    train, held = training_pairs(resolve_data_root(args.data), out, args.synthetic, args.seed)
    cfg = DenoiserConfig(
        n_tokens=RNA.size, vocab_size=RNA.vocab_size, pad_id=RNA.pad_id, max_length=MAX_LENGTH,
        d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff,
        conv_dilations=tuple(int(d) for d in args.conv_dilations.split(",") if d), pair_conditioning=True,
    )
    module = MaskedDiffusionModule(cfg.to_dict(), RNA.mask_id, args.schedule, lr=args.lr,
                                   decay_steps=args.lr_decay_steps, p_uncond=P_UNSPECIFIED)
    init = read_init(args.init) if args.init else None
    if init and not (out / "last.ckpt").exists():
        if init[1].get("denoiser") != cfg.to_dict():
            raise InputError("--init: a checkpoint of another architecture (its denoiser config differs from this "
                             "run's sizes)", args.init)
        for net in (module.net, module.ema):
            load_weights(net, init[0], args.init)
    print(f"rna design: {len(train)} training / {len(held)} held-out pairs; {n_parameters(module.net)} parameters",
          flush=True)
    x, p = encode(train, MAX_LENGTH)
    lengths = (x != RNA.pad_id).sum(-1)
    batches = SizeBucketBatches(lengths // LENGTH_BUCKET, args.batch_size, args.seed)
    train_dl = ResumableLoader(TensorDataset(x, p), batch_sampler=batches)
    rng = random.Random(args.seed)
    held_sample = rng.sample(held, min(512, len(held)))
    hx, hp = encode(held_sample, MAX_LENGTH)
    val_dl = DataLoader(TensorDataset(hx, hp), batch_size=128)
    stats = fit(module, train_dl, val_dl, out, args.max_minutes, args.max_steps, args.val_every)

    export = Path(args.export) if args.export else default_checkpoint("rna_design")
    config = {
        "modality": "rna",
        "alphabet": "rna",
        "denoiser": cfg.to_dict(),
        "schedule": args.schedule,
        "length_distribution": LengthDistribution.from_lengths(lengths.tolist()).to_dict(),
        "label_names": [],
        "p_uncond": P_UNSPECIFIED,
    }
    ema = module.ema.eval()
    bits = {
        "structure": heldout_bits_per_token(ema, module.process, hx, {"partners": hp}),
        "no_structure": heldout_bits_per_token(ema, module.process, hx, {}),
    }
    provenance = {
        "command": train_command("rna"),
        "data": DATA_NOTE,
        "n_train": len(train),
        "n_heldout": len(held),
        "n_synthetic": args.synthetic,
        "hardware": hardware(),
        "threads": args.threads,
        "parameters": n_parameters(module.net),
        **({"init": init[2]} if init else {}),
        **stats,
        "weights": f"EMA (molgen.ema: decay {module.hparams.ema_decay} after warm-up)",
        "metrics": {
            "heldout_bits_per_token": round(bits["structure"], 4),
            "heldout_bits_per_token_without_structure": round(bits["no_structure"], 4),
            "heldout_pairs": len(held_sample),
            "heldout_nelbo_n_t": NELBO_TIMES,
        },
    }
    save_checkpoint(export, module.ema.state_dict(), config, provenance=provenance)
    load_pretrained(export)
    print(json.dumps({"export": str(export), **provenance}, indent=1), flush=True)
    return 0
