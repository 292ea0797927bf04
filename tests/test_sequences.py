"""Sequences: alphabets, readers and their errors, length law, denoiser, training step, metrics, CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from molgen.checkpoints import save_checkpoint
from molgen.diffusion.discrete import ClassifierFreeGuidance
from molgen.sequences.alphabets import DNA, PROTEIN, RNA, get_alphabet, pad_batch
from molgen.sequences.data import LengthDistribution, holdout
from molgen.sequences.evaluate import compare, evaluate_fasta, sequence_stats
from molgen.sequences.io import Record, parse_fasta, read_sequences, validate, write_fasta
from molgen.sequences.metrics import kmer_frequencies, motif_hits, pearson
from molgen.sequences.model import DenoiserConfig, SequenceDenoiser
from molgen.sequences.pretrained import load_pretrained
from molgen.sequences.sampling import generate
from molgen.sequences.training import MaskedDiffusionModule


def test_alphabets_round_trip_and_tokens():
    assert (RNA.size, RNA.pad_id, RNA.mask_id, RNA.vocab_size) == (4, 4, 5, 6)
    assert PROTEIN.size == 20 and get_alphabet("DNA") is DNA
    ids = RNA.encode("acgt u")  # lower case, T read as U, whitespace dropped
    assert ids.tolist() == [0, 1, 2, 3, 3]
    assert RNA.decode(torch.tensor([0, 1, RNA.mask_id, 3, RNA.pad_id, 0])) == "AC-U"
    batch = pad_batch([DNA.encode("ACG"), DNA.encode("T")], DNA)
    assert batch.tolist() == [[0, 1, 2], [3, DNA.pad_id, DNA.pad_id]]


def test_bad_characters_name_record_and_position(tmp_path):
    with pytest.raises(ValueError, match=r"record 'seq2': position 4: character 'N'"):
        validate([Record("seq1", "ACGU"), Record("seq2", "ACGNU")], RNA)
    with pytest.raises(ValueError, match=r"record 'x', position 3"):
        DNA.encode("ACZ", "x")
    with pytest.raises(ValueError, match="record 'e': empty sequence"):
        validate([Record("e", "  ")], DNA)
    with pytest.raises(ValueError, match=r"record 'long': length 5 exceeds the maximum length 4"):
        validate([Record("long", "ACGTA")], DNA, max_length=4)
    with pytest.raises(ValueError, match="unknown alphabet"):
        get_alphabet("klingon")
    bad = tmp_path / "bad.fa"
    bad.write_text("ACGT\n>r1\nACGT\n")
    with pytest.raises(ValueError, match="line 1: sequence text before the first '>'"):
        read_sequences(bad)
    with pytest.raises(FileNotFoundError):
        read_sequences(tmp_path / "missing.fa")


def test_fasta_and_plain_readers(tmp_path):
    recs = list(parse_fasta([">a desc\n", "ACG\n", "TT\n", "\n", ">b\n", "GG\n"]))
    assert recs == [Record("a desc", "ACGTT"), Record("b", "GG")]
    fa = write_fasta(tmp_path / "x.fa", recs, width=2)
    assert read_sequences(fa) == recs
    plain = tmp_path / "x.txt"
    plain.write_text("# comment\nACGU\n\nGGCC\n")
    assert [r.seq for r in read_sequences(plain)] == ["ACGU", "GGCC"]
    assert read_sequences(plain)[1].name == "x.txt:4"


def test_length_distribution_and_holdout():
    law = LengthDistribution.from_lengths([10, 10, 10, 20])
    s = law.sample(20000, torch.Generator().manual_seed(0))
    assert abs((s == 10).double().mean().item() - 0.75) < 0.015 and set(s.tolist()) == {10, 20}
    assert LengthDistribution.from_dict(law.to_dict()).probs.allclose(law.probs)
    names = [f"r{i}" for i in range(4000)]
    frac = np.mean([holdout(n, 0.05) for n in names])
    assert 0.035 < frac < 0.065 and holdout("r1", 0.05) == holdout("r1", 0.05)
    with pytest.raises(ValueError):
        LengthDistribution({})


def tiny_config(n_classes: int = 0, max_length: int = 12) -> DenoiserConfig:
    return DenoiserConfig(
        4, 6, 4, max_length, 16, 1, 2, 32, n_classes=n_classes, conv_dilations=(1, 2), kernel_size=3
    )


def test_denoiser_ignores_trailing_padding_and_checks_labels():
    torch.manual_seed(0)
    model = SequenceDenoiser(tiny_config(n_classes=2)).eval()
    x = torch.tensor([[0, 5, 2, 1, 5, 3]])
    t = torch.tensor([0.5])
    short = model(x, t, labels=torch.tensor([1]))
    padded = model(torch.cat([x, torch.full((1, 4), 4)], 1), t, labels=torch.tensor([1]))
    assert torch.allclose(short, padded[:, :6], atol=1e-5)
    assert not torch.allclose(short, model(x, t, labels=torch.tensor([0])))
    with pytest.raises(ValueError, match="labels must lie"):
        model(x, t, labels=torch.tensor([5]))
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        model(torch.zeros(1, 13, dtype=torch.long), t)


def test_cfg_scale_zero_is_conditional_and_scale_extrapolates():
    torch.manual_seed(0)
    model = SequenceDenoiser(tiny_config(n_classes=2)).eval()
    x, t, y = torch.full((2, 5), 5), torch.rand(2), torch.tensor([0, 1])
    cond = torch.log_softmax(model(x, t, labels=y), -1)
    unc = torch.log_softmax(model(x, t, labels=torch.full_like(y, 2)), -1)
    assert torch.allclose(ClassifierFreeGuidance(model, 0.0, 2)(x, t, labels=y), cond)
    assert torch.allclose(
        ClassifierFreeGuidance(model, 2.0, 2)(x, t, labels=y), 3 * cond - 2 * unc, atol=1e-5
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_training_reduces_the_nelbo():
    """A few optimiser steps on a two-sequence corpus lower its NELBO (the loss is a real training signal)."""
    torch.manual_seed(0)
    module = MaskedDiffusionModule(tiny_config(max_length=8).to_dict(), mask_id=5, lr=3e-3, warmup=1)
    x0 = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], [3, 3, 2, 2, 1, 1, 0, 0]]).repeat(16, 1)
    opt = module.configure_optimizers()["optimizer"]
    gen = torch.Generator().manual_seed(0)
    before = module.process.nelbo(module.net, x0, 8, gen).mean().item()
    for _ in range(60):
        loss = module.training_step((x0,), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = module.process.nelbo(module.net, x0, 8, torch.Generator().manual_seed(0)).mean().item()
    assert after < before - 2.0  # nats per sequence; uniform is 8 log 4 = 11.1


def test_sequence_training_cools_the_learning_rate_down_to_a_tenth():
    module = MaskedDiffusionModule(tiny_config().to_dict(), mask_id=5, lr=1e-3, warmup=1, decay_steps=10)
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    for _ in range(10):
        sched.optimizer.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1e-4)


def test_kmer_frequencies_and_pearson():
    f = kmer_frequencies(["ACGTA", "AC"], DNA, 2)  # AC CG GT TA AC
    assert f[0 * 4 + 1] == pytest.approx(2 / 5) and f.sum() == pytest.approx(1.0)
    assert pearson(f, f) == pytest.approx(1.0)
    assert np.isnan(pearson(np.ones(3), np.arange(3)))
    assert kmer_frequencies(["ACGU"], RNA, 6).sum() == 0  # too short: no 6-mers


def test_motif_hits_find_planted_site_on_both_strands():
    pwm = np.log2(
        np.array(
            [
                [0.97, 0.01, 0.01, 0.01],
                [0.01, 0.97, 0.01, 0.01],
                [0.01, 0.01, 0.97, 0.01],
                [0.01, 0.01, 0.97, 0.01],
            ]
        ).T
        / 0.25
    )[None]  # ACGG, width 4
    pwm = np.concatenate([pwm, np.zeros((1, 4, 2))], axis=2)  # zero-padded to width 6
    widths = np.array([4])
    seqs = ["TTTTACGGTTTT", "TTTTCCGTTTTT", "TTTTTTTTTTTT", "ACGG", "CCGT", "ACG"]  # CCGT = revcomp(ACGG)
    hits = motif_hits(seqs, pwm, widths)[:, 0]
    assert hits.tolist() == [True, True, False, True, True, False]


def test_rna_statistics_and_compare():
    seqs = ["GGGGAAAACCCC", "GGGAAAUCCC", "AAAAAAAAAAAA"]
    stats = sequence_stats(seqs, "rna")
    assert stats["bp_fraction"][0] == pytest.approx(8 / 12, abs=1e-4) and stats["mfe_per_nt"][0] < 0
    assert stats["bp_fraction"][2] == 0
    out = compare(stats, stats)
    assert out["kmer3_r"] == pytest.approx(1.0) and out["mfe_per_nt_w1"] == pytest.approx(0.0)


def make_checkpoint(tmp_path, n_classes=2):
    torch.manual_seed(0)
    cfg = tiny_config(n_classes=n_classes, max_length=10)
    model = SequenceDenoiser(cfg)
    config = {
        "modality": "dna",
        "alphabet": "dna",
        "denoiser": cfg.to_dict(),
        "schedule": "loglinear",
        "length_distribution": LengthDistribution.from_lengths([6, 8, 8]).to_dict(),
        "label_names": ["non-enhancer", "enhancer"][:n_classes],
    }
    return save_checkpoint(tmp_path / "m.pt", model.state_dict(), config, provenance={"command": "test"})


def test_generate_from_checkpoint_is_deterministic_and_checks_labels(tmp_path):
    pre = load_pretrained(make_checkpoint(tmp_path))
    a = generate(pre, 5, "cached_ancestral", 4, seed=3, condition="enhancer", guidance_scale=1.0)
    b = generate(pre, 5, "cached_ancestral", 4, seed=3, condition="enhancer", guidance_scale=1.0)
    assert a == b and {len(r.seq) for r in a} <= {6, 8} and all(set(r.seq) <= set("ACGT") for r in a)
    assert {len(r.seq) for r in generate(pre, 3, "remdm", 4, length=10)} == {10}
    with pytest.raises(
        ValueError, match="unknown condition label 'promoter'; this model knows: non-enhancer"
    ):
        generate(pre, 2, condition="promoter")
    with pytest.raises(ValueError, match="outside"):
        generate(pre, 2, length=11)


def test_evaluate_fasta_against_a_reference_file(tmp_path):
    rng = np.random.default_rng(0)
    natural = ["".join(rng.choice(list("ACGU"), 40, p=[0.4, 0.1, 0.4, 0.1])) for _ in range(30)]
    write_fasta(tmp_path / "nat.fa", [Record(f"n{i}", s) for i, s in enumerate(natural)])
    write_fasta(tmp_path / "same.fa", [Record(f"s{i}", s) for i, s in enumerate(natural[:15])])
    uniform = ["".join(rng.choice(list("ACGU"), 40)) for _ in range(15)]
    write_fasta(tmp_path / "uni.fa", [Record(f"u{i}", s) for i, s in enumerate(uniform)])
    same = evaluate_fasta(tmp_path / "same.fa", str(tmp_path / "nat.fa"), nll=False)
    uni = evaluate_fasta(tmp_path / "uni.fa", str(tmp_path / "nat.fa"), nll=False)
    assert same["modality"] == "rna" and same["kmer3_r"] > 0.9 and uni["kmer3_r"] < same["kmer3_r"]
    assert "mfe_per_nt_mean" in same and "bp_fraction_natural" in same
    (tmp_path / "bad.fa").write_text(">ok\nACGU\n>bad\nACXU\n")
    partial = evaluate_fasta(tmp_path / "bad.fa", str(tmp_path / "nat.fa"), nll=False)  # the bad one is skipped
    assert partial["n"] == 1 and partial["skipped"][0]["record"] == "2 (bad)"
    assert "position 3" in partial["skipped"][0]["reason"]


def test_cli_sample_and_evaluate(tmp_path, capsys):
    from molgen.sequences import cli

    ckpt = make_checkpoint(tmp_path, n_classes=0)
    parser = argparse.ArgumentParser()
    cli.add_sample(parser, "dna")
    out = tmp_path / "s.fa"
    args = parser.parse_args(["--n", "4", "--steps", "3", "--out", str(out), "--checkpoint", str(ckpt)])
    args.modality = "dna"
    assert cli.run_sample(args) == 0 and len(read_sequences(out)) == 4
    natural = tmp_path / "nat.fa"
    write_fasta(natural, [Record("n", "ACGTACGTTT"), Record("m", "GGGTACCCAT")])
    parser = argparse.ArgumentParser()
    cli.add_evaluate(parser, "dna")
    args = parser.parse_args(
        [str(out), "--reference", str(natural), "--json", str(tmp_path / "e.json"), "--no-nll"]
    )
    assert cli.run_evaluate(args) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert {"kmer3_r", "kmer6_r", "motif_hit_r"} <= set(result)
