"""Sequences over any alphabet: a prior trained from a user's FASTA by one command, a user's Python reward, and
a campaign (with fine-tuning) over both."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from molgen.campaign import Campaign, CampaignConfig
from molgen.cli import main
from molgen.guidance.rewards import parse_reward
from molgen.sequences.alphabets import (
    DNA,
    alphabet_card,
    alphabet_from_card,
    custom_alphabet,
    infer_alphabet,
)
from molgen.sequences.data import load_fasta
from molgen.sequences.pretrained import load_pretrained

LETTERS = "ABCDEFGHabcdefgh"  # case matters in a user's alphabet


def _fasta(path: Path, n: int = 120, length: int = 12, seed: int = 0) -> Path:
    """Sequences whose letters alternate upper and lower case: a rule a prior can learn."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        seq = "".join(rng.choice(LETTERS[:8] if k % 2 == 0 else LETTERS[8:]) for k in range(length))
        lines.append(f">s{i}\n{seq}\n")
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prior")
    fasta = _fasta(folder / "train.fasta")
    assert main(["train", "sequences", "--fasta", str(fasta), "--alphabet", LETTERS, "--out", str(folder / "run"),
                 "--max-steps", "150", "--max-minutes", "5", "--d-model", "32", "--d-ff", "64",
                 "--val-every", "50"]) == 0
    return folder / "run" / "model.pt"


def test_alphabets_round_trip_through_the_card():
    abc = custom_alphabet(LETTERS, "toy")
    assert alphabet_from_card(alphabet_card(abc)) == abc
    assert alphabet_from_card(alphabet_card(DNA)) is DNA and alphabet_card(DNA) == "dna"
    assert custom_alphabet("rna").name == "RNA"
    assert abc.decode(abc.encode("aAhH")) == "aAhH"  # no upper-casing
    assert infer_alphabet(["acgt", "GGA"]) is DNA
    assert infer_alphabet(["xyz", "zzy"]).letters == "xyz"
    for bad in ("", "AAB", "A B", "AB-"):
        with pytest.raises(ValueError, match="distinct letters"):
            custom_alphabet(bad)
    with pytest.raises(ValueError, match="position 2"):
        abc.encode("Az")


def test_load_fasta_leaves_out_bad_records_and_names_them(tmp_path):
    path = tmp_path / "x.fasta"
    path.write_text(">ok1\nAbCd\n>bad_letter\nAbZd\n>too_long\nAbCdAbCdAb\n>ok2\nhHgG\n")
    with pytest.warns(UserWarning, match="bad_letter.*too_long"):
        data = load_fasta(path, custom_alphabet(LETTERS), max_length=8)
    assert [r.name for r in data.records] == ["ok1", "ok2"]
    with pytest.raises(ValueError, match="no usable sequences"), pytest.warns(UserWarning):
        load_fasta(path, custom_alphabet("XY"))


def test_prior_from_fasta_learns_the_rule_and_samples(prior, tmp_path):
    pre = load_pretrained(prior)
    assert pre.alphabet.letters == LETTERS and pre.card["config"]["modality"] == "sequences"
    assert pre.card["provenance"]["metrics"]["heldout_bits_per_token"] < 4.0  # uniform over 16 letters: 4 bits
    out = tmp_path / "s.fasta"
    assert main(["sample", "sequences", "--checkpoint", str(prior), "--n", "32", "--out", str(out)]) == 0
    seqs = [ln for ln in out.read_text().split("\n") if ln and not ln.startswith(">")]
    assert len(seqs) == 32 and all(set(s) <= set(LETTERS) for s in seqs)
    # the alternation rule: upper case at even positions; chance would be 1/2 per position
    rule = sum((c.isupper() == (k % 2 == 0)) for s in seqs for k, c in enumerate(s)) / sum(map(len, seqs))
    assert rule > 0.8


def test_python_reward_from_a_file(tmp_path):
    (tmp_path / "oracle.py").write_text(
        "def score(seqs):\n    return [float('nan') if s == 'bad' else s.count('A') for s in seqs]\n"
        "def broken(seqs):\n    raise RuntimeError('down')\n")
    r = parse_reward(f"python:{tmp_path / 'oracle.py'}:score,penalty=-5")
    assert r(["AAb", "bad", "A"]).tolist() == [2.0, -5.0, 1.0]
    assert r.stats.nonfinite == 1
    broken = parse_reward(f"python:{tmp_path / 'oracle.py'}:broken")
    assert broken(["A", "B"]).tolist() == [-1.0, -1.0] and broken.stats.failures == 2
    with pytest.raises(ValueError, match="no function 'nope'"):
        parse_reward(f"python:{tmp_path / 'oracle.py'}:nope")
    with pytest.raises(ValueError, match="no file"):
        parse_reward(f"python:{tmp_path / 'missing.py'}:score")
    with pytest.raises(ValueError, match="FILE.py:FUNCTION"):
        parse_reward("python:oracle.py")


def test_campaign_over_a_user_alphabet_with_finetuning(prior, tmp_path):
    oracle = tmp_path / "oracle.py"
    oracle.write_text("def score(seqs):\n    return [s.count('a') / len(s) for s in seqs]\n")
    base = {"modality": "sequences", "rewards": [{"name": "a_share", "spec": f"python:{oracle}:score"}],
            "rounds": 3, "n_per_round": 16, "length": 12, "selection": {"k": 4}}
    with pytest.raises(ValueError, match="molgen train sequences --fasta"):
        CampaignConfig.from_mapping(base)
    cfg = CampaignConfig.from_mapping({**base, "checkpoint": str(prior), "refine": {"fraction": 0.5, "t": 0.5},
                                       "finetune": {"steps": 8}})
    c = Campaign(cfg, tmp_path / "c").run()
    frame = c.samples_frame()
    assert len(frame) == 48 and all(set(s) <= set(LETTERS) for s in frame["sequence"])
    assert (tmp_path / "c" / "finetune" / "round-003.pt").is_file()
    # the selection never gets worse, and it ends above what the prior's own samples score
    sel = [c.selected(r)["a_share"].mean() for r in (1, 2, 3)]
    assert sel == sorted(sel) and sel[-1] > frame[frame["round"] == 1]["a_share"].mean()
    assert torch.isfinite(torch.tensor(frame["naturalness"].to_numpy())).all()


@pytest.mark.parametrize("guidance", [{"method": "unguided"}, {"method": "svdd_mc", "candidates": 3}])
def test_the_oracle_is_asked_once_per_distinct_design(prior, tmp_path, guidance):
    """A single reward is scored by the guidance run and reused, svdd_mc's surrogate asks it nothing more, and a
    design drawn again (refinements on a 12-letter alphabet repeat) is never sent twice, not after a resume either."""
    log = tmp_path / "asked.txt"
    oracle = tmp_path / "oracle.py"
    oracle.write_text(f"def score(seqs):\n    open({str(log)!r}, 'a').write(''.join(s + '\\n' for s in seqs))\n"
                      "    return [s.count('a') / len(s) for s in seqs]\n")
    base = {"modality": "sequences", "checkpoint": str(prior), "n_per_round": 8, "length": 4,
            "selection": {"k": 2}, "refine": {"fraction": 1.0, "t": 0.3}, "guidance": guidance,
            "rewards": [{"name": "a", "spec": f"python:{oracle}:score"}]}
    Campaign(CampaignConfig.from_mapping({**base, "rounds": 2}), tmp_path / "c").run()
    c = Campaign(CampaignConfig.from_mapping({**base, "rounds": 4}), tmp_path / "c").run()  # resumed
    asked, frame = log.read_text().split(), c.samples_frame()
    assert len(frame) == 32 and frame["sequence"].nunique() < 32  # the folder holds repeats...
    assert sorted(asked) == sorted(set(frame["sequence"]))  # ...each asked once
    expect = [s.count("a") / len(s) for s in frame["sequence"]]
    assert frame["a"].tolist() == pytest.approx(expect) and frame["score"].tolist() == pytest.approx(expect)


def test_a_reward_file_runs_once_per_version(tmp_path):
    log = tmp_path / "imports.txt"
    oracle = tmp_path / "oracle.py"
    oracle.write_text(f"open({str(log)!r}, 'a').write('x')\ndef score(seqs):\n    return [1.0 for _ in seqs]\n")
    for _ in range(3):
        parse_reward(f"python:{oracle}:score")
    assert log.read_text() == "x"
    oracle.write_text(oracle.read_text().replace("1.0", "2.0"))
    os.utime(oracle, ns=(oracle.stat().st_atime_ns, oracle.stat().st_mtime_ns + 10**9))
    assert parse_reward(f"python:{oracle}:score")(["A"]).tolist() == [2.0] and log.read_text() == "xx"
