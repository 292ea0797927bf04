"""molgen.pyg: molecules, backbones and padded tensors to and from PyG graphs; sparse radius graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.utils import is_undirected

from molgen.molecules.io import Molecule
from molgen.pyg import from_pyg, padded_to_pyg, pyg_to_padded, radius_graph, to_pyg
from molgen.structure.data import TS50_DIR
from molgen.structure.io import Backbone, list_structure_files, read_backbone

torch.set_num_threads(1)


def _molecules() -> list[Molecule]:
    rng = np.random.default_rng(0)
    return [Molecule(("C", "H", "H", "H", "H"), rng.normal(size=(5, 3)), "methane"),
            Molecule(("O", "H", "H"), rng.normal(size=(3, 3)), "water"),
            Molecule(("N", "F"), rng.normal(size=(2, 3)))]


def test_molecules_round_trip_through_a_batch() -> None:
    mols = _molecules()
    batch = to_pyg(mols)
    assert isinstance(batch, Batch) and batch.num_graphs == 3 and batch.pos.shape == (10, 3)
    assert batch.z[:5].tolist() == [6, 1, 1, 1, 1] and batch.batch.tolist() == [0] * 5 + [1] * 3 + [2] * 2
    back = from_pyg(batch)
    for a, b in zip(mols, back):
        assert isinstance(b, Molecule) and b.symbols == a.symbols and b.name == a.name
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-6)
    single = to_pyg(mols[1])
    assert isinstance(single, Data) and from_pyg(single).symbols == ("O", "H", "H")


def test_backbones_round_trip_with_every_field() -> None:
    natural = read_backbone(list_structure_files(TS50_DIR)[0])
    coords = np.random.default_rng(1).normal(size=(4, 4, 3)).astype(np.float32)
    coords[2, 3] = np.nan
    odd = Backbone(coords, "MKVG", "B", [5, 6, 6, 7], ["", "", "A", ""], "odd", ["B:6A GLY O"], ["B:6-7"])
    back = from_pyg(to_pyg([natural, odd]))
    for a, b in zip([natural, odd], back):
        np.testing.assert_array_equal(b.coords, a.coords)
        for field in ("sequence", "chain_id", "residue_numbers", "insertion_codes", "name", "missing", "breaks"):
            assert getattr(b, field) == getattr(a, field), field
    data = to_pyg(natural)
    torch.testing.assert_close(data.pos, torch.from_numpy(natural.ca))


def test_a_ca_trace_graph_is_a_backbone_with_missing_atoms() -> None:
    ca = torch.randn(6, 3)
    bb = from_pyg(Data(pos=ca))
    assert isinstance(bb, Backbone) and bb.sequence == "GGGGGG" and len(bb) == 6
    np.testing.assert_array_equal(bb.ca, ca.numpy())
    assert np.isnan(bb.coords[:, [0, 2, 3]]).all()


def test_padded_tensors_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(6) < torch.tensor([6, 2, 4]).unsqueeze(1)
    pos = torch.randn(3, 6, 3, generator=g) * mask.unsqueeze(-1)
    types = torch.randint(0, 5, (3, 6), generator=g).masked_fill(~mask, -1)
    batch = padded_to_pyg(pos, mask, types=types)
    assert batch.num_graphs == 3 and batch.pos.shape == (12, 3) and (batch.types >= 0).all()
    pos2, mask2, fields = pyg_to_padded(batch, "types", fill=-1)
    assert torch.equal(mask2, mask) and torch.equal(pos2, pos) and torch.equal(fields["types"], types)


def test_padded_ca_traces_and_atoms_read_back_as_backbones_and_molecules() -> None:
    ca = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))  # as the structure sampler returns
    backbones = from_pyg(padded_to_pyg(ca))
    assert [len(bb) for bb in backbones] == [5, 5] and all(isinstance(bb, Backbone) for bb in backbones)
    np.testing.assert_array_equal(backbones[1].ca, ca[1].numpy())
    mask = torch.tensor([[True, True, False], [True, True, True]])
    z = torch.tensor([[8, 1, 0], [6, 8, 8]])
    mols = from_pyg(padded_to_pyg(torch.randn(2, 3, 3), mask, z=z))
    assert [m.symbols for m in mols] == [("O", "H"), ("C", "O", "O")]


def _brute_force(pos: torch.Tensor, r: float, batch: torch.Tensor, loop: bool) -> set[tuple[int, int]]:
    near = (torch.cdist(pos.double(), pos.double()) <= r) & (batch[:, None] == batch[None, :])
    if not loop:
        near.fill_diagonal_(False)
    return {(j, i) for i, j in near.nonzero().tolist()}


@pytest.mark.parametrize("loop", [False, True])
def test_radius_graph_matches_all_pairs_within_each_graph(loop: bool) -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [5, 0, 300, 1, 40]  # a molecule ten times QM9's largest, an empty and a one-atom graph
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    pos = torch.rand(len(batch), 3, generator=g) * 12
    for max_pairs in (2**24, 1000):  # one group, and one graph at a time
        edges = radius_graph(pos, 2.0, batch, loop=loop, max_pairs=max_pairs)
        pairs = {tuple(e) for e in edges.T.tolist()}
        assert len(pairs) == edges.shape[1] and pairs == _brute_force(pos, 2.0, batch, loop)
        assert (edges[1].diff() >= 0).all() and is_undirected(edges)
    assert radius_graph(pos[:0], 2.0).shape == (2, 0)
    with pytest.raises(ValueError, match="batch must be sorted"):
        radius_graph(pos[:3], 2.0, torch.tensor([1, 0, 1]))


def test_radius_graph_on_a_batch_of_molecules() -> None:
    batch = to_pyg(_molecules())
    edges = radius_graph(batch.pos, 10.0, batch.batch)
    assert edges.shape[1] == 5 * 4 + 3 * 2 + 2 * 1  # complete graphs within each molecule, none across
    assert (batch.batch[edges[0]] == batch.batch[edges[1]]).all()
