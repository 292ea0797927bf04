"""Few-step students (molgen.molecules.distill): the rectified-diffusion lines, the teacher pairs and the run."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from molgen.diffusion import sample
from molgen.diffusion.schedules import get_schedule
from molgen.geometry import centre
from molgen.molecules.distill import (
    line_noise,
    line_times,
    load_pairs,
    make_pairs,
    random_rotations,
    train_student,
)
from molgen.molecules.sampling import DEFAULT_CHECKPOINT, FIRST_NOISE, load_model, sample_molecules


def test_random_rotations_are_proper_and_uniform() -> None:
    rot = random_rotations(20000, torch.Generator().manual_seed(0), dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand_as(rot)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye, atol=1e-12)
    assert torch.allclose(torch.det(rot), torch.ones(20000, dtype=torch.float64))
    # Haar measure on SO(3): E[R] = 0 and E[R_ij^2] = 1/3 (standard errors about 0.004)
    assert rot.mean(0).abs().max() < 0.02
    assert (rot.pow(2).mean(0) - 1 / 3).abs().max() < 0.02


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m"])
@pytest.mark.parametrize("steps", [2, 3, 7])
def test_a_student_that_knows_the_lines_is_exact_in_any_number_of_calls(solver: str, steps: int) -> None:
    """A linear teacher f(z) = A z: on the line x_t = alpha_t A z + sigma_t e(z) = M_t z the exact student is
    x0 = A M_t^-1 x. Data-prediction exponential integrators stay on the line, so every step count lands on A z."""
    schedule = get_schedule("vp_cosine")
    g = torch.Generator().manual_seed(0)
    d = 4
    a_mat = torch.eye(d, dtype=torch.float64) + 0.4 * torch.randn(d, d, generator=g, dtype=torch.float64)
    z = torch.randn(16, d, generator=g, dtype=torch.float64)
    t_a = schedule.t_of_rho(torch.tensor(FIRST_NOISE, dtype=torch.float64))
    e = line_noise(schedule, z, z @ a_mat.T, t_a.expand(16))
    assert torch.allclose(schedule.alpha(t_a) * z @ a_mat.T + schedule.sigma(t_a) * e, z)  # z is on its line

    def student(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        t = t.reshape(-1)[:1].to(torch.float64)
        alpha_a, sigma_a = schedule.alpha(t_a), schedule.sigma(t_a)
        m_t = schedule.alpha(t) * a_mat + schedule.sigma(t) / sigma_a * (torch.eye(d, dtype=x.dtype) - alpha_a * a_mat)
        return torch.linalg.solve(m_t, x.T).T @ a_mat.T

    student.prediction = "x0"  # type: ignore[attr-defined]
    out = sample(student, schedule, z, solver=solver, steps=steps, grid="logsnr",
                 grid_options={"t_max": float(t_a)}, noise_at_t_max=True)
    assert torch.allclose(out, z @ a_mat.T, atol=1e-9)


def test_line_times_are_log_uniform_between_the_ends() -> None:
    schedule = get_schedule("vp_cosine")
    t = line_times(torch.linspace(0, 1, 101, dtype=torch.float64), schedule, FIRST_NOISE)
    log_rho = schedule.rho(t).log()
    assert float(log_rho[-1]) == pytest.approx(np.log(FIRST_NOISE))
    assert float(log_rho[0]) == pytest.approx(float(schedule.rho(torch.tensor(schedule.t_min)).log()), rel=1e-5)
    assert torch.allclose(log_rho.diff(), log_rho.diff().mean().expand(100), rtol=1e-6)


def test_pairs_are_the_teachers_own_samples_made_in_resumable_parts(tmp_path, capsys) -> None:
    run = tmp_path / "student"
    made = make_pairs(run, DEFAULT_CHECKPOINT, 6, shard=3, steps=3, part=(1, 2))
    assert [p.name for p in made] == ["shard_1.pt"] and not (run / "pairs" / "shard_0.pt").exists()
    make_pairs(run, DEFAULT_CHECKPOINT, 6, shard=3, steps=3, part=(0, 2))
    pairs = load_pairs(run)
    assert pairs["z"].shape[0] == 6
    model, config = load_model()
    for k in range(2):  # shard k is sample_molecules' run with seed k: same noise, same molecules
        rows = slice(3 * k, 3 * k + 3)
        mols = sample_molecules(model, config, 3, steps=3, seed=k)
        for mol, x0, types, mask in zip(mols, pairs["x0"][rows], pairs["types"][rows], pairs["mask"][rows]):
            assert int(mask.sum()) == len(mol.symbols)
            assert tuple(model.atom_types[i] for i in types[mask].tolist()) == mol.symbols
            assert np.allclose(x0[mask, :3].double().numpy(), mol.positions, atol=1e-5)
    mask = pairs["mask"]
    assert torch.allclose(centre(pairs["z"][..., :3], mask), pairs["z"][..., :3], atol=1e-5)  # zero-CoM noise
    assert not pairs["z"][~mask].any() and not pairs["x0"][~mask].any()
    with pytest.raises(ValueError, match="made with"):
        make_pairs(run, DEFAULT_CHECKPOINT, 6, shard=3, steps=4)
    # a damaged shard is named and left out; the rest still trains
    (run / "pairs" / "shard_1.pt").write_bytes(b"not a torch file")
    assert load_pairs(run)["z"].shape[0] == 3
    assert "shard_1.pt" in capsys.readouterr().err


def test_student_run_warm_starts_from_the_teacher_and_records_its_pairs(tmp_path) -> None:
    from molgen.checkpoints import load_checkpoint

    run = tmp_path / "student"
    make_pairs(run, DEFAULT_CHECKPOINT, 4, shard=4, steps=3)
    args = argparse.Namespace(run_dir=str(run), max_steps=2, max_minutes=None, ckpt_minutes=5.0, threads=1,
                              accelerator="cpu", precision="32-true", keep_exports=False, lr=0.0, warmup_steps=1,
                              batch_size=2, ema_decay=0.999, handover=0.5, init=None)
    train_student(args)
    state, card = load_checkpoint(run / "ema.pt")
    teacher, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    assert all(torch.equal(state[k], v) for k, v in teacher.items())  # lr 0: the teacher's weights
    assert card["provenance"]["distilled_from"]["steps"] == 3
    assert card["provenance"]["global_step"] == 2 and "4 teacher pairs" in card["provenance"]["data"]
    # --init: an earlier student's weights start the run; the pairs' teacher stays the teacher
    args.run_dir, args.init = str(tmp_path / "again"), str(run / "ema.pt")
    (tmp_path / "again").mkdir()
    for name in ("pairs", "pairs.json"):
        (tmp_path / "again" / name).symlink_to(run / name)
    train_student(args)
    _, card = load_checkpoint(tmp_path / "again" / "ema.pt")
    assert card["provenance"]["init"]["path"] == str(run / "ema.pt")


def test_below_the_handover_the_student_is_trained_towards_the_teachers_own_estimate(tmp_path) -> None:
    """Targets are the pair's molecule above the hand-over and the teacher's estimate below; a student that is
    the teacher has no position loss there, and a positive one on the lines."""
    from molgen.molecules.distill import PairSet, collate_pairs, handover_targets, on_lines

    make_pairs(tmp_path, DEFAULT_CHECKPOINT, 4, shard=4, steps=3)
    pairs = PairSet(load_pairs(tmp_path))
    batch = collate_pairs([pairs[i] for i in range(4) if pairs.sizes[i] == pairs.sizes[0]])
    model, _ = load_model()
    x0, types, mask, eps, t = on_lines(batch, model.schedule, FIRST_NOISE, torch.Generator().manual_seed(0))
    assert torch.allclose(centre(x0[..., :3], mask), x0[..., :3], atol=1e-5)
    losses = {}
    for handover in (0.0, 1e9):  # every t above / below
        target, kinds = handover_targets(model, x0, types, mask, eps, t, handover)
        if handover == 0.0:
            assert torch.equal(target, x0) and torch.equal(kinds, types)
        losses[handover] = float(model.loss(x0, kinds, mask, t, eps, target=target)["pos"])
    assert losses[1e9] < 1e-8 < losses[0.0]
