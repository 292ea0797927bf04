"""RNA secondary structure, pair-aware masked sampling, the structure-conditioned denoiser and design to a fold."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch

from molgen.diffusion.discrete import DISCRETE_SAMPLERS, DiscreteSampler, MaskedDiffusion, gumbel_argmax, pair_tokens
from molgen.errors import InputError
from molgen.sequences.alphabets import RNA
from molgen.sequences.design import (
    Budget,
    Target,
    design_rna,
    diversity,
    read_targets,
    remask_positions,
    stages,
)
from molgen.sequences.model import UNSPECIFIED, DenoiserConfig, SequenceDenoiser
from molgen.sequences.structure import (
    PAIRS,
    allowed_pairs,
    dot_bracket,
    ensemble,
    fold,
    helix_proofs,
    parse_dot_bracket,
    random_structure,
    sharp_hairpins,
    synthetic_pair,
)

HAIRPIN = "((((((....))))))"
LONE_PAIR = "(((((((((((...).)))))).))))"  # a held-out target no sequence solves: pair 11-15 (helix_proofs)
TWO_ARMS = "..((((((....))))))...((((((....))))))..."


def is_nested(partners: list[int]) -> bool:
    pairs = [(i, j) for i, j in enumerate(partners) if j > i]
    return all(not (a < c < b < d) for a, b in pairs for c, d in pairs)


def pairs_allowed(seq: str, structure: str) -> bool:
    return all(seq[i] + seq[j] in PAIRS for i, j in enumerate(parse_dot_bracket(structure)) if j > i)


# ----------------------------------------------------------------------------------------------- structure
def test_dot_bracket_round_trip_and_partners():
    partners = parse_dot_bracket(TWO_ARMS)
    assert dot_bracket(partners) == TWO_ARMS
    assert all(partners[j] == i for i, j in enumerate(partners) if j >= 0)
    assert partners[2] == 17 and partners[0] == -1


@pytest.mark.parametrize(
    "bad, position, words",
    [("((..)", 1, "unmatched '('"), ("(..))", 5, "unmatched ')'"), ("((..[[..))..]]", 5, "pseudoknot"),
     ("((..x.))", 5, "'x'"), ("", None, "empty")],
)
def test_bad_dot_brackets_are_named_with_their_position(bad, position, words):
    with pytest.raises(InputError) as err:
        parse_dot_bracket(bad, record="t1")
    assert err.value.position == position and words in str(err.value) and "record t1" in str(err.value)


def test_sharp_hairpins_are_found():
    assert sharp_hairpins(parse_dot_bracket("((((..))))")) == [4]
    assert sharp_hairpins(parse_dot_bracket(HAIRPIN)) == []


def test_random_structures_nest_and_synthetic_pairs_are_exact_folds():
    rng = random.Random(0)
    for _ in range(20):
        partners = random_structure(rng.randint(20, 120), rng)
        assert is_nested(partners) and not sharp_hairpins(partners)
    for _ in range(5):
        seq, structure = synthetic_pair(rng.randint(30, 80), rng)
        assert fold(seq)[0] == structure


def test_ensemble_metrics_match_their_definitions():
    """p(s*) = exp((G - E(s*)) / kT) and ED = 1 - (1/L) sum_i P(i in its target state), from ViennaRNA's parts."""
    import RNA as vienna

    seq = "GGGAAAUCCGCGCAAAGCGCAAAGGGAUUU"
    target = fold(seq)[0]
    e = ensemble(seq, target)
    fc = vienna.fold_compound(seq)
    _, mfe = fc.mfe()
    fc.exp_params_rescale(mfe)
    _, g = fc.pf()
    kt = 0.0019872 * (37 + 273.15)
    assert e.target_probability == pytest.approx(math.exp((g - fc.eval_structure(target)) / kt), rel=1e-3)
    bpp = fc.bpp()
    n, partners = len(seq), parse_dot_bracket(target)
    p = [[0.0] * (n + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(i + 1, n + 1):
            p[i][j] = p[j][i] = bpp[i][j]
    right = sum(p[i + 1][partners[i] + 1] if partners[i] >= 0 else 1 - sum(p[i + 1]) for i in range(n))
    assert e.ensemble_defect == pytest.approx(1 - right / n, abs=1e-6)
    assert e.mfe_structure == target


# ----------------------------------------------------------------------------------------------- pair tokens
def random_partners(length: int, gen: random.Random) -> torch.Tensor:
    return torch.tensor(random_structure(length, gen))[None]


def test_pair_tokens_draw_the_restricted_joint_of_a_pair():
    """(a, b) ~ p_i(a) p_j(b) 1[allowed] / Z, checked by frequency over 60,000 draws."""
    torch.manual_seed(0)
    n = 60_000
    lp = torch.log_softmax(torch.randn(1, 2, 4), -1).expand(n, -1, -1)
    x = torch.full((n, 2), RNA.mask_id)
    partners = torch.tensor([[1, 0]]).expand(n, -1)
    allowed = allowed_pairs()
    gen = torch.Generator().manual_seed(1)
    out = pair_tokens(lp, x, partners, allowed, lambda w: gumbel_argmax(w, gen))
    joint = (lp[0, 0][:, None] + lp[0, 1][None, :]).exp() * allowed
    joint /= joint.sum()
    freq = torch.zeros(4, 4)
    freq.index_put_((out[:, 0], out[:, 1]), torch.ones(n), accumulate=True)
    freq /= n
    assert freq[~allowed].sum() == 0
    se = (joint * (1 - joint) / n).sqrt()
    assert ((freq - joint).abs() <= 5 * se + 1e-9).all()


def test_pair_tokens_respect_a_fixed_mate_and_argmax_takes_the_joint_mode():
    lp = torch.log_softmax(torch.tensor([[[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]]), -1)
    partners = torch.tensor([[1, 0]])
    allowed = allowed_pairs()
    fixed = torch.tensor([[RNA.mask_id, RNA.letters.index("C")]])
    out = pair_tokens(lp, fixed, partners, allowed, lambda w: w.argmax(-1))
    assert RNA.letters[out[0, 0]] == "G"  # the only letter that pairs with C
    both = pair_tokens(lp, torch.full((1, 2), RNA.mask_id), partners, allowed, lambda w: w.argmax(-1))
    assert RNA.decode(both[0]) == "AU"  # A favoured at 0, U at 1, and AU pairs


class Uniform(torch.nn.Module):
    def forward(self, x, t, **cond):
        return torch.zeros(*x.shape, 4)


@pytest.mark.parametrize("solver", sorted(DISCRETE_SAMPLERS))
def test_every_sampler_unmasks_pairs_together(solver):
    proc = MaskedDiffusion(4, RNA.mask_id, RNA.pad_id)
    options = {"eta": 0.0} if solver == "remdm" else None
    gen = torch.Generator().manual_seed(0)
    partners = random_partners(60, random.Random(3)).expand(16, -1)
    sampler = DiscreteSampler(Uniform(), proc, solver, 12, pairing=allowed_pairs(), options=options)
    x = sampler.run(proc.prior(torch.full((16,), 60)), {"partners": partners}, gen).x
    assert all(pairs_allowed(RNA.decode(r), dot_bracket(partners[0].tolist())) for r in x)
    # under a uniform model every allowed pair is equally likely: 1/6 each (3,000 two-letter hairpins)
    n = 3000
    x = sampler.run(proc.prior(torch.full((n,), 2)), {"partners": torch.tensor([[1, 0]]).expand(n, -1)}, gen).x
    freq = torch.tensor([sum(RNA.decode(r) == p for r in x) / n for p in PAIRS])
    assert freq.sum() == 1 and ((freq - 1 / 6).abs() < 5 * math.sqrt(5 / 36 / n)).all()


def test_plain_sampler_makes_impossible_pairs_and_pair_aware_none():
    proc = MaskedDiffusion(4, RNA.mask_id, RNA.pad_id)
    partners = torch.tensor(parse_dot_bracket(HAIRPIN))[None].expand(32, -1)
    x_T = proc.prior(torch.full((32,), len(HAIRPIN)))
    cond = {"partners": partners}
    plain = DiscreteSampler(Uniform(), proc, "ancestral", 8).run(x_T, cond, torch.Generator().manual_seed(0)).x
    paired = DiscreteSampler(Uniform(), proc, "ancestral", 8, pairing=allowed_pairs()).run(
        x_T, cond, torch.Generator().manual_seed(0)).x
    assert not all(pairs_allowed(RNA.decode(r), HAIRPIN) for r in plain)
    assert all(pairs_allowed(RNA.decode(r), HAIRPIN) for r in paired)


def test_pairing_table_must_be_symmetric():
    table = allowed_pairs().clone()
    table[0, 3] = False
    with pytest.raises(ValueError, match="symmetric"):
        DiscreteSampler(Uniform(), MaskedDiffusion(4, RNA.mask_id, RNA.pad_id), pairing=table)


# ----------------------------------------------------------------------------------------------- denoiser
def pair_model(**kw) -> SequenceDenoiser:
    torch.manual_seed(0)
    cfg = dict(n_tokens=4, vocab_size=RNA.vocab_size, pad_id=RNA.pad_id, max_length=64, d_model=32, n_layers=0,
               n_heads=4, d_ff=64, conv_dilations=(1,), pair_conditioning=True)
    return SequenceDenoiser(DenoiserConfig(**{**cfg, **kw})).eval()


def test_a_position_sees_its_partner_beyond_the_receptive_field():
    """With one kernel-5 conv and no attention, position 0 sees positions 0..2 only, except through its partner."""
    model = pair_model()
    x = torch.randint(0, 4, (1, 40))
    partners = torch.full((1, 40), -1)
    partners[0, 0], partners[0, 39] = 39, 0
    y = x.clone()
    y[0, 39] = (x[0, 39] + 1) % 4
    t = torch.ones(1)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, partners=partners)[0, 0], model(y, t, partners=partners)[0, 0])
        unpaired = torch.full_like(partners, -1)
        assert torch.allclose(model(x, t, partners=unpaired)[0, 0], model(y, t, partners=unpaired)[0, 0])


def test_pair_conditioned_outputs_do_not_depend_on_padding():
    model = pair_model(n_layers=1)
    x = torch.randint(0, 4, (1, 20))
    partners = torch.tensor(parse_dot_bracket("(((((....)))))......"))[None]
    padded = torch.cat([x, torch.full((1, 7), RNA.pad_id)], 1)
    padded_partners = torch.cat([partners, torch.full((1, 7), -1)], 1)
    t = torch.ones(1)
    with torch.no_grad():
        a = model(x, t, partners=partners)
        b = model(padded, t, partners=padded_partners)[:, :20]
    assert torch.allclose(a, b, atol=1e-5)


def test_unspecified_structure_is_the_default():
    model = pair_model()
    x = torch.randint(0, 4, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x, torch.ones(2)), model(x, torch.ones(2), partners=torch.full_like(x, UNSPECIFIED)))


# ----------------------------------------------------------------------------------------------- design
def test_stages_go_from_the_inside_out():
    inner = "(" * 5 + "." * 30 + ")" * 5
    structure = "((((" + "." * 10 + inner + "." * 10 + inner + "." * 10 + "))))"
    got = stages(parse_dot_bracket(structure), min_span=40)
    assert got[-1] == (0, len(structure) - 1)
    assert got[:-1] == [(14, 53), (64, 103)]


def test_remask_positions_are_wrong_ones_with_their_mates():
    target = parse_dot_bracket("((((....))))")
    rng = random.Random(0)
    for _ in range(10):  # the pair 3-8 is open in the MFE fold: both ends are redrawn, nothing else
        assert remask_positions("(((......)))", target, rng) == [3, 8]
    for _ in range(20):  # the two outer pairs are open in the MFE fold
        pos = remask_positions("..((....))..", target, rng)
        assert set(pos) <= {0, 1, 10, 11} and all(target[p] in pos for p in pos) and pos


def test_read_targets_names_the_bad_one_and_keeps_the_rest(tmp_path):
    path = tmp_path / "targets.txt"
    path.write_text(">ok\n((((....))))\n>broken\n((((...)\n>pk\n((..[[..))..]]\n....((((....))))\n")
    got = read_targets(path)
    assert [type(t).__name__ for t in got] == ["Target", "InputError", "InputError", "Target"]
    assert "broken" in str(got[1]) and "position 1" in str(got[1]) and "pseudoknot" in str(got[2])
    assert got[3].name == "target_4"


LONG_LOOP = ".((" + "." * 50 + "))."  # a held-out bpRNA target: two stacked pairs cannot pay for a 50-nt hairpin


@pytest.mark.parametrize("structure, outermost, pairs", [(LONE_PAIR, (10, 14), 1), (LONG_LOOP, (1, 54), 2)])
def test_a_helix_no_sequence_folds_into_is_proved(structure, outermost, pairs):
    import RNA as vienna

    (proof,) = helix_proofs(structure)
    assert (proof.i, proof.j) == outermost and proof.pairs == pairs and proof.gap > 0
    without = list(structure)
    for k in range(pairs):
        without[proof.i + k] = without[proof.j - k] = "."

    def gap(seq: str) -> float:
        fc = vienna.fold_compound(seq)
        return fc.eval_structure(structure) - fc.eval_structure("".join(without))

    assert gap(proof.witness) == pytest.approx(proof.gap, abs=0.01)  # the minimum is attained
    rng = random.Random(0)
    for _ in range(300):  # and no sequence with the target's pairs gets below it, whatever its other letters
        seq = [rng.choice(RNA.letters) for _ in structure]
        for i, j in enumerate(parse_dot_bracket(structure)):
            if j > i:
                seq[i], seq[j] = rng.choice(PAIRS)
        assert gap("".join(seq)) >= proof.gap - 1e-4
    res = design_rna(structure, budget=Budget(seconds=None, calls=200), seed=0)
    assert not res.solved and res.summary()["undesignable_helices"] == [
        {"i": outermost[0] + 1, "j": outermost[1] + 1, "pairs": pairs, "energy_gap": proof.gap}]


def test_a_folded_structure_is_never_proved_undesignable():
    """The MFE structure of any sequence is designable (by that sequence)."""
    rng = random.Random(0)
    short = 0
    for _ in range(30):
        structure = fold("".join(rng.choice(RNA.letters) for _ in range(rng.randint(30, 60))))[0]
        p = parse_dot_bracket(structure)
        short += any(j > i and p[i - 1] != j + 1 and p[i + 2] != j - 2 for i, j in enumerate(p))  # <= 2 pairs
        assert helix_proofs(structure) == []
    assert short >= 3  # the check was put to the test


def test_design_with_the_shipped_model_solves_small_targets():
    for target in (HAIRPIN, TWO_ARMS):
        res = design_rna(target, n=2, budget=Budget(seconds=None, calls=4000), seed=0)
        s = res.summary()
        assert s["solved"] and res.designs[0].mfe_structure == target
        assert all(pairs_allowed(d.sequence, target) for d in res.designs)
        assert 0 < s["target_probability"]["best"] <= 1 and 0 <= s["ensemble_defect"]["best"] <= 1
        assert s["model_calls"] <= 4000 + 64 and s["folding_calls"] > 0


def test_inverse_fold_baseline_and_its_budget():
    res = design_rna(HAIRPIN, method="inverse_fold", budget=Budget(seconds=5))
    assert res.solved and res.folding_calls is None and res.seconds < 6
    with pytest.raises(ValueError, match="--seconds"):
        design_rna(HAIRPIN, method="inverse_fold", budget=Budget(seconds=None, calls=10))


def test_refine_hands_a_stalled_population_to_the_walk(monkeypatch):
    import molgen.sequences.design as design

    walks = []
    real = design._walk

    def spy(starts, target, n, budget, counter):
        first = [next(starts) for _ in range(16)]  # the unsolved designs, cycled, each followed by a random start
        walks.append((first[0::2], first[1::2]))
        return real(iter(first), target, n, budget, counter)

    monkeypatch.setattr(design, "_walk", spy)
    monkeypatch.setattr(design, "STALL_ROUNDS", 0)  # hand over at the first unsolved round
    target = LONE_PAIR  # the model's proposals cannot solve it, so the population stays unsolved
    res = design_rna(target, budget=Budget(seconds=2), seed=1, population=8)
    assert res.seconds < 3
    (designs, randoms), = walks
    assert 1 <= len(set(designs)) <= 8 and all(pairs_allowed(s, target) for s in designs)  # the model's designs
    assert len(set(randoms)) == 8 and all(len(s) == len(target) for s in designs + randoms)
    walks.clear()
    design_rna(target, budget=Budget(seconds=None, calls=300), seed=1)
    assert not walks  # a budget in model calls alone has no deadline for the walk


def test_walk_stops_at_the_deadline_and_keeps_its_starts():
    from molgen.sequences.design import Counter, Target, _walk

    hard = Target("lone_pair", LONE_PAIR)
    counter = Counter()
    seqs = _walk(iter(["G" * 27, "C" * 27] * 100), hard, 1, Budget(seconds=0.5), counter)
    assert counter.seconds() < 1.5 and all(len(s) == 27 for s in seqs)
    easy = _walk(iter(["A" * len(HAIRPIN)]), Target("hairpin", HAIRPIN), 1, Budget(seconds=5), Counter())
    assert any(fold(s)[0] == HAIRPIN for s in easy)


def test_design_refuses_bad_targets_and_lengths():
    with pytest.raises(InputError, match="unmatched"):
        design_rna("((((....)))")
    with pytest.raises(InputError, match="longer than the model's maximum"):
        design_rna(Target("long", "(" * 150 + "...." + ")" * 150), budget=Budget(seconds=1))


def test_hamming_diversity():
    assert diversity(["AAAA", "AAAU", "UUUU"]) == pytest.approx((0.25 + 1 + 0.75) / 3)
    assert diversity(["AAAA"]) is None


def test_design_command_writes_fasta_and_summary(tmp_path):
    targets = tmp_path / "t.txt"
    targets.write_text(f">hp\n{HAIRPIN}\n>bad\n((((..\n")
    out, summary = tmp_path / "d.fasta", tmp_path / "s.json"
    proc = subprocess.run([sys.executable, "-m", "molgen.cli", "design", "rna", "--target", str(targets),
                           "--calls", "2000", "--n", "2", "--out", str(out), "--json", str(summary)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "record bad" in proc.stderr
    doc = json.loads(summary.read_text())
    first = doc["targets"][0]
    for key in ("solved", "bp_distance", "target_probability", "ensemble_defect", "model_calls", "folding_calls",
                "seconds", "diversity"):
        assert key in first
    assert first["solved"] and "error" in doc["targets"][1]
    assert out.read_text().count(">hp_") == 2


# ----------------------------------------------------------------------------------------------- training data
def test_windows_keep_only_the_pairs_inside_them():
    from molgen.sequences.design_training import windows

    rng = random.Random(0)
    structure = "((" + "..((((....))))" * 21 + "))"  # 298 nt: hairpins inside one long-range pair
    seq = "".join(rng.choice(RNA.letters) for _ in structure)
    got = list(windows(seq, structure, 120, rng))
    assert got and all(len(s) == 120 == len(p) for s, p in got)
    for s, p in got:
        assert all(p[j] == i for i, j in enumerate(p) if j >= 0) and is_nested(p) and s in seq
    short = list(windows(seq[:50], "." * 50, 120, rng))
    assert short == [(seq[:50], [-1] * 50)]


def test_length_buckets_partition_each_epoch_into_similar_lengths():
    from molgen.batching import SizeBucketBatches
    from molgen.sequences.design_training import LENGTH_BUCKET

    lengths = torch.randint(16, 200, (1000,), generator=torch.Generator().manual_seed(0))
    sampler = SizeBucketBatches(lengths // LENGTH_BUCKET, 10, seed=0)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [i for b in batches for i in b]
        assert len(batches) == len(sampler) and len(set(flat)) == len(flat) == 1000
        assert all(int(lengths[b].max() - lengths[b].min()) < LENGTH_BUCKET for b in batches)


def test_encode_pads_tokens_and_partners():
    from molgen.sequences.design_training import encode

    tokens, partners = encode([("GGGAAACCC", parse_dot_bracket("(((...)))")), ("ACGU", [-1] * 4)], 12)
    assert tokens.shape == partners.shape == (2, 12)
    assert RNA.decode(tokens[1]) == "ACGU" and (tokens[1, 4:] == RNA.pad_id).all()
    assert partners[0, :9].tolist() == parse_dot_bracket("(((...)))") and (partners[:, 9:] == -1).all()
