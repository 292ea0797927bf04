"""molgen.testing (rotations, the equivariance check) and molgen.progress (bars only where a user watches)."""

from __future__ import annotations

import pytest
import torch

from molgen.progress import progress
from molgen.testing import assert_equivariant, random_rotation

F64 = torch.float64


@pytest.mark.parametrize("reflect", [False, True])
def test_random_rotation_is_orthogonal_seeded_and_proper_unless_reflected(reflect: bool) -> None:
    r = random_rotation(torch.Generator().manual_seed(0), reflect=reflect, dtype=F64)
    torch.testing.assert_close(r @ r.T, torch.eye(3, dtype=F64))
    assert float(torch.det(r)) == pytest.approx(-1.0 if reflect else 1.0)
    assert torch.equal(r, random_rotation(torch.Generator().manual_seed(0), reflect=reflect, dtype=F64))
    assert random_rotation().dtype == torch.get_default_dtype()


def test_assert_equivariant_accepts_symmetric_functions() -> None:
    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    mask = torch.arange(6) < torch.tensor([6, 4]).unsqueeze(1)

    def centred(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # masked centring: a vector output
        w = m.unsqueeze(-1).to(a.dtype)
        com = (a[..., :3] * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True)
        return torch.cat([(a[..., :3] - com) * w, a[..., 3:]], -1)

    assert_equivariant(lambda a: a, x, permute=True, reflect=True)
    assert_equivariant(centred, x, mask=mask, output="vectors", permute=True)
    assert_equivariant(lambda a: torch.cdist(a[..., :3], a[..., :3]).sum((-1, -2)), x, output="invariant",
                       permute=True)


@pytest.mark.parametrize(
    ("fn", "options", "motion"),
    [
        (lambda a: a * torch.tensor([1.0, 2.0, 3.0], dtype=F64), {}, "rotation"),
        (lambda a: a[..., :3] - a[..., :1, :3], {"output": "points"}, "translation"),
        (lambda a: a.cumsum(-2), {"translate": False, "permute": True}, "permutation"),
        (lambda a: a[..., 0].sum(-1), {"output": "invariant"}, "rotation"),
    ],
)
def test_assert_equivariant_catches_broken_symmetry(fn, options: dict, motion: str) -> None:
    x = torch.randn(3, 7, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    with pytest.raises(AssertionError, match=motion):
        assert_equivariant(fn, x, **options)


def test_progress_is_silent_off_a_terminal_and_can_be_forced(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert list(progress(range(3), "work")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal
    list(progress(range(3), "work", enabled=True))
    assert "work" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    list(progress(range(3), "work"))
    assert capsys.readouterr().err == ""
