"""Backbones: PDB/mmCIF I/O, rebuild geometry, metrics on natural chains, DSSP, model equivariance, motifs."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from molgen.geometry import centre, superpose
from molgen.structure.data import TS50_DIR, crop_batch, load_segments
from molgen.structure.geometry import kabsch_rmsd, project_ca_bonds, rebuild_backbone
from molgen.structure.io import Backbone, backbone_from_ca, list_structure_files, read_backbone, write_backbone
from molgen.structure.metrics import backbone_metrics, dssp, evaluate, tm_score
from molgen.structure.model import BackboneDenoiser, ModelConfig
from molgen.structure.sampling import (
    layout,
    motif_residues,
    parse_contig,
    sample_ca,
    scaffold_ca,
    scaffold_from_file,
)
from molgen.structure.sse import UNKNOWN_SS
from molgen.structure.training import edm_loss
from molgen.testing import assert_equivariant, random_rotation

TS50 = list_structure_files(TS50_DIR)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run tiny models; on a shared 2-core runner one thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = ModelConfig(hidden=16, layers=2, rbf=8)
EXTENDED = ModelConfig(hidden=16, layers=2, rbf=8, fine_rbf=9, local_coord=2, bond_feature=True, ss_condition=True,
                       pair_dim=8, pair_blocks=1, self_condition=True)


def _pdb_lines(path: Path) -> list[str]:
    return gzip.decompress(path.read_bytes()).decode().splitlines()


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\nEND\n")
    return p


# ------------------------------------------------------------------------------------------------ I/O
@pytest.mark.parametrize("fmt", ["pdb", "cif"])
def test_round_trip_pdb_and_mmcif(tmp_path: Path, fmt: str) -> None:
    bb = read_backbone(TS50[0])
    out = write_backbone(bb, tmp_path / f"x.{fmt}")
    again = read_backbone(out)
    assert again.sequence == bb.sequence and again.residue_numbers == bb.residue_numbers
    np.testing.assert_allclose(again.coords, bb.coords, atol=1e-3)
    third = read_backbone(write_backbone(again, tmp_path / f"y.{fmt}"))
    np.testing.assert_allclose(third.coords, bb.coords, atol=1e-3)


def test_natural_chains_parse_without_problems() -> None:
    for p in TS50[:10]:
        bb = read_backbone(p)
        assert 79 <= len(bb) <= 173 and not bb.breaks and not bb.missing
        assert bb.segments() == [(0, len(bb))]


def test_missing_ca_is_an_error_naming_chain_and_residue(tmp_path: Path) -> None:
    lines = [ln for ln in _pdb_lines(TS50[0]) if ln.startswith("ATOM")]
    second = lines[[i for i, ln in enumerate(lines) if ln[12:16] == " CA "][1]]
    resnum, resname, chain = second[22:27].strip(), second[17:20], second[21]
    bad = [ln for ln in lines if ln is not second]
    with pytest.raises(ValueError, match=f"{chain}:{resnum} {resname} has no CA"):
        read_backbone(_write(tmp_path, "noca.pdb", bad))
    assert len(read_backbone(_write(tmp_path, "noca2.pdb", bad), strict=False)) == len(read_backbone(TS50[0])) - 1


def test_nonstandard_residue_missing_atoms_and_breaks(tmp_path: Path) -> None:
    lines = [ln for ln in _pdb_lines(TS50[0]) if ln.startswith("ATOM")]
    bb = read_backbone(TS50[0])
    r5, r9 = bb.residue_numbers[5], bb.residue_numbers[9]
    mse = [ln[:17] + "MSE" + ln[20:] if int(ln[22:26]) == r5 else ln for ln in lines]
    modified = read_backbone(_write(tmp_path, "mse.pdb", mse))  # a modified residue is read as backbone
    assert modified.sequence[5] == "M" and np.allclose(modified.coords, bb.coords)
    # drop residue r9 entirely (a break) and the O of residue r5 (a missing atom)
    cut = [ln for ln in lines if int(ln[22:26]) != r9 and not (int(ln[22:26]) == r5 and ln[12:16] == " O  ")]
    got = read_backbone(_write(tmp_path, "cut.pdb", cut))
    assert got.missing == [f"A:{r5} {bb.label(5).split()[1]} missing O"]
    assert len(got.breaks) == 1 and f"A:{bb.residue_numbers[8]}" in got.breaks[0]
    assert np.isnan(got.coords[5, 3]).all()


def test_malformed_files_give_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pdb"
    bad.write_text("ATOM      1  CA  GLY A   1      1.000   abc     3.000  1.00  0.00           C\n")
    with pytest.raises(ValueError, match="bad.pdb"):
        read_backbone(bad)
    empty = tmp_path / "empty.pdb"
    empty.write_text("HEADER    nothing here\nEND\n")
    with pytest.raises(ValueError, match="empty.pdb"):
        read_backbone(empty)
    badgz = tmp_path / "x.pdb.gz"
    badgz.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="gzip"):
        read_backbone(badgz)
    with pytest.raises(ValueError, match="no chain 'Q'"):
        read_backbone(TS50[0], chain="Q")


def test_malformed_mmcif_and_missing_ca_in_mmcif(tmp_path: Path) -> None:
    bb = read_backbone(TS50[0])
    text = write_backbone(bb, tmp_path / "ok.cif").read_text()
    lines = text.splitlines()
    atoms = [i for i, ln in enumerate(lines) if ln.startswith("ATOM")]
    cases = {
        "short.cif": [*lines[: atoms[5]], " ".join(lines[atoms[5]].split()[:8])],  # a truncated atom row
        "coord.cif": [ln.replace(ln.split()[10], "x1.5") if i == atoms[2] else ln for i, ln in enumerate(lines)],
        "nosite.cif": ["data_x", "_entry.id x"],
        "quote.cif": ["data_x", "loop_", "_atom_site.id", "'open"],
    }
    for name, rows in cases.items():
        with pytest.raises(ValueError, match=f"{name}: malformed mmCIF"):
            read_backbone(_write(tmp_path, name, rows))
    ca_row = lines[atoms[5]]  # the CA of the second residue (N, CA, C, O per residue)
    assert ca_row.split()[3] == "CA"
    label = f"A:{bb.residue_numbers[1]} {bb.label(1).split()[1]}"
    with pytest.raises(ValueError, match=f"residue {label} has no CA"):
        read_backbone(_write(tmp_path, "noca.cif", [ln for ln in lines if ln is not ca_row]))


# ------------------------------------------------------------------------------------------------ geometry
def test_rebuild_is_accurate_and_equivariant() -> None:
    bb = read_backbone(TS50[3])
    rebuilt = rebuild_backbone(bb.ca)
    rmsd = np.sqrt(((rebuilt - bb.coords) ** 2).sum(-1).mean(0))  # per atom type
    assert rmsd[1] == 0 and rmsd[0] < 0.4 and rmsd[2] < 0.4 and rmsd[3] < 1.0
    assert_equivariant(lambda ca: torch.from_numpy(rebuild_backbone(ca.numpy())),
                       torch.from_numpy(bb.ca.astype(np.float64)), atol=1e-3, rtol=0)


def test_ca_bond_projection_is_exact_equivariant_and_minimal() -> None:
    ca = torch.from_numpy(read_backbone(TS50[1]).ca.astype(np.float64))
    g = torch.Generator().manual_seed(5)
    noisy = ca + 0.3 * torch.randn(ca.shape, generator=g, dtype=torch.float64)
    out = project_ca_bonds(noisy, tol=1e-6)
    bonds = (out[1:] - out[:-1]).norm(dim=-1)
    assert (bonds - 3.80).abs().max() < 1e-6
    torch.testing.assert_close(out.mean(0), noisy.mean(0))  # equal and opposite moves keep the centre
    assert_equivariant(lambda a: project_ca_bonds(a, tol=1e-6), noisy, generator=g)
    r = random_rotation(g, dtype=torch.float64)
    # a near-nearest point: closer to the input than the natural chain (whose bonds are 3.80 +- 0.05 A) is,
    # and a chain already at 3.80 A does not move
    assert (out - noisy).norm(dim=-1).mean() < 0.7 * (noisy - ca).norm(dim=-1).mean()
    torch.testing.assert_close(project_ca_bonds(out, tol=1e-6), out)
    batch = project_ca_bonds(torch.stack([noisy, noisy @ r.T]), tol=1e-6)
    torch.testing.assert_close(batch[1], out @ r.T)


def test_dssp_matches_reference_files() -> None:
    """pydssp on the deposited backbone reproduces the shipped .dssp strings (one borderline H-bond may flip
    with float32 coordinates); from the CA trace alone (rebuilt N, C, O) most residues still agree."""
    for p in TS50[::5]:
        ref = Path(str(p).removesuffix(".gz") + ".dssp").read_text().split()[0]
        bb = read_backbone(p)
        ss = dssp(bb.coords)
        assert len(ss) == len(ref) and sum(a != b for a, b in zip(ss, ref)) <= 3
        rebuilt = dssp(rebuild_backbone(bb.ca))  # over all TS50: 81-100 %, mean 93 %
        assert np.mean([a == b for a, b in zip(rebuilt, ref)]) > 0.75


def test_metrics_on_natural_chains() -> None:
    rows = [backbone_metrics(read_backbone(p)) for p in TS50[:8]]
    assert min(r["ca_ca_valid"] for r in rows) > 0.95
    assert max(r["clash_rate"] for r in rows) == 0.0
    rg = [r["rg_ratio"] for r in rows]  # TS50: 0.88-1.08, one elongated chain 1.34
    assert 0.85 < np.median(rg) < 1.1 and all(0.8 < v < 1.4 for v in rg)
    assert all(abs(r["helix"] + r["strand"] + r["coil"] - 1) < 1e-9 for r in rows)


def test_clash_and_bond_metrics_detect_bad_geometry() -> None:
    ca = read_backbone(TS50[0]).ca.astype(np.float64)
    bad = ca.copy()
    bad[10] = bad[40] + 0.3  # a clash
    m = backbone_metrics(backbone_from_ca(bad))
    assert m["clash_rate"] == pytest.approx(2 / len(ca))
    assert m["ca_ca_valid"] < 1 - 1.5 / len(ca)


@pytest.mark.skipif(find_spec("tmtools") is None, reason="tmtools (optional GPL extra) not installed")
def test_tm_scores() -> None:
    a, b = read_backbone(TS50[0]).ca, read_backbone(TS50[1]).ca
    r = random_rotation(torch.Generator().manual_seed(1)).numpy()
    assert tm_score(a, a @ r.T + 3.0) == pytest.approx(1.0, abs=1e-3)
    assert tm_score(a, b) < 0.5
    out = evaluate([backbone_from_ca(a), backbone_from_ca(b)], reference=[a], tm=True, mpnn=False)
    assert out["novelty"] == pytest.approx((1.0 + tm_score(b, a)) / 2, abs=1e-3)


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("cfg", [SMALL, EXTENDED])
def test_denoiser_is_rotation_equivariant_translation_invariant_and_ignores_padding(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = BackboneDenoiser(cfg)
    for p in model.parameters():  # the extensions start at zero; make them act
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 24:] = False
    x = centre(torch.randn(2, 30, 3) * 8, mask)
    sigma = torch.tensor([0.5, 20.0])
    cond = {}
    if cfg.ss_condition:  # one chain given per-residue labels, the other only a composition
        cond = {"ss": torch.randint(0, UNKNOWN_SS + 1, (2, 30), generator=torch.Generator().manual_seed(3)),
                "composition": torch.tensor([[0.4, 0.3, 0.3], [0.2, 0.2, 0.6]])}
        cond["ss"][1] = UNKNOWN_SS
    def estimate(a: torch.Tensor) -> torch.Tensor | None:  # a self-conditioning estimate that moves with the input
        return 0.8 * a if cfg.self_condition else None

    out = model.denoise(x, sigma, mask, **cond, self_cond=estimate(x))
    assert_equivariant(lambda a, m: model.denoise(a, sigma, m, **cond, self_cond=estimate(a)), x, mask=mask,
                       output="vectors", generator=torch.Generator().manual_seed(2), atol=1e-4, rtol=1e-4)
    x_pad = x.clone()
    x_pad[1, 24:] = 99.0
    torch.testing.assert_close(model.denoise(x_pad, sigma, mask, **cond, self_cond=estimate(x))[1, :24], out[1, :24],
                               atol=1e-4, rtol=1e-4)
    if cfg.ss_condition:
        assert not torch.allclose(model.denoise(x, sigma, mask, self_cond=estimate(x)), out, atol=1e-4)  # read
    if cfg.self_condition:
        assert not torch.allclose(model.denoise(x, sigma, mask, **cond), out, atol=1e-4)  # the estimate is read
    assert torch.all(out[1, 24:] == 0)


def test_loss_and_gradients_are_finite_with_padding() -> None:
    segs = [replace(s, ca=s.ca[:45], ss=s.ss[:45]) for s in load_segments([TS50_DIR])[:4]]
    batch = crop_batch(segs, np.random.default_rng(0), 60, 60, edge_budget=4 * 3600)
    assert not batch.mask.all() and (batch.ss[~batch.mask] == UNKNOWN_SS).all()
    model = BackboneDenoiser(EXTENDED)
    for p in model.parameters():  # the extensions start at zero; make them act
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    loss, parts = edm_loss(model, batch, generator=torch.Generator().manual_seed(0), contact_weight=1.0)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert np.isfinite(parts["denoise"]) and np.isfinite(parts["local"]) and np.isfinite(parts["contact"])
    assert len(grads) > 20
    assert all(torch.isfinite(g).all() for g in grads)


def test_contact_error_scores_only_non_local_contacts_and_ignores_rigid_motions() -> None:
    from molgen.structure.training import contact_error

    ca = torch.tensor(read_backbone(TS50[0]).ca[:60], dtype=torch.float32)[None]
    mask = torch.ones(1, 60, dtype=torch.bool)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    assert float(contact_error(ca @ q.T + 5.0, ca, mask)) < 1e-6
    d = torch.cdist(ca[0], ca[0])
    i = torch.arange(60)
    contacts = ((i[:, None] - i[None]).abs() > 4) & (d < 8.0)
    scaled = contact_error(1.1 * ca, ca, mask)  # every distance 10 % longer: the error is 0.01 d^2 on the contacts
    torch.testing.assert_close(scaled, (0.01 * d[contacts] ** 2).mean()[None], rtol=1e-4, atol=1e-5)
    mask[0, 30:] = False  # padding carries nothing
    keep = contacts & (i[:, None] < 30) & (i[None] < 30)
    torch.testing.assert_close(contact_error(1.1 * ca, ca, mask), (0.01 * d[keep] ** 2).mean()[None], rtol=1e-4,
                               atol=1e-5)


def _model_with_schedule() -> BackboneDenoiser:
    from molgen.diffusion import get_schedule

    torch.manual_seed(0)
    model = BackboneDenoiser(SMALL, get_schedule("edm", sigma_min=0.02, sigma_max=80.0))
    return model.eval()


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun"])
def test_rotated_noise_gives_rotated_backbones(solver: str) -> None:
    model = _model_with_schedule()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 40, 3, generator=g) * 80
    x_T = x_T - x_T.mean(1, keepdim=True)
    assert_equivariant(lambda x: sample_ca(model, 2, 40, solver, 4, x_T=x), x_T, translate=False,
                       generator=torch.Generator().manual_seed(3), atol=2e-3, rtol=1e-3)
    a = sample_ca(model, 2, 40, solver, 4, x_T=x_T)
    torch.testing.assert_close(sample_ca(model, 2, 40, solver, 4, x_T=x_T), a)  # deterministic
    with pytest.raises(ValueError, match="outside the model's range"):
        sample_ca(model, 1, 300, solver, 5)


def test_a_self_conditioned_model_samples_its_base_models_backbones_until_it_learns() -> None:
    """Zero-initialised estimate inputs: the sampler's self-conditioning changes nothing until they are trained."""
    from dataclasses import replace as with_fields

    base = _model_with_schedule()
    for layer in base.layers:  # coordinate updates that matter (they start near zero)
        torch.nn.init.normal_(layer.coord.weight, std=0.1)
    model = BackboneDenoiser(with_fields(SMALL, self_condition=True), base.schedule).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    x_T = torch.randn(2, 40, 3, generator=torch.Generator().manual_seed(0)) * 80
    a = sample_ca(base, 2, 40, "dpmpp_2m", 5, x_T=x_T)
    torch.testing.assert_close(sample_ca(model, 2, 40, "dpmpp_2m", 5, x_T=x_T), a)
    torch.nn.init.normal_(model.sc_message.weight, std=0.1)
    assert not torch.allclose(sample_ca(model, 2, 40, "dpmpp_2m", 5, x_T=x_T), a, atol=1e-3)


def test_grid_settings_place_the_first_and_last_calls() -> None:
    """The grid follows its GridSettings, whatever the step count: the few-step settings at 5 and at 50 calls."""
    from molgen.diffusion.step_scale import scaled_rho
    from molgen.structure.sampling import FEW_STEPS, MANY_STEPS, SIGMA_MIN, WARM_START_SIGMA, GridSettings, make_sampler

    model = _model_with_schedule()
    cold = GridSettings(warm_start=False)
    cases = [("euler", 5, FEW_STEPS, 0.1, -4.0, WARM_START_SIGMA), ("euler", 50, FEW_STEPS, 0.1, -4.0,
                                                                      WARM_START_SIGMA),
             ("euler", 5, cold, 0.1, -4.0, 80.0), ("af3", 200, MANY_STEPS, SIGMA_MIN, 7.0, 80.0),
             ("heun", 7, GridSettings(sigma_last=1.5), 1.5, -4.0, WARM_START_SIGMA)]
    for solver, steps, settings, last, rho, first in cases:
        sampler = make_sampler(model, solver, steps, 40, settings=settings)
        assert (sampler.warm_start is not None) == (first == WARM_START_SIGMA)
        # AF3's step scale 1.5: af3's own option, the engine's step-scaled ODE for the others, whose state grid
        # s = rho_0 (sigma / rho_0)^1.5 maps back to the told noise levels sigma
        eta = sampler.options["step_scale"] if solver == "af3" else sampler.step_scale
        assert eta == 1.5 and (sampler.step_scale == 1.0 if solver == "af3" else "step_scale" not in sampler.options)
        s = model.schedule.rho(sampler.t_grid[0])
        sigma = scaled_rho(s, s[0], 1.0 / sampler.step_scale)
        assert float(sigma[0]) == pytest.approx(first) and float(sigma[-1]) == pytest.approx(last)
        spacing = (sigma ** (1 / rho)).diff()  # Karras: equal steps in sigma^(1/rho)
        assert torch.allclose(spacing, spacing[0].expand_as(spacing), rtol=1e-5)
        assert bool((sigma[1:] < sigma[:-1]).all())
    with pytest.raises(ValueError, match="outside the schedule's noise range"):
        make_sampler(model, "euler", 5, 40, settings=GridSettings(sigma_last=0.001, warm_start=False))
    with pytest.raises(ValueError, match="warm-started run's noise range"):
        make_sampler(model, "euler", 5, 40, settings=GridSettings(sigma_last=6.0))
    with pytest.raises(ValueError, match="needs the chain length"):
        make_sampler(model, "euler", 5)


def test_distance_law_and_chain_prior() -> None:
    from molgen.structure.prior import chain_covariance, chain_prior, distance_law

    line = np.arange(50)[:, None] * np.array([[3.8, 0.0, 0.0]])  # straight chain: d_k = 3.8 k
    np.testing.assert_allclose(distance_law([line, line[:30]], 20), (3.8 * np.arange(21)) ** 2)
    with pytest.raises(ValueError, match="no residue pairs"):
        distance_law([line[:10]], 20)
    # A random walk's law (d2_k = b^2 k) is Euclidean: C reproduces every D_ij and is centred.
    walk = 14.44 * np.arange(60.0)
    c = chain_covariance(60, walk).numpy()
    k = np.abs(np.arange(60)[:, None] - np.arange(60)[None])
    np.testing.assert_allclose(3 * (np.diag(c)[:, None] + np.diag(c)[None] - 2 * c), walk[k], atol=1e-8)
    np.testing.assert_allclose(c.sum(1), 0.0, atol=1e-9)
    # The shipped law: samples of the prior keep the measured spacings (clamping C changes them by < 5 %).
    prior = chain_prior(80)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, prior.eigvals.numel(), generator=g, dtype=torch.float64)
    x = ((z * prior.eigvals.sqrt()) @ prior.eigvecs.T).reshape(4000, 80, 3)
    from molgen.structure._chain_law import CA_D2

    for sep in (1, 4, 16):
        d2 = ((x[:, sep:] - x[:, :-sep]) ** 2).sum(-1).mean()
        assert float(d2) == pytest.approx(CA_D2[sep], rel=0.05)
    centre = torch.zeros(4000, 3, dtype=torch.float64)
    torch.testing.assert_close(x.mean(1), centre, atol=1e-6, rtol=0)  # zero centre of mass
    with pytest.raises(ValueError, match="covers lengths"):
        chain_covariance(300)


# ------------------------------------------------------------------------------------------------ motifs
def test_contig_parsing_and_errors() -> None:
    segs = parse_contig("A10-25,40-60,A40-52")
    assert [(s.chain, s.start, s.end) for s in segs] == [("A", 10, 25), (None, 40, 60), ("A", 40, 52)]
    pos, length = layout(parse_contig("5,A1-3,7"), np.random.default_rng(0))
    assert pos == [5, 6, 7] and length == 15
    for bad, msg in [
        ("", "empty"),
        ("A10-", "part 1"),
        ("A10-25,B7-3", "before its start"),
        ("20-10,A1-5", "decreasing"),
        ("10-20", "no motif"),
        ("A1-5,x", "part 2"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_contig(bad)
    bb = read_backbone(TS50[0])
    last = bb.residue_numbers[-1]
    with pytest.raises(ValueError, match=f"chain A of {bb.name} has no residue {last + 1}"):
        motif_residues(parse_contig(f"A{last - 2}-{last + 3},10"), {"A": bb})
    with pytest.raises(ValueError, match="no chain B"):
        motif_residues(parse_contig("B1-4,10"), {"A": bb})
    first = bb.residue_numbers[0]
    with pytest.raises(ValueError, match="lays out 305 residues: backbone length 305 is outside"):
        scaffold_from_file(_model_with_schedule(), TS50[0], f"A{first}-{first + 4},300", 1)


def test_kabsch_and_scaffold_keep_the_motif() -> None:
    motif = torch.from_numpy(read_backbone(TS50[0]).ca[10:22].astype(np.float32))
    r = random_rotation(torch.Generator().manual_seed(4))
    rot, shift = superpose(motif[None], (motif @ r.T + 2.0)[None])
    torch.testing.assert_close(rot[0], r.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(motif @ rot[0] + shift[0], motif @ r.T + 2.0, atol=1e-4, rtol=1e-4)
    res = scaffold_ca(_model_with_schedule(), motif, list(range(14, 26)), 44, 2, solver="dpmpp_2m", steps=4)
    assert res.ca.shape == (2, 44, 3)
    torch.testing.assert_close(res.ca[:, 14:26], motif.expand(2, -1, -1))
    assert kabsch_rmsd(res.ca[0, 14:26].numpy(), motif.numpy()) < 1e-3


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_sample_and_evaluate(tmp_path: Path) -> None:
    from molgen.checkpoints import save_checkpoint
    from molgen.cli import main

    model = _model_with_schedule()
    ckpt = save_checkpoint(tmp_path / "m.pt", model.state_dict(), SMALL.to_dict(), provenance={"note": "test"})
    out = tmp_path / "samples"
    args = [
        "sample",
        "backbones",
        "--n",
        "2",
        "--length",
        "40",
        "--steps",
        "3",
        "--out",
        str(out),
        "--checkpoint",
        str(ckpt),
        "--format",
        "cif",
    ]
    assert main(args) == 0
    assert len(list_structure_files(out)) == 2
    meta = json.loads((out / "sampling.json").read_text())
    assert meta["preset"] == "default" and meta["steps"] == 3 and meta["solver"] == "unipc"
    assert meta["warm_start"] is True and meta["rho"] == -4.0 and meta["step_scale"] == 1.5  # the preset's grid
    cold = tmp_path / "cold"
    assert main([*args[:9], str(cold), *args[10:], "--no-warm-start", "--step-scale", "1"]) == 0
    meta = json.loads((cold / "sampling.json").read_text())
    assert meta["warm_start"] is False and meta["step_scale"] == 1.0
    # batches draw from one stream: seed 0's second batch is not seed 2's first (seed + start once made it so)
    two, shifted = tmp_path / "two", tmp_path / "shifted"
    assert main([*args[:9], str(two), *args[10:], "--n", "4", "--batch-size", "2"]) == 0
    assert main([*args[:9], str(shifted), *args[10:], "--seed", "2"]) == 0
    second = read_backbone(two / "sample_0002.cif").ca
    assert not np.allclose(second, read_backbone(shifted / "sample_0000.cif").ca)
    assert main([*args, "--solver", "ddpm_ancestral", "--step-scale", "1.5"]) == 2  # not an ODE solver
    assert main([*args[:-2], "--solver", "euler", "--gamma-0", "0"]) == 2  # af3 option on an ODE solver
    assert main([*args, "--sigma-last", "500"]) == 2  # beyond the schedule's sigma_max
    ideal = tmp_path / "ideal"
    assert main([*args[:9], str(ideal), *args[10:], "--ideal-bonds"]) == 0
    for path in list_structure_files(ideal):
        ca = read_backbone(path).ca
        np.testing.assert_allclose(np.linalg.norm(np.diff(ca, axis=0), axis=-1), 3.80, atol=3e-3)
    assert main([*args[:6], "--length", "20", *args[8:]]) == 2  # below the model's range
    motif = [
        "--motif-pdb",
        str(TS50[0]),
        "--contig",
        f"5,A{read_backbone(TS50[0]).residue_numbers[3]}-{read_backbone(TS50[0]).residue_numbers[14]},30",
    ]
    assert main([*args[:4], "--steps", "3", "--out", str(tmp_path / "motif"), "--checkpoint", str(ckpt), *motif]) == 0
    assert main([*args[:4], "--out", str(tmp_path / "m2"), "--checkpoint", str(ckpt), *motif, "--ideal-bonds"]) == 2
    meta = json.loads((tmp_path / "motif" / "sampling.json").read_text())
    assert meta["motif_positions"][0] == 5 and len(meta["motif_positions"]) == 12
    report = tmp_path / "m.json"
    assert main(["evaluate", "backbones", str(out), "--json", str(report), "--reference", str(out)]) == 0
    metrics = json.loads(report.read_text())
    for key in (
        "n",
        "ca_ca_valid",
        "clash_rate",
        "rg_ratio",
        "helix",
        "strand",
        "coil",
        "tm_diversity",
        "novelty",
    ):
        assert key in metrics
    assert metrics["n"] == 2


def test_backbone_validates_shapes() -> None:
    with pytest.raises(ValueError, match="sequence length"):
        Backbone(np.zeros((3, 4, 3)), "GG")


def test_training_exports_and_resumes(tmp_path: Path) -> None:
    from molgen.checkpoints import load_checkpoint
    from molgen.structure.training import train

    kwargs = {"config": SMALL.to_dict(), "max_length": 48, "edge_budget": 2 * 48**2, "every": 1}
    export = train(tmp_path / "run", tmp_path / "m.pt", [TS50_DIR], max_steps=2, max_minutes=5, **kwargs)
    state, card = load_checkpoint(export)
    assert card["provenance"]["steps"] == 2 and card["provenance"]["resumed_from_step"] == 0
    train(tmp_path / "run", export, [TS50_DIR], max_steps=3, max_minutes=5, **kwargs)
    state2, card2 = load_checkpoint(export)
    assert card2["provenance"]["steps"] == 3 and card2["provenance"]["resumed_from_step"] == 2
    assert any(not torch.equal(state[k], state2[k]) for k in state)
    # a third invocation resumes from step 3 (Lightning's version counter once wrote last-v1.ckpt beside last.ckpt
    # and the next invocation restarted from the older file); the run keeps its config whatever is passed; its
    # cool-down from step 3 over 1 step ends at lr * warm-up (5 / 200) * floor 0.1
    third = {**kwargs, "config": EXTENDED.to_dict(), "decay": (3, 1)}
    train(tmp_path / "run", export, [TS50_DIR], max_steps=4, max_minutes=5, **third)
    _, card3 = load_checkpoint(export)
    assert card3["provenance"]["resumed_from_step"] == 3 and card3["provenance"]["steps"] == 4
    assert sorted(p.name for p in (tmp_path / "run").glob("*.ckpt")) == ["last.ckpt"]
    opt = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["optimizer_states"][0]
    assert opt["param_groups"][0]["lr"] == pytest.approx(5e-4 * 5 / 200 * 0.1)
    assert card3["config"]["fine_rbf"] == 0
    # a new run warm-started from the export with the extended architecture
    warm = {**kwargs, "config": EXTENDED.to_dict(), "init": export}
    _, card4 = load_checkpoint(train(tmp_path / "warm", tmp_path / "w.pt", [TS50_DIR], 1, 5, **warm))
    init = card4["provenance"]["init"]
    assert init["path"] == str(export) and init["provenance"]["steps"] == 4 and len(init["sha256"]) == 64
    assert card4["config"]["fine_rbf"] == EXTENDED.fine_rbf


def test_zero_initialised_extensions_reproduce_the_base_model(tmp_path: Path) -> None:
    """A warm start of the extended architecture from base weights computes the same denoiser at step 0."""
    from molgen.checkpoints import save_checkpoint
    from molgen.structure.training import BackboneDiffusion, warm_start

    torch.manual_seed(0)
    base = BackboneDenoiser(SMALL)
    path = save_checkpoint(tmp_path / "b.pt", base.state_dict(), SMALL.to_dict(), provenance={})
    module = BackboneDiffusion(EXTENDED.to_dict())
    warm_start(module, path)
    x = centre(torch.randn(2, 30, 3) * 5, torch.ones(2, 30, dtype=torch.bool))
    sigma = torch.tensor([0.3, 12.0])
    torch.testing.assert_close(module.model.denoise(x, sigma), base.denoise(x, sigma))
    torch.testing.assert_close(module.ema.denoise(x, sigma), base.denoise(x, sigma))
    torch.testing.assert_close(module.model.denoise(x, sigma, self_cond=x.flip(1)), base.denoise(x, sigma))
    other = BackboneDiffusion(ModelConfig(hidden=8, layers=2, rbf=8).to_dict())
    with pytest.raises(ValueError, match="do not fit the model config"):
        warm_start(other, path)
