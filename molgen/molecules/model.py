"""E(3)-equivariant denoiser for molecules: a masked dense EGNN with preconditioned x0 output.

State (EDM layout): x [B, N, 3 + K + 1] = [zero-CoM positions (Angstrom), one-hot(H, C, N, O, F) * type_scale,
atomic number * charge_scale]; a bool ``mask`` [B, N] marks real atoms. The network predicts x0:

* positions with Karras et al. (2022) preconditioning written for the VP path x_t = a x0 + s eps
  (d = s^2 + a^2 sd^2, sd = ``sigma_data``):  x0 = c_skip x_t + c_out F,  c_skip = a sd^2 / d,
  c_out = s sd / sqrt(d),  c_in = 1 / sqrt(d); F is the EGNN's equivariant displacement. Training on
  ||F - (x0 - c_skip x_t) / c_out||^2 weights the x0 error by 1/c_out^2 = 1/sd^2 + a^2/s^2 (SNR-like at low
  noise, x0-like at high noise), which trains fast and keeps x0 good for few-step solvers;
* atom types as logits (trained with cross-entropy); their x0 features are ``type_scale * softmax`` and
  ``charge_scale * E[Z]``.

Self-conditioning (``self_condition``, Chen et al. 2022; SemlaFlow, FlowMol): the network may be given its own
previous x0 estimate (``self_cond``, the same layout; the sampler passes it). Its type features enter the node
embedding and radial basis functions of its interatomic distances every layer's edges, through zero-initialised
projections: without an estimate these terms vanish, and a warm start computes the model it came from.

Rotating/translating the input positions rotates/translates the output positions and leaves the features
unchanged; permuting atoms permutes outputs; padded atoms never influence real ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from molgen.diffusion.schedules import get_schedule
from molgen.geometry import centre
from molgen.molecules.data import ATOM_TYPES, ATOMIC_NUMBERS


def sinusoidal(x: Tensor, n_freq: int, max_period: float = 64.0) -> Tensor:
    """[B] -> [B, 2 n_freq] Fourier features with periods from 1 to ``max_period`` (geometric)."""
    freqs = 2 * math.pi / torch.logspace(0.0, math.log10(max_period), n_freq, device=x.device, dtype=x.dtype)
    ang = x.unsqueeze(-1) * freqs
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class EGNNLayer(nn.Module):
    """One masked dense E(n)-equivariant layer (Satorras et al. 2021) with pre-LayerNorm, gated messages,
    Gaussian radial features, mean aggregation and a narrower edge width (``edge_hidden``):

    m_ij = g(e_ij) phi_e(A h_i + B h_j + C rbf(|x_i - x_j|), r0_ij),   h_i += phi_h(h_i, mean_j m_ij),
    x_i += mean_j (x_i - x_j) / (|x_i - x_j| + 1) tanh(phi_x(m_ij)) * coord_range.
    The first linear map of the edge MLP is split per node (A h_i + B h_j) so its cost is O(N) not O(N^2).
    """

    def __init__(self, hidden: int, edge_hidden: int, n_rbf: int, rbf_max: float, coord_range: float = 3.0) -> None:
        super().__init__()
        e = edge_hidden
        self.norm = nn.LayerNorm(hidden)
        self.src = nn.Linear(hidden, e)
        self.dst = nn.Linear(hidden, e, bias=False)
        self.radial = nn.Linear(n_rbf + 1, e, bias=False)
        self.edge = nn.Sequential(nn.SiLU(), nn.Linear(e, e), nn.SiLU())
        self.gate = nn.Linear(e, 1)
        self.node = nn.Sequential(nn.Linear(hidden + e, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.coord = nn.Sequential(nn.Linear(e, e // 2), nn.SiLU(), nn.Linear(e // 2, 1))
        nn.init.zeros_(self.coord[-1].weight)
        nn.init.zeros_(self.coord[-1].bias)
        self.register_buffer("centers", torch.linspace(0.0, rbf_max, n_rbf), persistent=False)
        self.gamma = (n_rbf / rbf_max) ** 2 / 2.0
        self.coord_range = coord_range

    def rbf(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_i - x_j [B, N, N, 3], distances [B, N, N, 1], their radial basis [B, N, N, n_rbf])."""
        diff = x.unsqueeze(2) - x.unsqueeze(1)
        dist = diff.pow(2).sum(-1, keepdim=True).add(1e-8).sqrt()
        return diff, dist, torch.exp(-self.gamma * (dist - self.centers).pow(2))

    def forward(self, h: Tensor, x: Tensor, r0: Tensor, pair: Tensor, inv_deg: Tensor,
                edge_term: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``edge_term`` [B, N, N, edge_hidden]: added to the edge pre-activation (self-conditioning) or None."""
        hn = self.norm(h)
        diff, dist, rbf = self.rbf(x)
        pre = self.src(hn).unsqueeze(2) + self.dst(hn).unsqueeze(1) + self.radial(torch.cat([rbf, r0], -1))
        if edge_term is not None:
            pre = pre + edge_term
        m = self.edge(pre)
        m = m * torch.sigmoid(self.gate(m)) * pair
        agg = m.sum(2) * inv_deg
        h = h + self.node(torch.cat([hn, agg], -1))
        w = torch.tanh(self.coord(m)) * self.coord_range * pair
        x = x + (diff / (dist + 1.0) * w).sum(2) * inv_deg
        return h, x


class MoleculeDenoiser(nn.Module):
    """``model(x_t, t, mask=..., props=..., drop=...) -> x0`` for the molecule state described above.

    ``props`` [B, P] are normalised property values for conditioning; ``drop`` [B] bool (or all rows when
    ``props`` is None) replaces them by a learned null embedding (classifier-free guidance)."""

    prediction = "x0"

    def __init__(
        self,
        hidden: int = 128,
        edge_hidden: int = 64,
        layers: int = 6,
        n_rbf: int = 24,
        rbf_max: float = 4.0,
        schedule: str = "vp_cosine",
        sigma_data: float = 1.5,
        type_scale: float = 0.25,
        charge_scale: float = 0.1,
        feature_var: float = 0.05,
        properties: Sequence[str] = (),
        atom_types: Sequence[str] = ATOM_TYPES,
        self_condition: bool = False,
    ) -> None:
        super().__init__()
        self.schedule = get_schedule(schedule)
        self.sigma_data = sigma_data
        self.type_scale = type_scale
        self.charge_scale = charge_scale
        self.feature_var = feature_var
        self.properties = tuple(properties)
        self.atom_types = tuple(atom_types)
        k = len(self.atom_types)
        self.n_features = 3 + k + 1
        z = torch.tensor([ATOMIC_NUMBERS[ATOM_TYPES.index(s)] for s in self.atom_types], dtype=torch.float32)
        self.register_buffer("charges", z, persistent=False)
        self.n_freq = 16
        self.embed = nn.Linear(k + 1 + 2 * self.n_freq + 1, hidden)
        if self.properties:
            self.prop_embed = nn.Linear(len(self.properties), hidden)
            self.null_prop = nn.Parameter(torch.zeros(hidden))
        self.layers = nn.ModuleList(EGNNLayer(hidden, edge_hidden, n_rbf, rbf_max) for _ in range(layers))
        self.out_norm = nn.LayerNorm(hidden)
        self.type_head = nn.Linear(hidden, k)
        self.self_conditioning = self_condition
        if self_condition:  # zero-initialised: a warm start keeps its function
            self.sc_node = nn.Linear(k + 1, hidden, bias=False)
            self.sc_edge = nn.Linear(n_rbf, edge_hidden, bias=False)
            nn.init.zeros_(self.sc_node.weight)
            nn.init.zeros_(self.sc_edge.weight)

    # --- feature encoding -------------------------------------------------------------------------
    def encode(self, positions: Tensor, types: Tensor, mask: Tensor) -> Tensor:
        """(positions [B,N,3], type indices [B,N], mask) -> x0 state [B, N, 3 + K + 1] (padding 0)."""
        onehot = nn.functional.one_hot(types.clamp_min(0), len(self.atom_types)).to(positions.dtype)
        feats = self.type_features(onehot)
        x = torch.cat([centre(positions, mask), feats], -1)
        return x * mask.unsqueeze(-1)

    def type_features(self, probs: Tensor) -> Tensor:
        """Type probabilities [.., K] -> [type_scale * p, charge_scale * E[Z]]."""
        charge = (probs * self.charges.to(probs.dtype)).sum(-1, keepdim=True)
        return torch.cat([probs * self.type_scale, charge * self.charge_scale], -1)

    def decode_types(self, x: Tensor) -> Tensor:
        """Type indices from a state's one-hot channels (argmax)."""
        return x[..., 3 : 3 + len(self.atom_types)].argmax(-1)

    # --- network ----------------------------------------------------------------------------------
    def coefficients(self, t: Tensor) -> dict[str, Tensor]:
        """alpha, sigma, c_in, c_skip, c_out (positions) and c_in for features, each [B, 1, 1]."""
        t64 = t.to(torch.float64)
        a, s = self.schedule.alpha(t64), self.schedule.sigma(t64)
        sd2 = self.sigma_data**2
        d = s**2 + a**2 * sd2
        out = {
            "alpha": a,
            "sigma": s,
            "lam": self.schedule.lam(t64),
            "c_in": d.rsqrt(),
            "c_skip": a * sd2 / d,
            "c_out": s * self.sigma_data / d.sqrt(),
            "c_in_h": (s**2 + a**2 * self.feature_var).rsqrt(),
        }
        return {k: v.to(t.dtype if t.is_floating_point() else torch.float32).view(-1, 1, 1) for k, v in out.items()}

    def network(
        self,
        x_t: Tensor,
        t: Tensor,
        mask: Tensor,
        props: Tensor | None = None,
        drop: Tensor | None = None,
        self_cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Raw outputs: (F [B,N,3] zero-CoM displacement, type logits [B,N,K], coefficients)."""
        dtype = x_t.dtype
        c = {k: v.to(dtype) for k, v in self.coefficients(t.to(dtype)).items()}
        maskf = mask.to(dtype).unsqueeze(-1)
        pos = centre(x_t[..., :3], mask) * c["c_in"]
        feats = x_t[..., 3:] * c["c_in_h"]
        lam = c["lam"].view(-1).clamp(-20.0, 20.0)
        temb = torch.cat([sinusoidal(lam, self.n_freq), lam.unsqueeze(-1) / 10.0], -1)
        n = x_t.shape[1]
        h = self.embed(torch.cat([feats, temb.unsqueeze(1).expand(-1, n, -1)], -1))
        if self.properties:
            h = h + self._condition(props, drop, x_t.shape[0], dtype).unsqueeze(1)
        edge_term = None
        if self_cond is not None:
            if not self.self_conditioning:
                raise ValueError("this molecule model has no self-conditioning (self_condition)")
            h = h + self.sc_node(self_cond[..., 3:].to(dtype))
            edge_term = self.sc_edge(self.layers[0].rbf(self_cond[..., :3].to(dtype))[2])
        h = h * maskf
        eye = torch.eye(n, dtype=torch.bool, device=x_t.device)
        pair = (mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye).to(dtype).unsqueeze(-1)
        inv_deg = 1.0 / (mask.sum(1).to(dtype) - 1.0).clamp_min(1.0).view(-1, 1, 1)
        r0 = (pos.unsqueeze(2) - pos.unsqueeze(1)).pow(2).sum(-1, keepdim=True)
        x = pos
        for layer in self.layers:
            h, x = layer(h, x, r0, pair, inv_deg, edge_term)
            h = h * maskf
        disp = centre(x - pos, mask)
        logits = self.type_head(self.out_norm(h))
        return disp, logits, c

    def _condition(self, props: Tensor | None, drop: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor:
        null = self.null_prop.to(dtype).expand(batch, -1)
        if props is None:
            return null
        emb = self.prop_embed(props.to(dtype))
        if drop is None:
            return emb
        return torch.where(drop.view(-1, 1), null, emb)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        mask: Tensor | None = None,
        props: Tensor | None = None,
        drop: Tensor | None = None,
        self_cond: Tensor | None = None,
    ) -> Tensor:
        """x0 prediction with the same layout as ``x_t``; padded atoms are returned as zeros."""
        if mask is None:
            mask = torch.ones(x_t.shape[:2], dtype=torch.bool, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        disp, logits, c = self.network(x_t, t, mask, props, drop, self_cond)
        pos = c["c_skip"] * centre(x_t[..., :3], mask) + c["c_out"] * disp
        feats = self.type_features(torch.softmax(logits, -1))
        return torch.cat([pos, feats], -1) * mask.unsqueeze(-1).to(x_t.dtype)

    def loss(
        self,
        x0: Tensor,
        types: Tensor,
        mask: Tensor,
        t: Tensor,
        eps: Tensor,
        props: Tensor | None = None,
        drop: Tensor | None = None,
        type_weight: float = 1.0,
        self_condition: bool = False,
        target: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Training loss at times ``t`` with noise ``eps`` (zero-CoM over real atoms, zero at padding) on
        x_t = alpha x0 + sigma eps; the output is trained towards ``target`` positions where given (a teacher's
        estimate), else x0's; ``self_condition``: first estimate x0 without gradients and give it to the
        trained call."""
        c = {k: v.to(x0.dtype) for k, v in self.coefficients(t).items()}
        x_t = c["alpha"] * x0 + c["sigma"] * eps
        estimate = None
        if self_condition:
            with torch.no_grad():
                estimate = self(x_t, t, mask, props, drop)
        disp, logits, c = self.network(x_t, t, mask, props, drop, estimate)
        aim = (x0 if target is None else target)[..., :3]
        f_target = (aim - c["c_skip"] * x_t[..., :3]) / c["c_out"]
        m = mask.to(x0.dtype)
        n = m.sum()
        pos = ((disp - f_target).pow(2).sum(-1) * m).sum() / (3 * n)
        ce = nn.functional.cross_entropy(logits[mask], types[mask])
        return {"loss": pos + type_weight * ce, "pos": pos, "type_ce": ce}
