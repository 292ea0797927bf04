"""Concrete rewards on known inputs, per-sample failure isolation, the process pool and its timeout."""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass

import pytest
import torch

from molgen.guidance.rewards import Reward, parse_reward


def test_molecule_rewards_known_values():
    pytest.importorskip("rdkit")
    qed = parse_reward("qed")
    out = qed(["CCO", "c1ccccc1O", "not a smiles"])
    assert out[0].item() == pytest.approx(0.4068, abs=1e-3)  # RDKit's QED of ethanol
    assert out[2].item() == 0.0 and qed.stats.invalid == 1 and qed.stats.failures == 0  # the penalty, no failure
    assert parse_reward("validity")(["CCO", "C1CC"]).tolist() == [1.0, 0.0]
    sa = parse_reward("sa")(["CCO", "CC12CC3(C)CC(C1)C2C3"])
    assert 0.0 < sa[1].item() < sa[0].item() <= 1.0  # a bridged polycycle is harder than ethanol
    assert parse_reward("logp:target=1")(["CCO"]).item() == pytest.approx(-abs(-0.0014 - 1.0), abs=1e-3)
    assert parse_reward("ring_penalty")(["C1CCCCCCC1", "C1CCCCC1"]).tolist() == [-1.0, 0.0]


def test_fragments_score_their_largest_part_times_its_share_of_atoms():
    pytest.importorskip("rdkit")
    ethanol = parse_reward("qed")(["CCO"]).item()
    # ethanol has 9 atoms with its hydrogens; a stray H atom makes 10, a stray water 12
    out = parse_reward("qed")(["CCO.[H]", "O.CCO", "[H]OC([H])([H])C([H])([H])[H]"])
    assert out.tolist() == pytest.approx([0.9 * ethanol, 0.75 * ethanol, ethanol])
    assert parse_reward("validity")(["CCO.[H]"]).item() == pytest.approx(0.9)
    sa = parse_reward("sa")
    assert sa(["CCO.O"]).item() == pytest.approx(0.75 * sa(["CCO"]).item())
    assert parse_reward("logp")(["CCO.[Na+]"]).item() == pytest.approx(parse_reward("logp")(["CCO"]).item())


def test_rna_rewards_known_values_and_bad_targets():
    pytest.importorskip("RNA")
    mfe = parse_reward("rna_mfe")(["GGGGAAAACCCC", "AAAAAAAAAAAA"])
    assert mfe.tolist() == pytest.approx([5.4, 0.0], abs=1e-4)  # ViennaRNA 2.x, Turner 2004
    target = parse_reward("rna_target:((((....))))")
    out = target(["GGGGAAAACCCC", "AAAAAAAAAAAA", "GGG", "GGGGAAAACCCX"])
    assert out.tolist() == pytest.approx([0.0, -4 / 12, -1.0, -1.0])
    assert target.stats.failures == 2 and "position 11" in target.stats.last_error
    with pytest.raises(ValueError, match="unmatched"):
        parse_reward("rna_target:((..")
    with pytest.raises(ValueError, match="position 2: character 'x'"):
        parse_reward("rna_target:(x)")


def test_rna_ensemble_rewards_are_the_partition_function_figures():
    pytest.importorskip("RNA")
    from molgen.sequences.structure import ensemble

    seqs = ["GGGGAAAACCCC", "GGGAAAACCCAA"]
    prob = parse_reward("rna_target_probability:((((....))))")(seqs).tolist()
    defect = parse_reward("rna_ensemble_defect:((((....))))")(seqs).tolist()
    for s, p, d in zip(seqs, prob, defect):
        e = ensemble(s, "((((....))))")
        assert p == pytest.approx(e.target_probability, rel=1e-5) and d == pytest.approx(-e.ensemble_defect, rel=1e-5)
        assert 0 <= p <= 1 and -1 <= d <= 0
    assert prob[0] > prob[1] and defect[0] > defect[1]  # the first folds into the target, the second cannot


def test_dna_rewards_known_values():
    assert parse_reward("gc")(["GGCC", "ATAT", "GCAT"]).tolist() == [1.0, 0.0, 0.5]
    assert parse_reward("gc:target=0.5")(["GGCA"]).tolist() == [-0.25]
    pytest.importorskip("pyjaspar")
    motif = parse_reward("jaspar:MA0114.4")  # HNF4A
    pwm = motif.pwm
    consensus = "".join("ACGT"[j] for j in pwm.argmax(0))
    rc = consensus[::-1].translate(str.maketrans("ACGT", "TGCA"))
    out = motif(["AAAA" + consensus + "TTTT", "AAAA" + rc + "TTTT", "ACGT"])
    assert out[:2].tolist() == pytest.approx([1.0, 1.0])  # the consensus scores the maximum on either strand
    assert out[2].item() == 0.0 and motif.stats.failures == 1
    with pytest.raises(ValueError, match="unknown JASPAR"):
        parse_reward("jaspar:MA9999.9")


@dataclass
class Sleepy(Reward):
    """Picklable per-sample reward for the pool test: negative inputs hang, 'x' raises."""

    def score_one(self, sample):
        if sample == "x":
            raise RuntimeError("bad sample")
        if float(sample) < 0:
            time.sleep(3.0)
        return float(sample)


def test_process_pool_timeout_and_failures_are_per_sample():
    reward = Sleepy(name="sleepy", penalty=-9.0, workers=2, timeout=1.0)
    try:
        out = reward(["1.5", "-1", "x", "2"])
    finally:
        reward.close()
    assert out.tolist() == [1.5, -9.0, -9.0, 2.0]
    assert reward.stats.timeouts == 1 and reward.stats.failures == 1 and reward.stats.samples == 4
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64


@dataclass
class Counting(Reward):
    """float(sample), 'x' raises; every sample it is asked about is listed in ``asked``."""

    asked: list = None

    def score_one(self, sample):
        self.asked = (self.asked or []) + [sample]
        if sample == "x":
            raise RuntimeError("bad sample")
        return float(sample)


def test_a_remembering_reward_asks_once_per_distinct_sample():
    reward = Counting(name="counting", penalty=-9.0).remember({"7": 70.0})
    assert reward(["1", "2", "1", "x", "7"]).tolist() == [1.0, 2.0, 1.0, -9.0, 70.0]
    assert reward(["2", "3", "x"]).tolist() == [2.0, 3.0, -9.0]
    assert reward.asked == ["1", "2", "x", "3"] and reward.stats.samples == 4 and reward.stats.failures == 1
    assert reward(torch.tensor([5.0])).tolist() == [5.0]  # no strings: scored as before
    assert pickle.loads(pickle.dumps(reward)).memory is None  # a pool worker scores what it is sent


def test_weighted_sum_of_rewards():
    r = parse_reward("gc+0.5*gc:target=0.5")
    assert r(["GGCC", "ATAT"]).tolist() == pytest.approx([1.0 - 0.25, 0.0 - 0.25])
    assert r.penalty == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="unknown reward"):
        parse_reward("gc+2*nope")


def test_backbone_rewards_known_values():
    from molgen.guidance.rewards.structure import rg_ratio

    n = 12
    ang = torch.arange(n, dtype=torch.float64) * (2 * torch.pi / n)
    ring = torch.stack([5.0 * ang.cos(), 5.0 * ang.sin(), torch.zeros(n, dtype=torch.float64)], -1)[None]
    assert rg_ratio(ring).item() == pytest.approx(5.0 / (3.3 * n**0.31))  # every point at radius 5: Rg = 5
    rg = parse_reward("rg:target=1.0")
    x = ring.clone().requires_grad_(True)
    rg.grad_fn(x).sum().backward()
    assert rg.differentiable and torch.isfinite(x.grad).all()
    assert rg(ring).item() == pytest.approx(-abs(5.0 / (3.3 * n**0.31) - 1.0))
    pytest.importorskip("pydssp")
    k = torch.arange(30, dtype=torch.float64)  # ideal alpha helix: radius 2.3 A, 100 degrees and 1.5 A per residue
    theta = k * (100.0 * torch.pi / 180.0)
    helix_ca = torch.stack([2.3 * theta.cos(), 2.3 * theta.sin(), 1.5 * k], -1)
    line = torch.stack([3.8 * k, torch.zeros_like(k), torch.zeros_like(k)], -1)
    helix = parse_reward("helix")
    out = helix(torch.stack([helix_ca, line]))
    assert out[0].item() > 0.7 and out[1].item() == 0.0
    assert parse_reward("strand")(line[None]).item() == 0.0  # a lone strand has no partner: coil
    bad = helix([torch.full((5, 3), float("nan"))])
    assert bad.item() == 0.0 and helix.stats.failures == 1


def test_rewards_and_runs_validate_each_other():
    """rna_target fixes the length (taken when none is given, a mismatch refused before sampling), and a run
    whose reward calls mostly fail stops with a named error instead of scoring everything with the penalty."""
    from molgen.guidance.rewards import RewardFailures, check_failures, resolve_length

    target = parse_reward("rna_target:((((....))))")
    assert resolve_length(target, None) == 12 and resolve_length(target, 12) == 12
    assert resolve_length(parse_reward("rna_mfe"), None) is None
    with pytest.raises(ValueError, match="--length 20, but reward 'rna_target' scores only samples of length 12"):
        resolve_length(target, 20)
    with pytest.raises(ValueError, match="need different lengths"):
        resolve_length(parse_reward("rna_target:((((....))))+rna_target:((....))"), None)
    target(["GGGGAAAACCCC", "GGGAAACCC", "GGAAACC"])  # two of three have the wrong length
    with pytest.raises(RewardFailures, match="67% of the samples scored by reward 'rna_target' failed"):
        check_failures(target, 0.5)
    check_failures(target, 0.7)
