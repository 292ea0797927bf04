"""Symmetry checks for point-cloud models, shared by molgen's tests and usable on your own networks.

``random_rotation`` draws R uniformly (Haar) from SO(3) with ``e3nn.o3``; ``assert_equivariant`` checks that
a function of point sets commutes with a rigid motion (and a permutation of the points):
f(P (x R^T + c)) = P (f(x) R^T + c) for point outputs, P f(x) R^T for vector outputs (directions, centred
positions, displacements: translation-invariant) and f(x) for invariant outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from e3nn import o3
from torch import Tensor

Output = Literal["points", "vectors", "invariant"]


def random_rotation(generator: torch.Generator | None = None, *, reflect: bool = False,
                    dtype: torch.dtype | None = None) -> Tensor:
    """Uniform random rotation [3, 3] (a normalised Gaussian quaternion, which is uniform on S^3, as a matrix);
    ``reflect``: -R instead, an improper rotation (det -1)."""
    q = torch.randn(4, generator=generator, dtype=torch.float64)
    rot = o3.quaternion_to_matrix(q / q.norm())
    return (-rot if reflect else rot).to(dtype or torch.get_default_dtype())


def rigid_motion(x: Tensor, rot: Tensor, shift: Tensor) -> Tensor:
    """x with its first three features moved to x[..., :3] R^T + c; the other features unchanged."""
    return torch.cat([x[..., :3] @ rot.to(x).T + shift.to(x), x[..., 3:]], -1)


def assert_equivariant(
    fn: Callable[..., Tensor],
    x: Tensor,
    *,
    mask: Tensor | None = None,
    output: Output = "points",
    translate: bool = True,
    reflect: bool = False,
    permute: bool = False,
    generator: torch.Generator | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> None:
    """Check ``fn(x)`` (``fn(x, mask)`` when a ``mask`` is given) against one random rigid motion of ``x``.

    ``x`` [..., N, F]: N points along dim ``x.ndim - 2`` whose first three features are positions (the rest
    invariant); ``mask`` [..., N] marks real points (padding is neither moved nor compared). The motion is
    x -> x R^T + c with R from ``random_rotation`` (improper if ``reflect``), c ~ N(0, 5^2 I) if ``translate``,
    and, if ``permute``, the same random order P of the N points (and of the mask) in every batch row. The
    output keeps the point axis for ``"points"`` (first three features move with R and c) and ``"vectors"``
    (with R only); ``"invariant"`` outputs must not change. ``generator`` defaults to seed 0. Raises
    AssertionError (``torch.testing.assert_close``) naming the motion that broke the symmetry.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    rot = random_rotation(g, reflect=reflect, dtype=x.dtype).to(x.device)
    shift = 5.0 * torch.randn(3, generator=g, dtype=torch.float64).to(x) if translate else torch.zeros_like(rot[0])
    axis = x.ndim - 2
    perm = torch.randperm(x.shape[axis], generator=g).to(x.device) if permute else None

    moved = rigid_motion(x, rot, shift)
    if mask is not None:
        moved = torch.where(mask.unsqueeze(-1), moved, x)
    moved_mask = mask
    if perm is not None:
        moved = moved.index_select(axis, perm)
        moved_mask = None if mask is None else mask.index_select(axis, perm)

    def call(a: Tensor, m: Tensor | None) -> Tensor:
        return fn(a) if m is None else fn(a, m)

    out, got = call(x, mask), call(moved, moved_mask)
    expected = out
    if output != "invariant":
        expected = rigid_motion(out, rot, shift if output == "points" else torch.zeros_like(shift))
        if perm is not None:
            expected = expected.index_select(axis, perm)
        if moved_mask is not None:
            got, expected = got[moved_mask], expected[moved_mask]
    motion = ("reflection" if reflect else "rotation") + (" + translation" if translate else "")
    motion += " + permutation" if permute else ""
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{output} output is not equivariant under {motion}:\n{m}")
