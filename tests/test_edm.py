"""EDM's and GeoLDM's QM9 architectures on molgen's engine, checked against numbers from their own code.

``tests/data/edm_reference.pt`` and ``geoldm_reference.pt`` (provenance: ``tests/data/edm_reference.md``) hold what
EDM's and GeoLDM's code computed after ``torch.manual_seed(0)``: fingerprints of their initial weights (published
QM9 arguments, and a small variant with n_layers 2, nf 64), the gamma table, network outputs on fixed inputs and
the 1000-step ancestral sampler from seeded noise. The weights themselves are not stored: the modules create their
layers in the original order, so the same seed rebuilds them, and the fingerprints prove it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from molgen.diffusion import Sampler, get_schedule
from molgen.molecules.edm import (
    EDMEGNN,
    ArchitectureMismatchError,
    EDMCheckpointError,
    EDMConfig,
    EDMDenoiser,
    EDMNoise,
    GeoLDM,
    UnsafePickleError,
    config_from_args,
    edm_grid,
    gamma_table,
    load_edm,
    load_geoldm,
    read_args,
)
from molgen.molecules.sampling import sample_molecules
from molgen.testing import assert_equivariant

REFERENCE = torch.load(Path(__file__).parent / "data" / "edm_reference.pt", weights_only=True)
GEOLDM_REFERENCE = torch.load(Path(__file__).parent / "data" / "geoldm_reference.pt", weights_only=True)
# The architecture and diffusion arguments of EDM's published QM9 model (outputs/edm_qm9/args.pickle).
PUBLISHED = {
    "model": "egnn_dynamics", "probabilistic_model": "diffusion", "dataset": "qm9", "remove_h": False,
    "include_charges": True, "condition_time": True, "context_node_nf": 0, "conditioning": [],
    "nf": 256, "n_layers": 9, "inv_sublayers": 1, "attention": True, "tanh": True, "norm_constant": 1,
    "sin_embedding": False, "normalization_factor": 1, "diffusion_steps": 1000,
    "diffusion_noise_schedule": "polynomial_2", "diffusion_noise_precision": 1e-5, "normalize_factors": [1, 4, 10],
}
SMALL = EDMConfig(layers=2, hidden=64)  # the published arguments with n_layers 2, nf 64
# GeoLDM's README command for QM9, with latent_nf 2 as in its released models.
GEOLDM_ARGS = {**PUBLISHED, "latent_nf": 2, "train_diffusion": True, "trainable_ae": True, "kl_weight": 0.01}
GEOLDM_SMALL = EDMConfig(layers=2, hidden=64, latent_nf=2)


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys and their float32 bytes (as computed for EDM's state dict)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def seeded(config: EDMConfig, dtype: torch.dtype = torch.float32) -> EDMDenoiser:
    torch.manual_seed(0)
    return EDMDenoiser(config).eval().to(dtype)


def seeded_geoldm(config: EDMConfig) -> GeoLDM:
    """GeoLDM's initial weights after seed 0: its encoder (a one-layer EGNN and a two-layer head, not kept) is
    created before the decoder and the diffusion network."""
    torch.manual_seed(0)
    EDMEGNN(dataclasses.replace(config, layers=1), config.atom_features, config.hidden)
    nn.Linear(config.hidden, config.hidden)
    nn.Linear(config.hidden, 2 * config.latent_nf + 1)
    return GeoLDM(config).eval()


@pytest.fixture(scope="module")
def published() -> EDMDenoiser:
    return seeded(config_from_args(PUBLISHED))


def write_folder(folder: Path, args: dict, network: dict[str, torch.Tensor], precision: float = 1e-5,
                 extra: dict[str, torch.Tensor] | None = None) -> Path:
    """An EDM-style folder: ``args`` pickled as a Namespace, ``network`` (and ``extra``, keys as they are) saved as
    EnVariationalDiffusion's state, with the gamma table of ``polynomial_2`` at ``precision``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(**args)))
    table = gamma_table(1000, 2.0, precision).float()
    state = {"buffer": torch.zeros(1), "gamma.gamma": table, **{f"dynamics.{k}": v for k, v in network.items()},
             **(extra or {})}
    torch.save(state, folder / "generative_model_ema.npy")
    return folder


# ------------------------------------------------------------------------------------------------ schedule
def test_gamma_table_is_edms():
    assert torch.equal(gamma_table(1000, 2.0, 1e-5), REFERENCE["gamma"].double())


def test_continuous_polynomial_2_differs_from_edm_only_at_the_clipped_end():
    """molgen's ``polynomial_2`` is EDM's curve without the step clipping: equal (to float32 storage) at every grid
    point but t = 1, where EDM's clipped step leaves alpha^2 = s + (1 - 2s) 1e-3 a_{T-1} instead of s."""
    t = edm_grid(1000).flip(0)
    continuous = -get_schedule("polynomial_2").lam(t)
    diff = (continuous - REFERENCE["gamma"].double()).abs()
    assert diff[:-1].max() < 2e-6
    assert 3e-4 < diff[-1] < 5e-4


def test_edm_schedule_is_its_table_at_the_grid_and_invertible():
    schedule = seeded(SMALL).schedule
    t = edm_grid(1000)
    torch.testing.assert_close(-schedule.lam(t), REFERENCE["gamma"].double().flip(0), rtol=0, atol=1e-12)
    between = torch.rand(200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(schedule.t_of_lam(schedule.lam(between)), between, rtol=0, atol=1e-9)
    alpha, sigma = schedule.alpha(between), schedule.sigma(between)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(between))
    d_alpha, d_sigma = schedule.d_alpha_sigma(between)
    h = 1e-7
    torch.testing.assert_close(d_alpha, (schedule.alpha(between + h) - schedule.alpha(between - h)) / (2 * h),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d_sigma, (schedule.sigma(between + h) - schedule.sigma(between - h)) / (2 * h),
                               rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ network
def test_seed_rebuilds_edms_initial_weights(published):
    assert fingerprint(published.state_dict()) == REFERENCE["full_fingerprint"]
    assert fingerprint(seeded(SMALL).state_dict()) == REFERENCE["small_fingerprint"]


def test_forward_matches_edm(published):
    with torch.no_grad():
        eps = published(REFERENCE["forward_x"], REFERENCE["forward_t"], mask=REFERENCE["forward_mask"])
    assert (eps - REFERENCE["forward_eps"]).abs().max() < 1e-5  # measured 3.4e-7 (EDM's float32 vs float64: 3.7e-7)
    padded = ~REFERENCE["forward_mask"]
    assert eps[padded].abs().max() == 0


@pytest.mark.parametrize("reflect", [False, True])
def test_equivariant(reflect):
    model = seeded(SMALL, torch.float64)
    g = torch.Generator().manual_seed(3)
    mask = torch.arange(7) < torch.tensor([7, 5]).unsqueeze(1)
    x = torch.randn(2, 7, SMALL.n_features, generator=g, dtype=torch.float64) * mask.unsqueeze(-1)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    with torch.no_grad():
        assert_equivariant(lambda a, m: model(a, t, mask=m), x, mask=mask, output="vectors", reflect=reflect,
                           permute=True, atol=1e-10, rtol=1e-8)


# ------------------------------------------------------------------------------------------------ sampling
def run_chain(model: EDMDenoiser, mask: torch.Tensor, dtype: torch.dtype, steps: int | None = None):
    """Our ``ddpm_ancestral`` on EDM's 1001-point grid from ``EDMNoise`` seeded 1 (EDM's draws): (x_T, states
    after each transition, the final state, the x0 estimate at t = 0); ``steps`` < 1000: stop early."""
    space = EDMNoise(3)
    g = torch.Generator().manual_seed(1)
    x_T = space.noise_like(torch.zeros(*mask.shape, model.n_features, dtype=dtype), mask, g)
    sampler = Sampler(model, model.schedule, "ddpm_ancestral", steps=1001, grid=edm_grid(1000), space=space)
    state, states = sampler.init(x_T, mask=mask, cond={"mask": mask}), {}
    with torch.no_grad():
        for i in range(steps or sampler.n_steps - 1):
            state = sampler.step(state, i, g)
            states[i + 1] = state.x
        x0 = sampler.finish(state) if steps is None else None
    return x_T, states, state.x, x0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ancestral_1000_steps_match_edms_sampler(dtype):
    """Same maths and the same noise draws: float64 agrees to round-off (measured 3e-15 of the state's size);
    in float32 the two implementations round differently (dense sums vs scatter sums, float64 coefficients vs
    EDM's float32 ones), about 1e-7 of the state per step, which the untrained network amplifies over the chain:
    measured 3.4e-6 of max |z| after 1000 steps, so the bound is 1e-4 of it."""
    key = "sample64_" if dtype == torch.float64 else "sample_"
    rtol = 1e-11 if dtype == torch.float64 else 1e-4
    x_T, states, z_0, x0 = run_chain(seeded(SMALL, dtype), REFERENCE["sample_mask"], dtype)
    assert torch.equal(x_T, REFERENCE[f"{key}z_T"])
    for step, expected in zip(REFERENCE["sample_steps"].tolist(), REFERENCE[f"{key}states"]):
        assert (states[step] - expected).abs().max() <= rtol * expected.abs().max(), step
    for ours, theirs in ((z_0, REFERENCE[f"{key}z_0"]), (x0, REFERENCE[f"{key}x0"])):
        assert (ours - theirs).abs().max() <= rtol * theirs.abs().max()


def test_published_architecture_chain_starts_like_edms(published):
    """The first 50 of the 1000 ancestral steps of the published architecture (all 1000 take 25 s here; they
    match EDM's to 2e-6 of max |z|, see the provenance file)."""
    mask = REFERENCE["sample_mask"]
    x_T, states, _, _ = run_chain(published, mask, torch.float32, steps=50)
    assert torch.equal(x_T, REFERENCE["full_z_T"])
    for step, expected in zip(REFERENCE["sample_steps"].tolist(), REFERENCE["full_states"]):
        if step <= 50:
            assert (states[step] - expected).abs().max() <= 1e-5 * expected.abs().max(), step


def test_few_step_solvers_sample_edm_models():
    hist = [0.0] * 5 + [1.0, 1.0]
    molecules = sample_molecules(seeded(SMALL), {"atom_hist": hist, "max_atoms": 6}, 3, solver="dpmpp_2m",
                                 steps=5, seed=0, step_scale=1.0, first_noise=math.inf)
    assert len(molecules) == 3 and all(len(m) in (5, 6) for m in molecules)
    assert all(set(m.symbols) <= set("HCNOF") for m in molecules)


# ------------------------------------------------------------------------------------------------ loading
def test_load_edm_round_trip(tmp_path):
    small = seeded(SMALL)
    args = {**PUBLISHED, "nf": 64, "n_layers": 2}
    model = load_edm(write_folder(tmp_path / "edm", args, small.state_dict()))
    assert model.config == SMALL
    x, t, mask = REFERENCE["forward_x"], REFERENCE["forward_t"], REFERENCE["forward_mask"]
    with torch.no_grad():
        assert torch.equal(model(x, t, mask=mask), small(x, t, mask=mask))


@pytest.mark.parametrize("protocol", [2, 4])
def test_arguments_with_sets_read_in_older_protocols(tmp_path, protocol):
    path = tmp_path / "args.pickle"
    path.write_bytes(pickle.dumps(argparse.Namespace(**PUBLISHED, tags={"a"}, z=1j), protocol=protocol))
    args = read_args(path)
    assert args["tags"] == {"a"} and args["z"] == 1j and args["nf"] == 256


class RunsShell:
    """Unpickling this calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    folder = write_folder(tmp_path / "edm", PUBLISHED, {})
    (folder / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(**PUBLISHED, hook=RunsShell(marker))))
    with pytest.raises(UnsafePickleError, match="system") as err:
        load_edm(folder)
    assert err.value.global_name in ("posix.system", "os.system", "nt.system")
    assert not marker.exists()


def test_pickle_of_another_class_is_refused(tmp_path):
    folder = write_folder(tmp_path / "edm", PUBLISHED, {})
    (folder / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(**PUBLISHED, path=Path("x"))))
    with pytest.raises(UnsafePickleError, match="pathlib"):
        load_edm(folder)


def test_weights_of_another_architecture_are_refused(tmp_path):
    folder = write_folder(tmp_path / "edm", PUBLISHED, seeded(SMALL).state_dict())
    with pytest.raises(ArchitectureMismatchError) as err:
        load_edm(folder)
    assert "dynamics.egnn.e_block_8.gcl_equiv.coord_mlp.4.weight" in err.value.missing
    assert "dynamics.egnn.embedding.weight: (64, 7) != (256, 7)" in err.value.shapes
    network = {**seeded(SMALL).state_dict(), "egnn.extra.weight": torch.zeros(1)}
    folder = write_folder(tmp_path / "edm2", {**PUBLISHED, "nf": 64, "n_layers": 2}, network)
    with pytest.raises(ArchitectureMismatchError, match="unexpected") as err:
        load_edm(folder)
    assert err.value.unexpected == ["dynamics.egnn.extra.weight"]


@pytest.mark.parametrize("change", [{"context_node_nf": 1, "conditioning": ["alpha"]}, {"model": "gnn_dynamics"},
                                    {"diffusion_noise_schedule": "learned"}, {"aggregation_method": "mean"},
                                    {"dataset": "geom"}])
def test_unsupported_arguments_are_named(change):
    with pytest.raises(EDMCheckpointError, match=next(iter(change))):
        config_from_args({**PUBLISHED, **change})


def test_checkpoint_with_another_schedule_is_refused(tmp_path):
    folder = write_folder(tmp_path / "edm", {**PUBLISHED, "nf": 64, "n_layers": 2}, seeded(SMALL).state_dict(),
                          precision=1e-4)
    with pytest.raises(EDMCheckpointError, match="gamma"):
        load_edm(folder)


# ------------------------------------------------------------------------------------------------ GeoLDM
def test_seed_rebuilds_geoldms_initial_weights():
    config = config_from_args(GEOLDM_ARGS)
    for model, key in ((seeded_geoldm(config), ""), (seeded_geoldm(GEOLDM_SMALL), "small_")):
        assert fingerprint(model.denoiser.state_dict()) == GEOLDM_REFERENCE[f"{key}dynamics_fingerprint"]
        assert fingerprint(model.decoder.state_dict()) == GEOLDM_REFERENCE[f"{key}decoder_fingerprint"]
    assert torch.equal(GEOLDM_REFERENCE["gamma"], REFERENCE["gamma"])


def test_geoldm_forward_and_decoder_match():
    model = seeded_geoldm(config_from_args(GEOLDM_ARGS))
    z, t, mask = GEOLDM_REFERENCE["forward_z"], GEOLDM_REFERENCE["forward_t"], GEOLDM_REFERENCE["forward_mask"]
    with torch.no_grad():
        assert (model.denoiser(z, t, mask=mask) - GEOLDM_REFERENCE["forward_eps"]).abs().max() < 1e-5
        assert (model.decode(z, mask) - GEOLDM_REFERENCE["decoded"]).abs().max() < 1e-5  # measured 1.2e-7


def test_geoldm_latent_chain_and_decoding_match():
    """1000 ancestral steps in the latent space, then the decoder on the final x0 estimate (GeoLDM decodes a draw
    around it); float32, bound as for EDM (measured 3.7e-6 of max |z|, 4.8e-6 of max |decoded|)."""
    model = seeded_geoldm(GEOLDM_SMALL)
    mask = GEOLDM_REFERENCE["sample_mask"]
    x_T, states, _, x0 = run_chain(model.denoiser, mask, torch.float32)
    assert torch.equal(x_T, GEOLDM_REFERENCE["sample_z_T"])
    for step, expected in zip(GEOLDM_REFERENCE["sample_steps"].tolist(), GEOLDM_REFERENCE["sample_states"]):
        assert (states[step] - expected).abs().max() <= 1e-4 * expected.abs().max(), step
    with torch.no_grad():
        decoded = model.decode(x0, mask)
    expected = GEOLDM_REFERENCE["sample_decoded"]
    assert (decoded - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_equivariant_decoder():
    model = seeded_geoldm(GEOLDM_SMALL).double()
    g = torch.Generator().manual_seed(4)
    mask = torch.arange(6) < torch.tensor([6, 4]).unsqueeze(1)
    z = torch.randn(2, 6, 5, generator=g, dtype=torch.float64) * mask.unsqueeze(-1)
    with torch.no_grad():
        assert_equivariant(lambda a, m: model.decode(a, m), z, mask=mask, output="vectors", reflect=True,
                           permute=True, atol=1e-10, rtol=1e-8)


def test_load_geoldm_round_trip_and_wrong_loader(tmp_path):
    model = seeded_geoldm(GEOLDM_SMALL)
    args = {**GEOLDM_ARGS, "nf": 64, "n_layers": 2}
    extra = {**{f"vae.decoder.{k}": v for k, v in model.decoder.state_dict().items()},
             "vae.encoder.final_mlp.0.weight": torch.zeros(1), "vae.buffer": torch.zeros(1)}
    folder = write_folder(tmp_path / "geoldm", args, model.denoiser.state_dict(), extra=extra)
    loaded = load_geoldm(folder)
    z, t, mask = GEOLDM_REFERENCE["forward_z"], GEOLDM_REFERENCE["forward_t"], GEOLDM_REFERENCE["forward_mask"]
    with torch.no_grad():
        assert torch.equal(loaded.decode(z, mask), model.decode(z, mask))
        assert torch.equal(loaded.denoiser(z, t, mask=mask), model.denoiser(z, t, mask=mask))
    with pytest.raises(EDMCheckpointError, match="load_geoldm"):
        load_edm(folder)
    del extra["vae.decoder.egnn.embedding.bias"]
    folder = write_folder(tmp_path / "broken", args, model.denoiser.state_dict(), extra=extra)
    with pytest.raises(ArchitectureMismatchError, match="vae.decoder.egnn.embedding.bias"):
        load_geoldm(folder)
    edm = write_folder(tmp_path / "edm", {**PUBLISHED, "nf": 64, "n_layers": 2}, seeded(SMALL).state_dict())
    with pytest.raises(EDMCheckpointError, match="load_edm"):
        load_geoldm(edm)
