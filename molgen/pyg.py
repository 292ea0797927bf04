"""PyTorch Geometric interop: molecules and protein backbones as ``torch_geometric.data.Data`` / ``Batch``.

- A molecule (``molgen.molecules.io.Molecule``) is ``Data(pos [n, 3], z [n], name)``: ``z`` the atomic numbers,
  as in PyG's QM9.
- A backbone (``molgen.structure.io.Backbone``) is ``Data(pos [L, 3], coords [L, 4, 3], residue_numbers [L],
  sequence, chain_id, insertion_codes, name, missing, breaks)``: ``pos`` the CA trace, ``coords`` N, CA, C, O
  (NaN where missing).
- Padded model tensors (positions [B, N, 3] and per-point fields [B, N, ...] with a bool mask [B, N]; the
  molecule model's state, CA traces from the structure sampler) are a ``Batch`` of their real points;
  ``from_pyg`` reads it as molecules when a ``z`` field is given, as CA-only backbones otherwise.

``radius_graph`` builds the sparse edges ``|pos_i - pos_j| <= r`` within each graph in pure torch (no
torch-cluster or pyg-lib), for message passing on molecules too large for the dense pair tensors of QM9 models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from rdkit import Chem
from torch import Tensor
from torch_geometric.data import Batch, Data
from torch_geometric.utils import to_dense_batch

from molgen.molecules.io import Molecule
from molgen.structure.io import Backbone

_TABLE = Chem.GetPeriodicTable()


def molecule_to_pyg(mol: Molecule, dtype: torch.dtype = torch.float32) -> Data:
    """``Data(pos, z, name)`` of one molecule."""
    z = torch.tensor([_TABLE.GetAtomicNumber(s) for s in mol.symbols], dtype=torch.long)
    return Data(pos=torch.as_tensor(np.asarray(mol.positions), dtype=dtype), z=z, name=mol.name)


def molecule_from_pyg(data: Data) -> Molecule:
    """The molecule of ``Data(pos, z[, name])`` (positions float64)."""
    symbols = tuple(_TABLE.GetElementSymbol(int(z)) for z in data.z)
    return Molecule(symbols, data.pos.detach().cpu().double().numpy(), getattr(data, "name", None) or "")


def backbone_to_pyg(bb: Backbone, dtype: torch.dtype = torch.float32) -> Data:
    """``Data`` of one backbone: CA trace as ``pos``, all atoms as ``coords``, every ``Backbone`` field kept."""
    coords = torch.as_tensor(bb.coords, dtype=dtype)
    return Data(
        pos=coords[:, 1].clone(),
        coords=coords,
        residue_numbers=torch.tensor(bb.residue_numbers, dtype=torch.long),
        sequence=bb.sequence,
        chain_id=bb.chain_id,
        insertion_codes=list(bb.insertion_codes),
        name=bb.name,
        missing=list(bb.missing),
        breaks=list(bb.breaks),
    )


def backbone_from_pyg(data: Data) -> Backbone:
    """The backbone of a ``backbone_to_pyg`` graph; a CA-only graph (``pos`` alone) gets NaN N, C, O and a
    poly-Gly sequence."""
    if "coords" in data:
        coords = data.coords.detach().cpu().numpy()
    else:
        ca = data.pos.detach().cpu().float().numpy()
        coords = np.full((len(ca), 4, 3), np.nan, dtype=np.float32)
        coords[:, 1] = ca
    n = len(coords)
    return Backbone(
        coords,
        getattr(data, "sequence", None) or "G" * n,
        getattr(data, "chain_id", None) or "A",
        data.residue_numbers.tolist() if "residue_numbers" in data else [],
        list(getattr(data, "insertion_codes", None) or []),
        getattr(data, "name", None) or "backbone",
        list(getattr(data, "missing", None) or []),
        list(getattr(data, "breaks", None) or []),
    )


def to_pyg(items: Molecule | Backbone | Sequence[Molecule | Backbone]) -> Data | Batch:
    """A molecule or backbone as ``Data``; a sequence of them as one ``Batch``."""
    if isinstance(items, Molecule):
        return molecule_to_pyg(items)
    if isinstance(items, Backbone):
        return backbone_to_pyg(items)
    return Batch.from_data_list([to_pyg(item) for item in items])


def from_pyg(data: Data | Batch) -> Molecule | Backbone | list[Molecule | Backbone]:
    """Inverse of ``to_pyg``: a graph with ``z`` is a molecule, one with ``coords`` (or ``pos`` alone) a
    backbone; a ``Batch`` gives the list of its graphs."""
    if isinstance(data, Batch):
        return [from_pyg(d) for d in data.to_data_list()]
    return molecule_from_pyg(data) if "z" in data else backbone_from_pyg(data)


def padded_to_pyg(pos: Tensor, mask: Tensor | None = None, **fields: Tensor) -> Batch:
    """``Batch`` of the real points of padded tensors: graph b holds ``pos[b, mask[b]]`` and, for each field,
    ``field[b, mask[b]]`` (fields [B, N, ...], e.g. ``z`` or the model state ``x``); no mask: all points real."""
    mask = torch.ones(pos.shape[:2], dtype=torch.bool, device=pos.device) if mask is None else mask
    graphs = [Data(pos=pos[b, m], **{k: v[b, m] for k, v in fields.items()}) for b, m in enumerate(mask)]
    return Batch.from_data_list(graphs)


def pyg_to_padded(batch: Batch, *fields: str, fill: float = 0) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Inverse of ``padded_to_pyg``: (pos [B, N, 3] with zero padding, mask [B, N], {field: [B, N, ...]}
    padded with ``fill``), N the largest graph."""
    pos, mask = to_dense_batch(batch.pos, batch.batch, batch_size=batch.num_graphs)
    dense = {k: to_dense_batch(batch[k], batch.batch, fill_value=fill, batch_size=batch.num_graphs)[0] for k in fields}
    return pos, mask, dense


def radius_graph(pos: Tensor, r: float, batch: Tensor | None = None, *, loop: bool = False,
                 max_pairs: int = 2**24) -> Tensor:
    """Edges [2, E] between the nodes of one graph within distance ``r`` (no periodic cell).

    ``edge_index[0]`` is the neighbour j and ``edge_index[1]`` the centre i (PyG's ``source_to_target``),
    sorted by i then j; both directions of every pair are present, self-loops only with ``loop``. ``batch``
    [n] assigns nodes to graphs in sorted order (as in a ``Batch``; default one graph). Each graph costs
    O(n_g^2) distances, evaluated a group of graphs at a time (at most ``max_pairs`` padded pairs per group).
    """
    n = pos.shape[0]
    batch = torch.zeros(n, dtype=torch.long, device=pos.device) if batch is None else batch
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=pos.device)
    if bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be sorted (nodes of one graph contiguous, as in a PyG Batch)")
    counts = torch.bincount(batch)
    start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    width = int(counts.max())
    group = max(1, max_pairs // width**2)
    edges = []
    for g0 in range(0, len(counts), group):
        g1 = min(g0 + group, len(counts))
        lo, hi = int(start[g0]), int(start[g1])
        dense, real = to_dense_batch(pos[lo:hi], batch[lo:hi] - g0, batch_size=g1 - g0, max_num_nodes=width)
        near = torch.cdist(dense, dense, compute_mode="donot_use_mm_for_euclid_dist") <= r
        near &= real.unsqueeze(1) & real.unsqueeze(2)
        if not loop:
            near &= ~torch.eye(width, dtype=torch.bool, device=pos.device)
        g, i, j = near.nonzero(as_tuple=True)
        offset = start[g0 + g]
        edges.append(torch.stack([offset + j, offset + i]))
    return torch.cat(edges, 1)
