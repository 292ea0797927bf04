"""molgen.molecules: equivariance, masks, EDM metrics (hand-built and real QM9), I/O, sampling, bad input."""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil

import numpy as np
import pytest
import torch

from molgen.batching import SizeBucketBatches
from molgen.geometry import centre
from molgen.molecules.data import ATOM_TYPES, load_subset, parse_xyz_field
from molgen.molecules.io import Molecule, read_molecules, read_sdf, read_xyz, write_sdf, write_xyz
from molgen.molecules.metrics import atom_stability, bond_matrix, bond_order, evaluate, valid_smiles
from molgen.molecules.model import MoleculeDenoiser
from molgen.testing import assert_equivariant

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny() -> MoleculeDenoiser:
    torch.manual_seed(0)
    model = MoleculeDenoiser(hidden=32, edge_hidden=16, layers=2, properties=("gap",)).double().eval()
    for p in model.parameters():  # non-trivial coordinate updates (the last layer starts at zero)
        p.data.add_(0.1 * torch.randn_like(p))
    return model


def noisy_batch(model: MoleculeDenoiser, g: torch.Generator, sizes: tuple[int, ...] = (7, 5, 9)):
    width = max(sizes)
    mask = torch.arange(width) < torch.tensor(sizes).unsqueeze(1)
    x = torch.randn(len(sizes), width, model.n_features, generator=g, dtype=torch.float64) * mask.unsqueeze(-1)
    x = torch.cat([centre(x[..., :3], mask), x[..., 3:]], -1)
    t = torch.tensor([0.3, 0.7, 0.05], dtype=torch.float64)
    return x, t, mask


@pytest.mark.parametrize("reflect", [False, True])
def test_model_is_e3_equivariant(tiny: MoleculeDenoiser, reflect: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x, t, mask = noisy_batch(tiny, g)
    # centred x0 positions rotate with the input and ignore its translation; the type features are invariant
    assert_equivariant(lambda a, m: tiny(a, t, mask=m), x, mask=mask, output="vectors", reflect=reflect,
                       generator=g, atol=1e-9, rtol=0)
    out = tiny(x, t, mask=mask)
    com = (out[..., :3] * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(com, torch.zeros_like(com), atol=1e-10)
    assert not torch.allclose(out[..., :3], tiny.coefficients(t)["c_skip"] * x[..., :3], atol=1e-3)


def test_self_conditioned_model_is_equivariant_and_reads_its_estimate() -> None:
    torch.manual_seed(0)
    model = MoleculeDenoiser(hidden=32, edge_hidden=16, layers=2, self_condition=True).double().eval()
    for p in model.parameters():  # the self-conditioning projections start at zero; make them act
        p.data.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(4)
    x, t, mask = noisy_batch(model, g)

    def twice(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # the sampler's second call
        return model(a, t, mask=m, self_cond=model(a, t, mask=m))

    for kw in ({"reflect": True}, {"permute": True, "translate": False}):
        assert_equivariant(twice, x, mask=mask, output="vectors", generator=g, atol=1e-9, rtol=0, **kw)
    assert not torch.allclose(twice(x, mask), model(x, t, mask=mask), atol=1e-4)
    with pytest.raises(ValueError, match="no self-conditioning"):
        MoleculeDenoiser(hidden=8, edge_hidden=8, layers=1)(x.float(), t.float(), mask, self_cond=x.float())


def test_model_is_permutation_equivariant(tiny: MoleculeDenoiser) -> None:
    g = torch.Generator().manual_seed(2)
    x, t, mask = noisy_batch(tiny, g, sizes=(8, 5, 7))  # padding moves with the atoms
    assert_equivariant(lambda a, m: tiny(a, t, mask=m), x, mask=mask, output="vectors", permute=True,
                       translate=False, generator=g, atol=1e-10, rtol=0)


def test_padded_atoms_never_leak(tiny: MoleculeDenoiser) -> None:
    g = torch.Generator().manual_seed(3)
    x, t, mask = noisy_batch(tiny, g)
    garbage = x.clone()
    garbage[~mask] = 1e3 * torch.randn(int((~mask).sum()), tiny.n_features, generator=g, dtype=torch.float64)
    out, out_garbage = tiny(x, t, mask=mask), tiny(garbage, t, mask=mask)
    assert torch.equal(out_garbage[~mask], torch.zeros_like(out_garbage[~mask]))
    assert torch.allclose(out[mask], out_garbage[mask], atol=1e-10)
    # a molecule alone gives the same prediction as inside a padded batch
    alone = tiny(x[1:2, :5], t[1:2], mask=mask[1:2, :5])
    assert torch.allclose(alone[0], out[1, :5], atol=1e-10)


def test_property_condition_and_null_differ(tiny: MoleculeDenoiser) -> None:
    g = torch.Generator().manual_seed(4)
    x, t, mask = noisy_batch(tiny, g)
    props = torch.randn(3, 1, generator=g, dtype=torch.float64)
    cond = tiny(x, t, mask=mask, props=props)
    null = tiny(x, t, mask=mask, props=props, drop=torch.ones(3, dtype=torch.bool))
    assert not torch.allclose(cond, null)
    assert torch.allclose(null, tiny(x, t, mask=mask))


def test_x0_features_are_scaled_probabilities(tiny: MoleculeDenoiser) -> None:
    g = torch.Generator().manual_seed(5)
    x, t, mask = noisy_batch(tiny, g)
    out = tiny(x, t, mask=mask)[mask]
    onehot = out[:, 3:8] / tiny.type_scale
    assert torch.allclose(onehot.sum(-1), torch.ones(len(out), dtype=out.dtype))
    z = torch.tensor([1.0, 6.0, 7.0, 8.0, 9.0], dtype=out.dtype)
    assert torch.allclose(out[:, 8], tiny.charge_scale * (onehot * z).sum(-1))


def test_loss_target_reconstructs_x0(tiny: MoleculeDenoiser) -> None:
    """With F equal to its target, c_skip x_t + c_out F is exactly x0 (the preconditioning is consistent)."""
    g = torch.Generator().manual_seed(6)
    x0, t, mask = noisy_batch(tiny, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64) * mask.unsqueeze(-1)
    c = tiny.coefficients(t)
    x_t = c["alpha"] * x0 + c["sigma"] * eps
    target = (x0[..., :3] - c["c_skip"] * x_t[..., :3]) / c["c_out"]
    assert torch.allclose(c["c_skip"] * x_t[..., :3] + c["c_out"] * target, x0[..., :3], atol=1e-12)
    # Karras weight 1/c_out^2 = 1/sd^2 + alpha^2/sigma^2
    sd = tiny.sigma_data
    assert torch.allclose(c["c_out"] ** -2, 1 / sd**2 + (c["alpha"] / c["sigma"]) ** 2)


# ---------------------------------------------------------------------------------------------- metrics
def tetrahedral(centre_symbol: str, ligand: str, length: float) -> Molecule:
    dirs = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / math.sqrt(3)
    return Molecule((centre_symbol, *[ligand] * 4), np.vstack([np.zeros(3), length * dirs]))


def test_bond_orders_follow_edm_tables() -> None:
    assert bond_order("C", "C", 1.63) == 1 and bond_order("C", "C", 1.64) == 0  # 154 + 10 pm
    assert bond_order("C", "C", 1.38) == 2 and bond_order("C", "C", 1.39) == 1  # 134 + 5
    assert bond_order("C", "C", 1.22) == 3 and bond_order("C", "C", 1.23) == 2  # 120 + 3
    assert bond_order("C", "O", 1.24) == 2 and bond_order("O", "C", 1.15) == 3  # symmetric tables
    assert bond_order("H", "H", 0.83) == 1 and bond_order("H", "H", 0.84) == 0
    assert bond_order("H", "F", 0.5) == 1  # no double H-F length: short is still single
    assert bond_order("F", "F", 1.0) == 1 and bond_order("B", "C", 1.0) == 0  # untabulated pair: no bond


def test_stability_on_hand_built_molecules() -> None:
    methane = tetrahedral("C", "H", 1.09)
    assert atom_stability(methane.symbols, methane.positions).all()
    assert valid_smiles(methane.symbols, methane.positions) == "[H]C([H])([H])[H]"  # explicit H, as EDM
    stretched = tetrahedral("C", "H", 1.25)  # C-H beyond 109 + 10 pm: no bonds
    assert not atom_stability(stretched.symbols, stretched.positions).any()
    # HCN: H-C 1.07, C#N 1.16 -> triple bond, every atom stable
    hcn = Molecule(("H", "C", "N"), np.array([[0.0, 0, 0], [1.07, 0, 0], [2.23, 0, 0]]))
    assert bond_matrix(hcn.symbols, hcn.positions)[1, 2] == 3
    assert atom_stability(hcn.symbols, hcn.positions).all()
    assert valid_smiles(hcn.symbols, hcn.positions) == "[H]C#N"
    # two far-apart waters: valid, largest fragment kept; a hydroxyl radical fragment alone is unstable
    water = np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    two = Molecule(("O", "H", "H", "O", "H"), np.vstack([water, water[:2] + 10.0]))
    stable = atom_stability(two.symbols, two.positions)
    assert stable.tolist() == [True, True, True, False, True]
    assert valid_smiles(two.symbols, two.positions) == "[H]O[H]"
    metrics = evaluate(
        [
            (methane.symbols, methane.positions),
            (stretched.symbols, stretched.positions),
            (two.symbols, two.positions),
            (hcn.symbols, hcn.positions),
        ],
        reference_smiles={"C"},
    )
    assert metrics.n == 4
    assert metrics.atom_stability == pytest.approx((5 + 0 + 4 + 3) / (5 + 5 + 5 + 3))
    assert metrics.mol_stability == pytest.approx(2 / 4)
    # the stretched "methane" is 5 separate atoms: RDKit sanitises it (implicit H), largest fragment "C"
    assert metrics.validity == 1.0
    assert metrics.uniqueness == 1.0
    assert metrics.novelty == pytest.approx(3 / 4)


@functools.lru_cache(maxsize=1)
def subset() -> dict:
    return load_subset()


def test_metrics_reproduce_edm_on_real_qm9() -> None:
    """EDM reports 99.0 / 95.2 / 97.7 % (atom stab / mol stab / validity) on QM9 itself."""
    data = subset()
    mols = [
        ([ATOM_TYPES[k] for k in data["types"][i, :n].tolist()], data["positions"][i, :n].double().numpy())
        for i, n in enumerate(data["n_atoms"].tolist())
    ]
    m = evaluate(mols, reference_smiles=[])
    assert m.n == 5000
    assert 0.985 <= m.atom_stability <= 0.996
    assert m.mol_stability == pytest.approx(0.952, abs=0.01)
    assert m.validity == pytest.approx(0.977, abs=0.007)
    assert m.uniqueness > 0.99 and m.novelty == 1.0


def test_qm9_field_parser_handles_mathematica_exponents() -> None:
    xyz = parse_xyz_field("[[1.2*^-5,0.,1.],[-2.5,3.,4.25]]", 2)
    assert np.allclose(xyz, [[1.2e-5, 0, 1], [-2.5, 3, 4.25]])
    with pytest.raises(ValueError, match="expected 6"):
        parse_xyz_field("[[1.,2.,3.]]", 2)


def test_size_buckets_cover_everything_once() -> None:
    n_atoms = torch.tensor([5, 7, 5, 9, 7, 7, 5, 9, 3])
    sampler = SizeBucketBatches(n_atoms, batch_size=2, seed=0)
    batches = list(iter(sampler))
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(n_atoms)))
    assert all(len(set(n_atoms[b].tolist())) == 1 for b in batches)
    sampler.set_epoch(1)
    assert list(iter(sampler)) != batches or len(batches) < 3


def test_size_buckets_resume_inside_an_epoch() -> None:
    """A sampler restored from a mid-epoch state continues that epoch (no replay of its first batches)."""
    n_atoms = torch.tensor([5, 7, 5, 9, 7, 7, 5, 9, 3, 5, 7, 9])
    straight = SizeBucketBatches(n_atoms, batch_size=2, seed=3)
    straight.set_epoch(2)
    full = list(iter(straight))
    first = SizeBucketBatches(n_atoms, batch_size=2, seed=3)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    resumed = SizeBucketBatches(n_atoms, batch_size=2, seed=3)
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(2)
    assert head + list(iter(resumed)) == full
    assert list(iter(resumed)) == full  # the next pass over the same epoch is whole again


# -------------------------------------------------------------------------------------------------- I/O
def subset_molecules(k: int) -> list[Molecule]:
    data = subset()
    return [
        Molecule(
            tuple(ATOM_TYPES[j] for j in data["types"][i, :n].tolist()),
            data["positions"][i, :n].double().numpy(),
            f"qm9_{int(data['index'][i])}",
        )
        for i, n in enumerate(data["n_atoms"][:k].tolist())
    ]


@pytest.mark.parametrize("suffix", [".sdf", ".xyz"])
def test_round_trip(tmp_path, suffix: str) -> None:
    mols = subset_molecules(6)
    path = tmp_path / f"mols{suffix}"
    (write_sdf if suffix == ".sdf" else write_xyz)(path, mols)
    back, errors = read_molecules(path)
    assert errors == [] and len(back) == len(mols)
    for a, b in zip(mols, back):
        assert a.symbols == b.symbols and a.name == b.name
        assert np.allclose(a.positions, b.positions, atol=1e-4)
        assert atom_stability(a.symbols, a.positions).tolist() == atom_stability(b.symbols, b.positions).tolist()


def test_rdkit_molecule_has_conformer_and_inferred_bonds() -> None:
    first = subset_molecules(1)[0]
    mol = first.to_rdkit()
    assert mol.GetNumConformers() == 1 and mol.GetConformer().Is3D()
    assert mol.GetNumBonds() == int((bond_matrix(first.symbols, first.positions) > 0).sum() // 2)
    assert np.allclose(mol.GetConformer().GetPositions(), first.positions)


GOOD_XYZ = "3\nwater\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n"


def test_bad_records_are_named_and_skipped(tmp_path) -> None:
    path = tmp_path / "mixed.xyz"
    path.write_text(GOOD_XYZ + "2\nalien\nXx 0 0 0\nH 1 0 0\n" + "2\nshort\nC 0 0\nH 1 0 0\n" + GOOD_XYZ)
    mols, errors = read_xyz(path)
    assert len(mols) == 2 and len(errors) == 2
    assert "record 2 (alien" in str(errors[0]) and "Xx" in str(errors[0])
    assert "record 3 (short" in str(errors[1]) and "coordinates" in str(errors[1])
    with pytest.raises(ValueError, match="record 2"):
        read_xyz(path, strict=True)
    water = tmp_path / "water.xyz"
    water.write_text(GOOD_XYZ)
    with pytest.raises(ValueError, match="more than the 2 supported"):
        read_xyz(water, strict=True, max_atoms=2)
    empty = tmp_path / "empty.sdf"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_sdf(empty)
    with pytest.raises(ValueError, match="unknown molecule file type"):
        read_molecules(tmp_path / "x.pdb")


def test_bad_sdf_records_are_named_and_skipped(tmp_path) -> None:
    """Blank coordinate fields (RDKit would read 0), a cut atom block, an unknown element, too many atoms."""
    water = Molecule(("O", "H", "H"), np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.1]]), "water")
    good = write_sdf(tmp_path / "good.sdf", [water]).read_text()
    lines = good.split("$$$$")[0].splitlines()
    blank = [*lines[:5], " " * 31 + "H   0  0", *lines[6:]]
    cut = [*lines[:5], *lines[7:]]
    alien = [*lines[:4], lines[4].replace(" O ", " Q "), *lines[5:]]
    records = [["blank", *blank[1:]], ["cut", *cut[1:]], lines, ["alien", *alien[1:]]]
    path = tmp_path / "mixed.sdf"
    path.write_text("".join("\n".join(r) + "\n$$$$\n" for r in records))
    mols, errors = read_sdf(path)
    assert [m.name for m in mols] == ["water"] and np.allclose(mols[0].positions, water.positions)
    assert len(errors) == 3
    assert "record 1 (blank)" in str(errors[0]) and "atom 2 (record line 6) has no x y z coordinates" in str(errors[0])
    assert "record 2 (cut)" in str(errors[1]) and "atom 2" in str(errors[1])
    assert "record 4 (alien)" in str(errors[2]) and "unknown element" in str(errors[2]) and "Q" in str(errors[2])
    with pytest.raises(ValueError, match=r"record 1 \(blank\)"):
        read_sdf(path, strict=True)
    with pytest.raises(ValueError, match=r"good.sdf: record 1 \(water\): 3 atoms, more than the 2 supported"):
        read_sdf(tmp_path / "good.sdf", strict=True, max_atoms=2)
    empty = tmp_path / "empty.xyz"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty file"):
        read_xyz(empty)


def test_evaluate_cli_fails_clearly_when_every_record_is_broken(tmp_path, capsys) -> None:
    from molgen.cli import main

    path = tmp_path / "aliens.xyz"
    path.write_text("2\nalien\nXx 0 0 0\nH 1 0 0\n")
    assert main(["evaluate", "molecules", str(path), "--reference", "none"]) == 2
    err = capsys.readouterr().err
    assert "record 1 (alien" in err and "no usable molecules" in err
    empty = tmp_path / "empty.sdf"
    empty.write_text("")
    assert main(["evaluate", "molecules", str(empty), "--reference", "none"]) == 2
    assert "empty file" in capsys.readouterr().err


def test_evaluate_cli_skips_broken_records(tmp_path) -> None:
    from molgen.cli import main

    sdf = tmp_path / "good.sdf"
    write_sdf(sdf, subset_molecules(3))
    text = sdf.read_text()
    broken = text.split("$$$$")[0].replace("    0.0000 C", "    0.0000 Q", 1).replace(" C   0", " Q   0", 1)
    (tmp_path / "mixed.sdf").write_text(text + broken.lstrip("\n") + "$$$$\n")
    out = tmp_path / "m.json"
    assert main(["evaluate", "molecules", str(tmp_path / "mixed.sdf"), "--json", str(out), "--reference", "none"]) == 0
    result = json.loads(out.read_text())
    assert {"n", "atom_stability", "mol_stability", "validity", "uniqueness", "novelty"} <= set(result)
    assert result["n"] == 3 and result["n_skipped"] == 1 and result["skipped"][0]["record"].startswith("4 ")
    assert main(["evaluate", "molecules", str(tmp_path / "missing.sdf")]) == 2


# --------------------------------------------------------------------------------------------- sampling
def test_sampling_is_seeded_and_respects_counts(tiny: MoleculeDenoiser) -> None:
    from molgen.molecules.sampling import sample_molecules

    model = copy.deepcopy(tiny).float()
    config = {"atom_hist": [0, 0, 0, 1, 0, 2], "prop_mean": [0.25], "prop_std": [0.05], "properties": ["gap"]}
    a = sample_molecules(model, config, 5, solver="dpmpp_2m", steps=4, seed=3)
    b = sample_molecules(model, config, 5, solver="dpmpp_2m", steps=4, seed=3)
    assert [len(m) for m in a] == [len(m) for m in b] and all(len(m) in (3, 5) for m in a)
    assert all(np.array_equal(x.positions, y.positions) and x.symbols == y.symbols for x, y in zip(a, b))
    assert all(np.allclose(m.positions.mean(0), 0.0, atol=1e-5) for m in a)
    fixed = sample_molecules(
        model, config, 3, solver="euler", steps=3, seed=0, atoms=4, condition={"gap": 0.3}, guidance=2.0
    )
    assert [len(m) for m in fixed] == [4, 4, 4]
    with pytest.raises(ValueError, match="not conditioned on"):
        sample_molecules(model, config, 2, atoms=4, condition={"alpha": 70.0})
    with pytest.raises(ValueError, match="atom counts must be in"):
        sample_molecules(model, config, 2, atoms=40)
    # last_noise ends the grid at sigma/alpha = 0.05 Angstrom: the same as giving that t_min
    ended = sample_molecules(model, config, 3, solver="dpmpp_3m", steps=4, seed=1, last_noise=0.05)
    t_min = float(model.schedule.t_of_rho(0.05))
    same = sample_molecules(model, config, 3, solver="dpmpp_3m", steps=4, seed=1, grid_options={"t_min": t_min})
    assert all(np.array_equal(x.positions, y.positions) for x, y in zip(ended, same))
    assert not all(np.array_equal(x.positions, y.positions) for x, y in zip(ended, sample_molecules(
        model, config, 3, solver="dpmpp_3m", steps=4, seed=1)))
    with pytest.raises(ValueError, match="last_noise must be > 0"):
        sample_molecules(model, config, 2, last_noise=0.0)


def test_ode_grids_start_at_first_noise(tiny: MoleculeDenoiser) -> None:
    from molgen.molecules.sampling import FIRST_NOISE, grid_ends, sample_molecules, sampler_settings

    model = copy.deepcopy(tiny).float()
    sched = model.schedule
    config = {"atom_hist": [0, 0, 0, 1, 0, 2]}
    told: list[float] = []

    def rho(t: float) -> float:
        return float(sched.rho(torch.tensor(t, dtype=torch.float64)))

    model.register_forward_pre_hook(lambda _, args: told.append(rho(float(args[1][0]))))

    def first_and_last(**kw) -> tuple[float, float]:
        told.clear()
        sample_molecules(model, config, 2, steps=5, seed=0, **kw)
        return told[0], told[-1]

    first, last = first_and_last(solver="dpmpp_2m")  # ODE solver: from FIRST_NOISE to the schedule's end
    assert first == pytest.approx(FIRST_NOISE, rel=1e-6) and last == pytest.approx(rho(sched.t_min))
    assert first_and_last(solver="dpmpp_2m", first_noise=2.0, last_noise=0.1) == pytest.approx((2.0, 0.1))
    top = rho(sched.t_max)
    assert first_and_last(solver="dpmpp_2m", first_noise=math.inf)[0] == pytest.approx(top)
    assert first_and_last(solver="ddpm_ancestral")[0] == pytest.approx(top)  # EDM's protocol: the whole schedule
    assert first_and_last(solver="ddpm_ancestral", first_noise=4.0)[0] == pytest.approx(4.0)
    assert sampler_settings("ddpm_ancestral") == {"step_scale": 1.0, "step_scale_below": 3.0, "first_noise": math.inf}
    for bad, match in (((0.0, None), "first_noise must be > 0"), ((0.1, 0.2), "must be above last_noise")):
        with pytest.raises(ValueError, match=match):
            grid_ends(sched, *bad)


def test_size_chunks_bound_padding_and_cover_every_molecule_once() -> None:
    from molgen.molecules.sampling import size_chunks

    counts = torch.multinomial(torch.ones(30), 500, replacement=True, generator=torch.Generator().manual_seed(0))
    for batch, slack in ((64, 1.25), (7, 1.0), (1000, 1.5)):
        chunks = size_chunks(counts, batch, slack)
        assert sorted(torch.cat(chunks).tolist()) == list(range(500))
        for c in chunks:
            n = counts[c]
            assert len(c) <= batch and len(c) * int(n.max()) ** 2 <= slack * int((n**2).sum()) + 1e-9
        if slack == 1.0:
            assert all(len(set(counts[c].tolist())) == 1 for c in chunks)
    assert len(size_chunks(torch.tensor([5, 5, 5, 29]), 10)) == 2  # 29 atoms never pads the 5-atom molecules
    with pytest.raises(ValueError, match="batch_size"):
        size_chunks(counts, 0)


def test_sample_cli_writes_sdf_from_a_checkpoint(tmp_path, tiny: MoleculeDenoiser) -> None:
    from molgen.checkpoints import save_checkpoint
    from molgen.cli import main

    model = copy.deepcopy(tiny).float()
    config = {
        "hidden": 32,
        "edge_hidden": 16,
        "layers": 2,
        "properties": ["gap"],
        "atom_hist": [0, 0, 0, 0, 1],
        "prop_mean": [0.25],
        "prop_std": [0.05],
        "max_atoms": 29,
    }
    ckpt = save_checkpoint(tmp_path / "m.pt", model.state_dict(), config, provenance={"test": True})
    out = tmp_path / "s.sdf"
    args = [
        "sample",
        "molecules",
        "--n",
        "3",
        "--steps",
        "3",
        "--seed",
        "7",
        "--out",
        str(out),
        "--checkpoint",
        str(ckpt),
    ]
    assert main(args) == 0
    mols, errors = read_sdf(out)
    assert errors == [] and [len(m) for m in mols] == [4, 4, 4]
    assert main([*args[:-4], "--out", str(tmp_path / "s.txt"), "--checkpoint", str(ckpt)]) == 2
    assert main([*args, "--condition", "gap"]) == 2
    # the step scale: plain ODE (eta 1) gives other molecules; stochastic solvers refuse one
    plain = tmp_path / "plain.sdf"
    assert main([*args[:-4], "--out", str(plain), "--checkpoint", str(ckpt), "--step-scale", "1"]) == 0
    assert [m.positions.tolist() for m in read_sdf(plain)[0]] != [m.positions.tolist() for m in mols]
    assert main([*args, "--solver", "ddpm_ancestral"]) == 0
    assert main([*args, "--solver", "ddpm_ancestral", "--step-scale", "1.5"]) == 2


def test_training_resumes_from_its_checkpoint(tmp_path) -> None:
    from molgen.checkpoints import load_checkpoint
    from molgen.molecules.train import build_parser, train

    common = [
        "--data",
        "subset",
        "--run-dir",
        str(tmp_path / "run"),
        "--hidden",
        "16",
        "--edge-hidden",
        "8",
        "--layers",
        "1",
        "--batch-size",
        "8",
        "--print-every",
        "1000",
    ]
    train(build_parser().parse_args([*common, "--max-steps", "2"]))
    state, card = load_checkpoint(tmp_path / "run" / "ema.pt")
    assert card["provenance"]["global_step"] == 2 and card["config"]["layers"] == 1
    train(build_parser().parse_args([*common, "--max-steps", "4"]))
    _, card = load_checkpoint(tmp_path / "run" / "ema.pt")
    assert card["provenance"]["global_step"] == 4
    last = tmp_path / "run" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["served"] == 4  # position in the epoch
    # a checkpoint without the loader state (older code) still continues the epoch: 4 -> 6, not 0 -> 2
    del ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(ckpt, last)
    train(build_parser().parse_args([*common, "--max-steps", "6"]))
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["served"] == 6
    assert card["provenance"]["train_wall_s"] > 0
    # a cool-down branched off a copy of the run: it resumes there, writes last.ckpt (not last-v1.ckpt) and ends
    # at lr * warm-up (9 / 500) * floor 0.1
    branch = tmp_path / "branch"
    shutil.copytree(tmp_path / "run", branch)
    cool = ["--run-dir", str(branch), "--decay-start", "6", "--decay-steps", "2", "--max-steps", "8"]
    train(build_parser().parse_args([*common[:2], *common[4:], *cool]))
    assert sorted(p.name for p in branch.glob("last*.ckpt")) == ["last.ckpt"]
    ckpt = torch.load(branch / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 9 / 500 * 0.1)


def test_lightning_reshuffles_size_buckets_every_epoch(tmp_path) -> None:
    """Lightning sets the epoch on ``batch_sampler.sampler``: each epoch gets its own batch order."""
    from molgen.checkpoints import load_checkpoint
    from molgen.molecules.train import build_parser, train

    args = ["--data", "subset", "--run-dir", str(tmp_path), "--hidden", "8", "--edge-hidden", "4", "--layers", "1"]
    train(build_parser().parse_args([*args, "--batch-size", "1024", "--max-steps", "30", "--print-every", "1000"]))
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert load_checkpoint(tmp_path / "ema.pt")[1]["provenance"]["epoch"] >= 1
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["epoch"] == 1  # was stuck at 0


def test_tiny_model_overfits_water_and_regenerates_it() -> None:
    """300 Adam steps on one water molecule: samples are mostly stable H2O (untrained: none)."""
    from molgen.molecules.sampling import sample_molecules

    water = torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    types = torch.tensor([ATOM_TYPES.index(s) for s in "OHH"])
    torch.manual_seed(0)
    model = MoleculeDenoiser(hidden=32, edge_hidden=16, layers=2)
    untrained = copy.deepcopy(model).eval()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    b, mask = 64, torch.ones(64, 3, dtype=torch.bool)
    x0 = model.encode(water.expand(b, -1, -1), types.expand(b, -1), mask)
    for _ in range(300):
        t = model.schedule.t_min + (model.schedule.t_max - model.schedule.t_min) * torch.rand(b)
        eps = torch.randn_like(x0)
        eps = torch.cat([centre(eps[..., :3], mask), eps[..., 3:]], -1)
        loss = model.loss(x0, types.expand(b, -1), mask, t, eps)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    config = {"atom_hist": [0, 0, 0, 1]}
    scores, waters = [], []
    for m in (model.eval(), untrained):
        mols = sample_molecules(m, config, 32, solver="dpmpp_2m", steps=20, seed=0)
        scores.append(evaluate([(x.symbols, x.positions) for x in mols]))
        waters.append(sum(sorted(x.symbols) == ["H", "H", "O"] for x in mols))
    assert waters[0] >= 28 and waters[1] < 16  # composition learnt; untrained rarely gets it
    assert scores[0].mol_stability >= 0.3 and scores[1].mol_stability <= 0.1
    assert scores[0].atom_stability > scores[1].atom_stability + 0.4


def coupling_case(seed: int, n: int = 12, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-CoM QM9 positions of ``batch`` subset molecules with ``n`` atoms and zero-CoM noise [B, n, 9]."""
    data = subset()
    idx = torch.nonzero(data["n_atoms"] == n).flatten()[seed * batch : (seed + 1) * batch]
    mask = torch.ones(batch, n, dtype=torch.bool)
    x0 = centre(data["positions"][idx, :n].double(), mask)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, n, 3 + len(ATOM_TYPES) + 1, generator=g, dtype=torch.float64)
    return x0, torch.cat([centre(noise[..., :3], mask), noise[..., 3:]], -1), mask


@pytest.mark.parametrize("rounds", [1, 2])
def test_ot_coupling_never_increases_transport_cost(rounds: int) -> None:
    from molgen.molecules.coupling import ot_couple, transport_cost

    for seed in range(3):
        x0, noise, mask = coupling_case(seed)
        before = transport_cost(x0, noise, mask)
        after = transport_cost(x0, ot_couple(x0, noise, mask, rounds), mask)
        assert (after <= before + 1e-9).all() and (after < 0.8 * before).all()


def test_ot_coupling_permutes_rows_rotates_positions_and_keeps_the_centre() -> None:
    """Coupled noise = P noise with positions turned by one rotation: the feature rows are the noise's (as a
    multiset), the positions are the same rows rigidly rotated, and the centre of mass stays at zero."""
    from molgen.geometry import kabsch
    from molgen.molecules.coupling import ot_couple

    x0, noise, mask = coupling_case(0)
    out = ot_couple(x0, noise, mask)
    for i in range(len(x0)):
        perm = torch.cdist(out[i, :, 3:], noise[i, :, 3:]).argmin(1)  # the continuous features identify each row
        assert sorted(perm.tolist()) == list(range(x0.shape[1]))
        assert torch.equal(out[i, :, 3:], noise[i, perm, 3:])
        rot = kabsch(noise[i, perm, :3], out[i, :, :3])
        assert torch.allclose(noise[i, perm, :3] @ rot, out[i, :, :3], atol=1e-10)
        assert torch.allclose(rot @ rot.T, torch.eye(3, dtype=rot.dtype), atol=1e-12)
        assert torch.det(rot) == pytest.approx(1.0)
    assert torch.allclose(out[..., :3].mean(1), torch.zeros(len(x0), 3, dtype=out.dtype), atol=1e-12)


def test_ot_coupling_is_rotation_equivariant() -> None:
    from molgen.molecules.coupling import ot_couple
    from molgen.testing import random_rotation

    x0, noise, mask = coupling_case(1)
    rot = random_rotation(torch.Generator().manual_seed(3), dtype=torch.float64)
    out = ot_couple(x0, noise, mask)
    turned = ot_couple(x0 @ rot.T, noise, mask)
    assert torch.allclose(turned[..., :3], out[..., :3] @ rot.T, atol=1e-9)
    assert torch.equal(turned[..., 3:], out[..., 3:])


def test_ot_coupling_leaves_padding_alone() -> None:
    from molgen.molecules.coupling import ot_couple

    x0, noise, _ = coupling_case(0)
    mask = torch.arange(x0.shape[1]) < torch.tensor([12, 9, 5]).unsqueeze(1)
    x0, noise = centre(x0, mask), torch.cat([centre(noise[..., :3], mask), noise[..., 3:]], -1)
    out = ot_couple(x0, noise, mask)
    assert torch.equal(out[~mask], noise[~mask])
    for i, n in enumerate((12, 9, 5)):
        assert torch.allclose(out[i, :n], ot_couple(x0[i : i + 1, :n], noise[i : i + 1, :n], mask[i : i + 1, :n])[0])


def test_training_times_lean_towards_the_data() -> None:
    from molgen.molecules.train import sample_times

    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(sample_times(u, 0.001, 0.999), 0.001 + 0.998 * u)
    s = (sample_times(u, 0.001, 0.999, beta=2.0) - 0.001) / 0.998
    assert 0.0 <= float(s.min()) and float(s.max()) <= 1.0
    assert float(s.mean()) == pytest.approx(1 / 3, abs=3e-3)  # Beta(1, 2)
    assert float((s < 0.5).double().mean()) == pytest.approx(0.75, abs=3e-3)


def test_x0_model_predicts_the_same_on_the_flow_path(tiny: MoleculeDenoiser) -> None:
    """Warm start onto ``linear_flow``: at equal log-SNR the flow state is the VP state times alpha_f / alpha_vp,
    and the preconditioned denoiser sees scale-free inputs and lambda, so it predicts the same x0."""
    from molgen.diffusion.schedules import get_schedule

    flow = copy.deepcopy(tiny)
    flow.schedule = get_schedule("linear_flow")
    g = torch.Generator().manual_seed(4)
    x, t, mask = noisy_batch(tiny, g)
    t_flow = flow.schedule.t_of_lam(tiny.schedule.lam(t))
    k = (flow.schedule.alpha(t_flow) / tiny.schedule.alpha(t)).view(-1, 1, 1)
    assert torch.allclose(flow(x * k, t_flow, mask=mask), tiny(x, t, mask=mask), atol=1e-9)


def test_records_with_unrepresentable_atoms_are_named_and_skipped() -> None:
    import pandas as pd

    from molgen.molecules.data import PROPERTIES, frame_to_tensors

    rows = [
        {"Index": 1, "SMILES": "C", "N_atoms": 2, "Elements": "['C','H']", "XYZ_Ang": "[[0.,0.,0.],[1.,0.,0.]]"},
        {"Index": 2, "SMILES": "S", "N_atoms": 2, "Elements": "['S','H']", "XYZ_Ang": "[[0.,0.,0.],[1.3,0.,0.]]"},
        {"Index": 3, "SMILES": "O", "N_atoms": 2, "Elements": "['O','H']", "XYZ_Ang": "[[0.,0.,0.],[0.9,0.,0.]]"},
    ]
    frame = pd.DataFrame([{**r, **{col: 0.0 for col, _ in PROPERTIES}} for r in rows])
    with pytest.warns(UserWarning, match=r"skipped 1 records .*index 2 \(S\)"):
        data = frame_to_tensors(frame)
    assert data["index"].tolist() == [1, 3] and data["smiles"] == ["C", "O"]
    assert data["skipped"] == ["index 2 (S)"]
    assert data["types"][1, :2].tolist() == [ATOM_TYPES.index("O"), ATOM_TYPES.index("H")]


def test_flow_recipe_warm_starts_from_a_checkpoint(tmp_path) -> None:
    from molgen.checkpoints import load_checkpoint
    from molgen.molecules.train import build_parser, train

    small = ["--data", "subset", "--hidden", "16", "--edge-hidden", "8", "--layers", "1", "--batch-size", "8",
             "--print-every", "1000", "--max-steps", "2"]
    train(build_parser().parse_args([*small, "--run-dir", str(tmp_path / "base")]))
    base_state, base_card = load_checkpoint(tmp_path / "base" / "ema.pt")
    flow = ["--run-dir", str(tmp_path / "flow"), "--schedule", "linear_flow", "--coupling", "ot", "--time-beta", "2",
            "--init", str(tmp_path / "base" / "ema.pt"), "--keep-exports", "--lr", "0"]
    train(build_parser().parse_args([*small, *flow]))
    state, card = load_checkpoint(tmp_path / "flow" / "ema.pt")
    assert load_checkpoint(tmp_path / "flow" / "exports" / "step_2.pt")[1]["provenance"]["global_step"] == 2
    assert card["config"]["schedule"] == "linear_flow" and card["provenance"]["global_step"] == 2
    init = card["provenance"]["init"]
    assert init["global_step"] == 2 and init["train_wall_s"] == pytest.approx(base_card["provenance"]["train_wall_s"])
    assert all(torch.equal(state[k], v) for k, v in base_state.items())  # lr 0: the weights are the init's
    with pytest.raises(ValueError, match="hidden"):
        train(build_parser().parse_args([*small, *flow[:-2], "--hidden", "24", "--run-dir", str(tmp_path / "x")]))


def test_self_conditioning_warm_starts_and_samples_what_its_base_model_does(tmp_path) -> None:
    """Zero-initialised self-conditioning weights: the warm-started model samples its base model's molecules."""
    from molgen.checkpoints import load_checkpoint
    from molgen.molecules.sampling import load_model, sample_molecules
    from molgen.molecules.train import build_parser, train

    small = ["--data", "subset", "--hidden", "16", "--edge-hidden", "8", "--layers", "1", "--batch-size", "8",
             "--print-every", "1000", "--max-steps", "2"]
    train(build_parser().parse_args([*small, "--run-dir", str(tmp_path / "base")]))
    sc = ["--run-dir", str(tmp_path / "sc"), "--self-condition", "--init", str(tmp_path / "base" / "ema.pt"),
          "--lr", "0"]
    train(build_parser().parse_args([*small, *sc]))
    state, card = load_checkpoint(tmp_path / "sc" / "ema.pt")
    assert card["config"]["self_condition"] and not state["sc_edge.weight"].any()
    (base, config), (model, _) = load_model(tmp_path / "base" / "ema.pt"), load_model(tmp_path / "sc" / "ema.pt")
    assert model.self_conditioning and not base.self_conditioning
    a, b = (sample_molecules(m, config, 4, solver="dpmpp_2m", steps=5, seed=0) for m in (base, model))
    assert all(np.allclose(x.positions, y.positions, atol=1e-5) and x.symbols == y.symbols for x, y in zip(a, b))
    with pytest.raises(ValueError, match="do not fit"):  # a self-conditioned checkpoint into a plain run
        train(build_parser().parse_args([*small, "--run-dir", str(tmp_path / "x"), "--init",
                                         str(tmp_path / "sc" / "ema.pt")]))


def test_training_runs_under_bf16_autocast_and_exports_float32_weights(tmp_path) -> None:
    """The precision a GPU window trains in (bf16-mixed), here on the CPU, with self-conditioning."""
    from molgen.checkpoints import load_checkpoint
    from molgen.molecules.train import build_parser, train

    train(build_parser().parse_args(["--data", "subset", "--hidden", "16", "--edge-hidden", "8", "--layers", "1",
                                     "--batch-size", "8", "--print-every", "1000", "--max-steps", "3",
                                     "--self-condition", "--precision", "bf16-mixed",
                                     "--run-dir", str(tmp_path / "run")]))
    state, card = load_checkpoint(tmp_path / "run" / "ema.pt")
    assert card["provenance"]["hardware"].endswith("bf16-mixed") and card["provenance"]["global_step"] == 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_flow_path_model_started_below_t_max_samples_what_its_vp_twin_does(tiny: MoleculeDenoiser) -> None:
    """At equal log-SNR the flow state is the VP state times s = sqrt(alpha^2 + sigma^2): started at 4 A, the
    flow copy's noise must be carried by s(t_0) / s(t_max) for the two ODE runs to give the same molecules."""
    from molgen.diffusion import get_schedule
    from molgen.molecules.sampling import sample_molecules

    vp = copy.deepcopy(tiny).float()
    flow = copy.deepcopy(vp)
    flow.schedule = get_schedule("linear_flow")
    config = {"atom_hist": [0] * 9 + [1], "max_atoms": 29}
    kw = {"solver": "dpmpp_2m", "steps": 6, "seed": 3, "step_scale": 1.0, "first_noise": 4.0, "last_noise": 0.05}
    a = sample_molecules(vp, config, 4, **kw)
    b = sample_molecules(flow, config, 4, **kw)
    assert len(a) == len(b) == 4
    for m, n in zip(a, b):
        np.testing.assert_allclose(m.positions, n.positions, atol=1e-3)
